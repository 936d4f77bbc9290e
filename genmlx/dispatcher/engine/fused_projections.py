"""Sibling projections of the same rows multiplied as one layer: a block's query, key and value
projections, and its MLP's gate and up projections.

A decode step calls each of them with the same rows, so each is a product of its own: a kernel
launch, and its rows read again. ``fuse_projections`` stacks each such group's weights in one layer
of the same kind (outputs one group member after another, inputs shared), and puts in each
member's place a ``Part`` that returns its own columns of that layer's product: the first member
called with some rows computes the whole product, the others called with the same rows take their
columns of it. A decode step of Llama 3.2 1B's shape then makes 65 quantized products instead of
113. Each output column is still the dot product of the same rows with the same weights, by a
wider call of the same operation: on the CPU the same numbers (tested, logits and greedy tokens,
in several of mlx-lm's model families, plain and quantized); a GPU's matrix kernels may sum a
wider product in another order, as they may a batch's rows against one sequence's.

A tensor group's members are shards of their outputs (mlx's all-to-sharded layers), each rank
holding its own heads' rows: a rank stacks its own shards, which gives the same columns of the
same heads. The stacked layer takes the group's place in the module tree (``fused_q_k_v_proj``,
``fused_gate_up_proj``), so the quantized layers' batching and measured copies
(``quantized_batches``) see it as any layer; apply this first. Left as they are: groups whose
members differ in kind, quantization, inputs or in having a bias, layers of other classes (LoRA,
a model's own), and models without such groups. Each group's stacked weights are computed before
its members' are let go, so loading peaks at one group's weights above the model's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import AllToShardedLinear, QuantizedAllToShardedLinear

__all__ = ["GROUPS", "Part", "fuse_projections"]

log = logging.getLogger(__name__)

# Members of a group, as mlx-lm's models name them, in the order their calls come.
GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_projections(model: nn.Module) -> int:
    """Stack each group of sibling projections of ``model`` in one layer (see the module); how many
    groups were stacked."""
    fused = 0
    for _, parent in list(model.named_modules()):
        for names in GROUPS:
            members = [parent.get(name) for name in names]
            stacked = _stacked(members)
            if stacked is None:
                continue
            mx.eval(stacked.parameters())  # before the members' weights go
            parent["fused_" + "_".join(name.removesuffix("_proj") for name in names) + "_proj"] = stacked
            shared, start = _Shared(stacked, len(names)), 0
            for name, member in zip(names, members, strict=True):
                stop = start + member["weight"].shape[0]
                parent[name] = Part(shared, start, stop)
                start = stop
            fused += 1
    if fused:
        log.info("%d groups of projections of the same rows multiply as one layer each", fused)
    return fused


class _Shared:
    """A stacked layer and its last product: ``rows`` in, ``product`` out, kept until each of the
    ``members`` took its columns (then let go, so that a long prompt's products do not outlive the
    block)."""

    __slots__ = ("layer", "members", "rows", "product", "taken")

    def __init__(self, layer: nn.Module, members: int):
        self.layer, self.members = layer, members
        self.rows: mx.array | None = None
        self.product: mx.array | None = None
        self.taken = 0

    def columns(self, x: mx.array, start: int, stop: int) -> mx.array:
        if self.rows is not x:
            self.rows, self.product, self.taken = x, self.layer(x), 0
        columns = self.product[..., start:stop]
        self.taken += 1
        if self.taken == self.members:
            self.rows = self.product = None
        return columns


class Part(nn.Module):
    """One member of a stacked group: columns ``start`` to ``stop`` of the stacked layer's product.
    It holds no parameters (the stacked layer is its parent's), so the model's are counted once."""

    def __init__(self, shared: _Shared, start: int, stop: int):
        super().__init__()
        object.__setattr__(self, "_shared", shared)
        object.__setattr__(self, "_span", (start, stop))

    @property
    def stacked(self) -> nn.Module:
        return self._shared.layer

    def __call__(self, x: mx.array) -> mx.array:
        return self._shared.columns(x, *self._span)

    def _extra_repr(self) -> str:
        return f"columns {self._span[0]} to {self._span[1]} of {type(self.stacked).__name__}"


_QUANTIZED = (nn.QuantizedLinear, QuantizedAllToShardedLinear)
_STACKABLE = (nn.Linear, *_QUANTIZED, AllToShardedLinear)
# What a layer of these kinds keeps beside its parameters, and a stacked one takes from its members.
_SETTINGS = ("group_size", "bits", "mode", "group")


def _stacked(members: Sequence[object]) -> nn.Module | None:
    """One layer whose weight is the ``members``' stacked (their outputs one after another), or None
    where they cannot be stacked."""
    first = members[0]
    kind = type(first)
    if kind not in _STACKABLE or any(type(m) is not kind for m in members):
        return None
    settings = [name for name in _SETTINGS if hasattr(first, name)]
    if any(getattr(m, name) != getattr(first, name) for m in members for name in settings):
        return None  # quantized otherwise, or a shard of another group
    if any(m.keys() != first.keys() for m in members):
        return None  # a bias on some only
    if len({m["weight"].shape[1:] for m in members}) > 1:
        return None
    stacked = kind.__new__(kind)
    nn.Module.__init__(stacked)
    for name in settings:
        setattr(stacked, name, getattr(first, name))
    for name in first:
        stacked[name] = mx.concatenate([m[name] for m in members], axis=0)
    if kind in _QUANTIZED:
        stacked.freeze()  # as mlx's own quantized layers: the packed weights are not trained
    return stacked
