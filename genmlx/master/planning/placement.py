"""Placement: how a model's rank group splits it over its nodes, and whether each node can hold its part.

Pure: no I/O, no clock. ``place`` picks the parallelism and then checks capacity, so a model that
cannot fit is refused (``PlacementRefused``, a permanent error naming the numbers) before anything
starts.

- One node runs the whole model ("single").
- ``parallelism: auto`` picks tensor parallel when the nodes' usable memory is within 10% and the
  attention and KV heads divide by the node count, pipeline parallel otherwise.
- Pipeline parallel splits the layers in proportion to each node's memory. ``layer_split[r]`` is the
  number of layers rank ``r`` (the ``r``-th node given) runs, as mlx-lm's ``pipeline(group, split)``
  takes it (mlx-lm gives rank 0 the last layers).
- An explicit ``tensor`` is refused when the heads do not divide; an explicit ``pipeline`` when there
  are fewer layers than nodes.

Usable memory is ``USABLE_MEMORY_PERCENT`` (75%) of a node's RAM. On macOS that is what Metal's
recommended working set allows the GPU to keep resident by default (``max_recommended_working_set_size``
in ``mx.device_info()``, the ceiling of ``mx.set_wired_limit``; MLX's maintainers give it as 0.75 of RAM
in ml-explore/mlx#64). On Linux the same share leaves room for the OS, the agent and Python. A
Linux node where MLX runs on CUDA holds models in its (first) GPU's memory: placement counts that,
``GPU_USABLE_MEMORY_PERCENT`` (90%) of it, the rest being CUDA's own.

The KV cache is a budget, not an allocation: mlx-lm grows it as sequences get longer. It is budgeted
for the worst case, a full context in every batch slot, because that is what users would otherwise
meet as an out-of-memory error in the middle of a request. The context is the one asked for, else the
manifest's ``serving.contextLength``, else the model's ``max_position_embeddings`` capped at
``UNSET_CONTEXT_CAP`` (8192) tokens, else 4096 tokens. The cap matters: models announce contexts of
128k tokens and more, and a full one in every batch slot would refuse most models on most Macs
although few requests come near it; who needs long contexts sets ``serving.contextLength``, and the
check then budgets it in full.
Weights are shared as mlx-lm shards them, to first order: tensor parallel 1/N each, pipeline in
proportion to a node's layers (embeddings and the output head, kept whole, are not counted apart).

A model whose ``serving.maxBatch`` is not set must have room for one sequence here; how many it
then gets is ``batching``'s to say.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from genmlx.core.errors import PermanentError
from genmlx.manifest.types import ModelSpec
from genmlx.wire.agent_state import ModelShape

USABLE_MEMORY_PERCENT = 75
# A CUDA GPU's memory holds nothing but models: what is left is for CUDA's context and libraries.
GPU_USABLE_MEMORY_PERCENT = 90
# Tensor parallel gives every node the same share, so the smallest node sets the limit for all.
TENSOR_MEMORY_TOLERANCE_PERCENT = 10
DEFAULT_CONTEXT_TOKENS = 4096
UNSET_CONTEXT_CAP = 8192
GB = 1_000_000_000

PlacedParallelism = Literal["single", "tensor", "pipeline"]


class PlacementRefused(PermanentError):
    """The model cannot be placed on its nodes as the manifest asks. ``reason`` is a condition reason
    (``NoNodes``, ``HeadsDoNotDivide``, ``TooFewLayers``, ``DoesNotFit``); the message names the numbers
    and what to change."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class NodeCapacity:
    """A node as placement sees it: its name and the memory a model lives in there
    (``NodeFacts.model_memory``): its RAM, or where MLX runs on CUDA its GPU's own (``gpu``)."""

    name: str
    memory_bytes: int
    gpu: bool = False

    @property
    def usable_percent(self) -> int:
        return GPU_USABLE_MEMORY_PERCENT if self.gpu else USABLE_MEMORY_PERCENT

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes * self.usable_percent // 100


@dataclass(frozen=True)
class Placement:
    """How a rank group splits a model; ``reason`` is one line for status and diff."""

    parallelism: PlacedParallelism
    layer_split: tuple[int, ...] | None  # pipeline only: layers per rank, in node order
    reason: str


@dataclass(frozen=True)
class KvBudget:
    """The KV cache every node must have room for: ``tokens`` of context in each of ``sequences``."""

    tokens: int
    sequences: int
    origin: str  # where ``tokens`` came from, for messages
    value_bytes: float | None = None  # of each key or value; None: the model's KV dtype


@dataclass(frozen=True)
class NodeLoad:
    """What one node must hold under a placement."""

    node: NodeCapacity
    layers: int
    weight_bytes: int
    kv_bytes: int

    @property
    def needed_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.node.usable_bytes


def place(
    spec: ModelSpec, nodes: list[NodeCapacity], shape: ModelShape, context_length: int | None
) -> Placement:
    """The placement of ``spec`` on ``nodes`` (in rank order), after checking that every node can hold
    its share of the weights and of the KV budget. Raises ``PlacementRefused``."""
    if not nodes:
        raise PlacementRefused("NoNodes", f"{spec.name} is placed on no nodes")
    check_kv_quantization(spec, shape)
    placement = choose_placement(spec, nodes, shape)
    budget = kv_budget(spec, shape, context_length)
    checked = replace(budget, sequences=max(budget.sequences, 1))  # maxBatch unset: one must fit
    check_capacity(spec.name, node_loads(placement, nodes, shape, checked), placement, shape, checked)
    return placement


def check_kv_quantization(spec: ModelSpec, shape: ModelShape) -> None:
    """MLX quantizes each head's keys and values in groups of ``kvGroupSize``: it must divide the
    model's head size."""
    group = spec.serving.kv_group_size or 64
    if spec.serving.kv_bits is not None and shape.head_dim % group:
        raise PlacementRefused(
            "KvGroupSizeDoesNotDivide",
            f"{spec.name}'s heads have {shape.head_dim} values, which MLX cannot quantize in groups of "
            f"{group}: set serving.kvGroupSize to 32, 64 or 128 dividing {shape.head_dim}, or drop kvBits",
        )


def choose_placement(spec: ModelSpec, nodes: list[NodeCapacity], shape: ModelShape) -> Placement:
    """The parallelism for ``spec`` on ``nodes``, without the capacity check."""
    if len(nodes) == 1:
        return Placement("single", None, f"single: one node ({nodes[0].name})")
    if spec.parallelism == "tensor":
        return explicit_tensor(spec.name, len(nodes), shape)
    if spec.parallelism == "pipeline":
        return pipeline(spec.name, nodes, shape, "pipeline: as the manifest asks")
    return automatic(spec.name, nodes, shape)


def automatic(model: str, nodes: list[NodeCapacity], shape: ModelShape) -> Placement:
    """Tensor parallel where it shares the load evenly and the heads allow it, else pipeline."""
    uneven = memory_difference(nodes)
    if uneven:
        return pipeline(model, nodes, shape, f"pipeline: {uneven}")
    heads_problem = heads_do_not_divide(shape, len(nodes))
    if heads_problem:
        return pipeline(model, nodes, shape, f"pipeline: {heads_problem}")
    return Placement(
        "tensor",
        None,
        f"tensor: memory within {TENSOR_MEMORY_TOLERANCE_PERCENT}% and {heads_dividing(shape, len(nodes))}",
    )


def explicit_tensor(model: str, node_count: int, shape: ModelShape) -> Placement:
    problem = heads_do_not_divide(shape, node_count)
    if problem:
        raise PlacementRefused(
            "HeadsDoNotDivide",
            f"{model} cannot run tensor parallel on {node_count} nodes: {problem}; "
            "use parallelism: pipeline (or auto), or a node count that divides the heads",
        )
    return Placement("tensor", None, f"tensor: as the manifest asks; {heads_dividing(shape, node_count)}")


def pipeline(model: str, nodes: list[NodeCapacity], shape: ModelShape, reason: str) -> Placement:
    if shape.num_layers < len(nodes):
        raise PlacementRefused(
            "TooFewLayers",
            f"{model} has {shape.num_layers} layers, fewer than its {len(nodes)} nodes: pipeline parallel "
            "needs at least one layer per node; place it on fewer nodes",
        )
    split = split_layers(shape.num_layers, [node.usable_bytes for node in nodes])
    return Placement("pipeline", split, reason)


def memory_difference(nodes: list[NodeCapacity]) -> str | None:
    """Why the nodes' usable memory is too uneven for tensor parallel, or None when within 10%."""
    largest = max(nodes, key=lambda n: n.usable_bytes)
    smallest = min(nodes, key=lambda n: n.usable_bytes)
    if smallest.usable_bytes * 100 >= largest.usable_bytes * (100 - TENSOR_MEMORY_TOLERANCE_PERCENT):
        return None
    return (
        f"memory differs by more than {TENSOR_MEMORY_TOLERANCE_PERCENT}% ({largest.name} "
        f"{gb(largest.usable_bytes)} GB, {smallest.name} {gb(smallest.usable_bytes)} GB usable)"
    )


def heads_do_not_divide(shape: ModelShape, node_count: int) -> str | None:
    if shape.num_attention_heads % node_count:
        return f"{shape.num_attention_heads} attention heads do not divide by {node_count}"
    if shape.num_key_value_heads % node_count:
        return f"{shape.num_key_value_heads} KV heads do not divide by {node_count}"
    return None


def heads_dividing(shape: ModelShape, node_count: int) -> str:
    if shape.num_key_value_heads == shape.num_attention_heads:
        return f"{shape.num_attention_heads} heads divide by {node_count}"
    return (
        f"{shape.num_attention_heads} attention and {shape.num_key_value_heads} KV heads "
        f"divide by {node_count}"
    )


def split_layers(num_layers: int, memories: list[int]) -> tuple[int, ...]:
    """``num_layers`` split in proportion to ``memories`` by largest remainder (ties to the lower rank),
    then every rank without a layer takes one from the rank furthest above its exact share.
    Exact integer arithmetic, so the same input always gives the same split."""
    weights = [max(memory, 1) for memory in memories]  # a node reporting no memory still counts
    total = sum(weights)
    split = [num_layers * w // total for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(num_layers * weights[i] % total), i))
    for i in by_remainder[: num_layers - sum(split)]:
        split[i] += 1
    for empty in [i for i, layers in enumerate(split) if layers == 0]:
        donor = max(
            (i for i, layers in enumerate(split) if layers > 1),
            key=lambda i: (split[i] * total - num_layers * weights[i], -i),
        )
        split[donor] -= 1
        split[empty] = 1
    return tuple(split)


def kv_budget(spec: ModelSpec, shape: ModelShape, context_length: int | None) -> KvBudget:
    """The context to budget for each of ``serving.maxBatch`` sequences (one, with a quantized KV
    cache, which serves one at a time), where it came from, and the bytes of each quantized value
    (``kvBits`` of it, and a scale and a bias in the model's dtype per group)."""
    serving = spec.serving
    # 0: not set, to be derived from the memory (``place``)
    sequences = (serving.max_batch or 0) if serving.kv_bits is None else 1
    value_bytes = None
    if serving.kv_bits is not None:
        value_bytes = serving.kv_bits / 8 + 2 * shape.kv_dtype_bytes / (serving.kv_group_size or 64)
    if context_length is not None:
        return KvBudget(context_length, sequences, "asked", value_bytes)
    if serving.context_length is not None:
        return KvBudget(serving.context_length, sequences, "serving.contextLength", value_bytes)
    if shape.max_position_embeddings is not None and shape.max_position_embeddings > UNSET_CONTEXT_CAP:
        return KvBudget(
            UNSET_CONTEXT_CAP, sequences, "the model's max_position_embeddings, capped", value_bytes
        )
    if shape.max_position_embeddings is not None:
        return KvBudget(
            shape.max_position_embeddings, sequences, "the model's max_position_embeddings", value_bytes
        )
    return KvBudget(DEFAULT_CONTEXT_TOKENS, sequences, "the default", value_bytes)


def node_loads(
    placement: Placement, nodes: list[NodeCapacity], shape: ModelShape, budget: KvBudget
) -> tuple[NodeLoad, ...]:
    """What each node holds: all of it alone; 1/N of the weights and KV heads with tensor parallel;
    with pipeline parallel, its layers' part of the weights and their KV cache."""
    parts = len(nodes) if placement.parallelism == "tensor" else 1
    layers = placement.layer_split or (shape.num_layers,) * len(nodes)
    return tuple(node_load(node, n, parts, shape, budget) for node, n in zip(nodes, layers, strict=True))


def node_load(node: NodeCapacity, layers: int, parts: int, shape: ModelShape, budget: KvBudget) -> NodeLoad:
    """The load of ``layers`` layers on ``node``, each layer split in ``parts`` by tensor parallel."""
    weights = ceil_div(shape.weight_bytes * layers, shape.num_layers * parts)
    kv_heads = shape.num_key_value_heads // parts
    # A key and a value (2) for every token of every sequence, in each layer and KV head the node runs.
    value_bytes = budget.value_bytes if budget.value_bytes is not None else shape.kv_dtype_bytes
    kv = budget.tokens * budget.sequences * 2 * layers * kv_heads * shape.head_dim * value_bytes
    return NodeLoad(node, layers, weights, int(kv))


def check_capacity(
    model: str, loads: tuple[NodeLoad, ...], placement: Placement, shape: ModelShape, budget: KvBudget
) -> None:
    """Raises ``PlacementRefused`` naming every node whose share does not fit its usable memory."""
    short = [
        describe_shortfall(model, each, share_of(each, placement, shape, len(loads)), budget)
        for each in loads
        if not each.fits
    ]
    if short:
        advice = "lower serving.contextLength or serving.maxBatch, or place it on more nodes"
        raise PlacementRefused("DoesNotFit", "; ".join(short) + f" ({advice})")


def describe_shortfall(model: str, each: NodeLoad, share: str, budget: KvBudget) -> str:
    """ "qwen3-30b needs 17.2 GB of weights + 3.1 GB of KV cache for 32768 tokens × 8 sequences;
    studio-a can give 12.0 GB of its 16.0 GB (75% of memory)"."""
    node = each.node
    return (
        f"{model} needs {gb(each.weight_bytes)} GB of weights + {gb(each.kv_bytes)} GB of KV cache{share} "
        f"for {tokens_phrase(budget)} × {budget.sequences} sequences; {node.name} can give "
        f"{gb(node.usable_bytes)} GB of its {gb(node.memory_bytes)} GB "
        f"({node.usable_percent}% of {'its GPU' if node.gpu else 'memory'})"
    )


def share_of(each: NodeLoad, placement: Placement, shape: ModelShape, node_count: int) -> str:
    if placement.parallelism == "tensor":
        return f" on {each.node.name} (its 1/{node_count} tensor-parallel share)"
    if placement.parallelism == "pipeline":
        return f" on {each.node.name} (its {each.layers} of {shape.num_layers} layers)"
    return ""


def tokens_phrase(budget: KvBudget) -> str:
    """ "32768 tokens", naming where the number came from unless the caller or the manifest chose it."""
    if budget.origin in ("asked", "serving.contextLength"):
        return f"{budget.tokens} tokens"
    return f"{budget.tokens} tokens ({budget.origin}, as serving.contextLength is not set)"


def describe_placement(placement: Placement) -> str:
    """One line for diff and describe: the reason, and for pipeline parallel the layers per rank."""
    if placement.layer_split is None:
        return placement.reason
    return f"{placement.reason}; layers per rank {'/'.join(str(n) for n in placement.layer_split)}"


def gb(size: int) -> str:
    return f"{size / GB:.1f}"


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)
