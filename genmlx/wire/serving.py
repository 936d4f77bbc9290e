"""How each rank of a model serves, defined once.

The manifest's ``spec.models[].serving`` (less its ``port``) is a ``ServingSettings``; the master
puts it unchanged in every ``RankLaunch``, the agent writes it into the rank's command line and the
dispatcher reads it back (``genmlx.wire.argv``), all from this field list. A new setting is a field
here, its entry in ``schemas/cluster.schema.json``, and the code that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from genmlx.wire.argv import arg
from genmlx.wire.codec import WireType

UNPLACED_MAX_BATCH = 8
QUEUE_PER_BATCH_SLOT = 8
MIN_QUEUE = 64


def queue_for_batch(max_batch: int) -> int:
    """The requests that may wait where ``maxQueue`` is not set: ``QUEUE_PER_BATCH_SLOT`` per batch
    slot, at least ``MIN_QUEUE``."""
    return max(MIN_QUEUE, QUEUE_PER_BATCH_SLOT * max_batch)


@dataclass(frozen=True)
class ServingSettings(WireType):
    # None in a manifest: the master derives them from the nodes' memory (``master.planning.batching``)
    # and launches every rank with numbers; a dispatcher started by hand without them takes
    # ``UNPLACED_MAX_BATCH`` and the queue ``queue_for_batch`` gives.
    max_batch: int | None = arg(None, minimum=1, help="most requests generated together (8)")
    max_queue: int | None = arg(
        None, minimum=1, help="most requests waiting; more get 429 (8 per batch slot, at least 64)"
    )
    context_length: int | None = arg(None, minimum=1, help="prompt + completion token limit")
    kv_bits: int | None = arg(
        None, minimum=4, maximum=8, help="quantize the KV cache to 4 or 8 bits (one sequence at a time)"
    )
    kv_group_size: int | None = arg(
        None, minimum=32, maximum=128, help="values per KV quantization group (64)"
    )
    disk_cache_gb: float | None = arg(
        None,
        minimum=0,
        help="disk the prompt cache may fill on each node, kept across restarts (off without it)",
    )
