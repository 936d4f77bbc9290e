"""How many requests a model's ranks decode together (``maxBatch``) and how many more may wait
(``maxQueue``): as the manifest sets them, else from its nodes' memory.

Pure, like placement, whose capacity figures it reads. A model whose ``serving.maxBatch`` is not
set gets as many full-context sequences as the memory left after the weights holds on its tightest
node (the context as placement budgets it), at most ``DERIVED_BATCH_CAP`` (64), so that a GPU with
room for hundreds decodes a batch that still streams each request at a useful speed; an unset
``serving.maxQueue`` is ``QUEUE_PER_BATCH_SLOT`` (8) waiting requests per batch slot, at least
``MIN_DERIVED_QUEUE`` (64). A quantized KV cache serves one sequence at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from genmlx.manifest.types import ModelSpec
from genmlx.master.planning.placement import (
    KvBudget,
    NodeCapacity,
    NodeLoad,
    Placement,
    gb,
    kv_budget,
    node_loads,
    tokens_phrase,
)
from genmlx.wire.agent_state import ModelShape

DERIVED_BATCH_CAP = 64
QUEUE_PER_BATCH_SLOT = 8
MIN_DERIVED_QUEUE = 64


@dataclass(frozen=True)
class Batching:
    """How many sequences a model's ranks decode together and how many more may wait, each as the
    manifest set it or derived from its nodes' memory; ``reason`` says which, with the numbers."""

    max_batch: int
    max_queue: int
    reason: str


def batching_for(
    spec: ModelSpec,
    placement: Placement,
    nodes: list[NodeCapacity],
    shape: ModelShape,
    context_length: int | None,
) -> Batching:
    """The batch and queue of ``spec`` placed as ``placement`` on ``nodes`` (which ``place`` has
    checked hold at least one sequence)."""
    budget = kv_budget(spec, shape, context_length)
    if budget.sequences:
        return set_batching(spec)
    one = replace(budget, sequences=1)
    return derived_batching(spec, node_loads(placement, nodes, shape, one), one)


def derived_batching(spec: ModelSpec, loads: tuple[NodeLoad, ...], one: KvBudget) -> Batching:
    """The batch the tightest node's memory left after the weights holds, capped; the queue by it."""
    room = {
        each.node.name: (each.node.usable_bytes - each.weight_bytes) // max(each.kv_bytes, 1)
        for each in loads
    }
    tightest = min(room, key=lambda name: (room[name], name))
    fits = room[tightest]
    max_batch = min(fits, DERIVED_BATCH_CAP)
    left = next(each.node.usable_bytes - each.weight_bytes for each in loads if each.node.name == tightest)
    where = f" on {tightest}" if len(loads) > 1 else ""
    reason = (
        f"maxBatch {max_batch}: the {gb(left)} GB left after the weights{where} holds {fits} sequences "
        f"of {tokens_phrase(one)}" + (f", capped at {DERIVED_BATCH_CAP}" if fits > DERIVED_BATCH_CAP else "")
    )
    return Batching(max_batch, *queue_for(spec, max_batch, reason))


def set_batching(spec: ModelSpec) -> Batching:
    """``serving.maxBatch``; one with a quantized KV cache, whatever is set."""
    if spec.serving.kv_bits is not None:
        return Batching(1, *queue_for(spec, 1, "maxBatch 1: one sequence at a time with serving.kvBits"))
    max_batch = spec.serving.max_batch or 1
    return Batching(max_batch, *queue_for(spec, max_batch, f"maxBatch {max_batch}: serving.maxBatch"))


def queue_for(spec: ModelSpec, max_batch: int, reason: str) -> tuple[int, str]:
    """``serving.maxQueue``, else ``QUEUE_PER_BATCH_SLOT`` per batch slot (at least
    ``MIN_DERIVED_QUEUE``); ``reason`` with the queue's own."""
    if spec.serving.max_queue is not None:
        return spec.serving.max_queue, f"{reason}; maxQueue {spec.serving.max_queue}: serving.maxQueue"
    max_queue = max(MIN_DERIVED_QUEUE, QUEUE_PER_BATCH_SLOT * max_batch)
    rule = f"{QUEUE_PER_BATCH_SLOT} per batch slot, at least {MIN_DERIVED_QUEUE}"
    return max_queue, f"{reason}; maxQueue {max_queue}: {rule}"
