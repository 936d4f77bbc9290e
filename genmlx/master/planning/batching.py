"""How many requests a model's ranks decode together (``maxBatch``) and how many more may wait
(``maxQueue``): as the manifest sets them, else from its nodes' memory.

Pure, like placement, whose capacity figures it reads. A model whose ``serving.maxBatch`` is not
set gets as many full-context sequences as the memory left after the weights and a full prefix
cache (``PREFIX_CACHE_BYTES``, a rank's default bound) holds on its tightest node (the context as
placement budgets it), at least one and at most ``DERIVED_BATCH_CAP`` (64), so that a GPU with
room for hundreds decodes a batch that still streams each request at a useful speed; an unset
``serving.maxQueue`` is 8 waiting requests per batch slot, at least 64 (``queue_for_batch``, as a
hand-started rank has it). A quantized KV cache serves one sequence at a time. Each model is
placed by itself: two models on one node each count its whole memory.

What the batch leaves on each node, beside the weights, the prefix cache and a full context in
every batch slot, is its ``spare`` memory; the master passes each rank its node's, and a rank on a
CUDA GPU may fill it with copies of its quantized weights dequantized once, where those multiply a
batch faster than MLX's quantized kernel (``dispatcher.engine.quantized_batches``). The batch comes
first: the copies only take what it does not need. A node that serves other models too has none
spare: each model counts the node's whole memory, and copies that each took it all would not fit.
Where that is a GPU node, the group's fingerprint names it, so a model coming or going restarts
the groups there with their spare memory as it now is.
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
from genmlx.wire.serving import MIN_QUEUE, QUEUE_PER_BATCH_SLOT, queue_for_batch

DERIVED_BATCH_CAP = 64
PREFIX_CACHE_BYTES = 4 << 30  # what a rank's prefix cache may hold (the dispatcher's --prefix-cache-gb)


@dataclass(frozen=True)
class Batching:
    """How many sequences a model's ranks decode together and how many more may wait, each as the
    manifest set it or derived from its nodes' memory; ``reason`` says which, with the numbers."""

    max_batch: int
    max_queue: int
    reason: str
    spare_bytes: tuple[int, ...] = ()  # each node's memory left beside the batch, in node order
    shared_gpu_nodes: tuple[str, ...] = ()  # GPU nodes that serve other models too: none spare there


def batching_for(
    spec: ModelSpec,
    placement: Placement,
    nodes: list[NodeCapacity],
    shape: ModelShape,
    context_length: int | None,
    shared: frozenset[str] = frozenset(),
) -> Batching:
    """The batch and queue of ``spec`` placed as ``placement`` on ``nodes`` (which ``place`` has
    checked hold at least one sequence); the nodes named in ``shared`` serve other models too."""
    budget = kv_budget(spec, shape, context_length)
    if budget.sequences:
        batching = set_batching(spec)
    else:
        one = replace(budget, sequences=1)
        batching = derived_batching(spec, node_loads(placement, nodes, shape, one), one)
    full = node_loads(placement, nodes, shape, replace(budget, sequences=batching.max_batch))
    return with_spare(batching, full, shared)


def with_spare(
    batching: Batching, loads: tuple[NodeLoad, ...], shared: frozenset[str] = frozenset()
) -> Batching:
    """``batching`` with each node's memory left beside its weights, the prefix cache and the batch's
    full contexts, none on a node in ``shared``; its reason says so where the nodes are GPUs, whose
    ranks may use it."""
    spare = tuple(
        0 if each.node.name in shared else max(spare_bytes(each, each.kv_bytes), 0) for each in loads
    )
    reason = batching.reason
    if any(each.node.gpu for each in loads):
        least = min(range(len(loads)), key=lambda i: spare[i])
        name = loads[least].node.name
        where = f" on {name}" if len(loads) > 1 else ""
        why = f" ({name} serves other models too)" if name in shared else ""
        reason += f"; {gb(spare[least])} GB spare beside the batch{where}{why}"
    shared_gpus = tuple(
        sorted(each.node.name for each in loads if each.node.gpu and each.node.name in shared)
    )
    return replace(batching, reason=reason, spare_bytes=spare, shared_gpu_nodes=shared_gpus)


def spare_bytes(load: NodeLoad, kv_bytes: int) -> int:
    """What ``load``'s node has left of its usable memory after the weights, the prefix cache and
    ``kv_bytes`` of KV cache (negative where they do not fit)."""
    return load.node.usable_bytes - load.weight_bytes - PREFIX_CACHE_BYTES - kv_bytes


def derived_batching(spec: ModelSpec, loads: tuple[NodeLoad, ...], one: KvBudget) -> Batching:
    """The batch the tightest node's memory left after the weights and the prefix cache holds,
    capped; the queue by it."""
    left = {each.node.name: spare_bytes(each, 0) for each in loads}
    room = {each.node.name: max(left[each.node.name], 0) // max(each.kv_bytes, 1) for each in loads}
    tightest = min(room, key=lambda name: (room[name], name))
    fits = room[tightest]
    max_batch = max(1, min(fits, DERIVED_BATCH_CAP))
    where = f" on {tightest}" if len(loads) > 1 else ""
    reason = (
        f"maxBatch {max_batch}: the {gb(max(left[tightest], 0))} GB left after the weights and the prefix "
        f"cache ({gb(PREFIX_CACHE_BYTES)} GB){where} holds {fits} sequences of {tokens_phrase(one)}"
    )
    if fits > DERIVED_BATCH_CAP:
        reason += f", capped at {DERIVED_BATCH_CAP}"
    elif fits < 1:
        reason += ", so one (the prefix cache cannot fill beside it)"
    return Batching(max_batch, *queue_for(spec, max_batch, reason))


def set_batching(spec: ModelSpec) -> Batching:
    """``serving.maxBatch``; one with a quantized KV cache, whatever is set."""
    if spec.serving.kv_bits is not None:
        ignored = (
            f" (serving.maxBatch {spec.serving.max_batch} does not apply)" if spec.serving.max_batch else ""
        )
        reason = f"maxBatch 1: one sequence at a time with serving.kvBits{ignored}"
        return Batching(1, *queue_for(spec, 1, reason))
    max_batch = spec.serving.max_batch or 1
    return Batching(max_batch, *queue_for(spec, max_batch, f"maxBatch {max_batch}: serving.maxBatch"))


def queue_for(spec: ModelSpec, max_batch: int, reason: str) -> tuple[int, str]:
    """``serving.maxQueue``, else ``queue_for_batch``'s; ``reason`` with the queue's own."""
    if spec.serving.max_queue is not None:
        return spec.serving.max_queue, f"{reason}; maxQueue {spec.serving.max_queue}: serving.maxQueue"
    max_queue = queue_for_batch(max_batch)
    rule = f"{QUEUE_PER_BATCH_SLOT} per batch slot, at least {MIN_QUEUE}"
    return max_queue, f"{reason}; maxQueue {max_queue}: {rule}"
