"""Each block's feed-forward part compiled for the shapes a decode step gives it.

A step of B decoding sequences reaches every block's MLP as (B, 1, D): the same few shapes step
after step. Python builds each call's graph anew, module by module and layer by layer (on a 16-layer
model about a tenth of a step's graph building on this project's CPU); ``mx.compile`` traces the
call once for a shape and afterwards hands MLX the traced graph from its own code. The MLP is the
part of a block whose inputs are only its rows: the attention around it writes the KV cache at an
offset that changes every step, which a trace would bake in.

``compile_decode_mlps`` gives each block's ``mlp`` a call that takes the compiled graph for rows of
one token per sequence (a decode step's; a prompt chunk's lengths vary and keep the plain call), one
trace per batch size. The graph holds the same operations on the same weights (compiling fuses
only runs of element-wise operations, and an MLP has none beyond the activation mlx-lm compiles
already), so the outputs are the same (tested, with the tokens of greedy decoding). Left as they
are: a tensor group's MLPs (their last product sums across the ranks), modules whose call is not
a plain function of its rows, and, after a trace fails, that MLP (logged once). Applied after the
quantized layers are set (``quantized_batches``): a trace keeps the arrays it read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import (
    AllToShardedLinear,
    QuantizedAllToShardedLinear,
    QuantizedShardedToAllLinear,
    ShardedToAllLinear,
)

__all__ = ["compile_decode_mlps", "holds_shards"]

log = logging.getLogger(__name__)

_SHARDED = (AllToShardedLinear, ShardedToAllLinear, QuantizedAllToShardedLinear, QuantizedShardedToAllLinear)


def compile_decode_mlps(model: nn.Module) -> int:
    """Give each of ``model``'s blocks' MLPs a compiled call for decode steps (see the module);
    how many it changed."""
    changed = 0
    for block in getattr(model, "layers", None) or ():
        mlp = getattr(block, "mlp", None) if isinstance(block, nn.Module) else None
        if not isinstance(mlp, nn.Module) or holds_shards(mlp) or isinstance(mlp, _DecodeCompiled):
            continue
        plain = type(mlp).__call__
        mlp.__class__ = _compiled_class(type(mlp))
        object.__setattr__(mlp, "_plain", partial(plain, mlp))
        object.__setattr__(mlp, "_compiled", mx.compile(mlp._plain))
        changed += 1
    if changed:
        log.info("%d MLPs run compiled graphs in decode steps", changed)
    return changed


def holds_shards(module: nn.Module) -> bool:
    """Whether ``module`` holds a tensor group's sharded layers (whose products sum across ranks)."""
    return any(isinstance(m, _SHARDED) for _, m in module.named_modules())


class _DecodeCompiled:
    """Mixed in before an MLP's own class: the call below, its own for anything else."""

    _plain: Callable[..., mx.array]
    _compiled: Callable[[mx.array], mx.array] | None

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        compiled = self._compiled
        if compiled is None or args or kwargs or x.ndim != 3 or x.shape[1] != 1:
            return self._plain(x, *args, **kwargs)
        try:
            return compiled(x)
        except Exception:  # an MLP compile cannot trace keeps its plain call
            log.exception("%s cannot run compiled; it keeps its plain call", type(self).__name__)
            object.__setattr__(self, "_compiled", None)
            return self._plain(x)


_CLASSES: dict[type, type] = {}


def _compiled_class(kind: type) -> type:
    """``kind`` with ``_DecodeCompiled``'s call: one class per MLP class, made once."""
    if kind not in _CLASSES:
        _CLASSES[kind] = type(kind.__name__, (_DecodeCompiled, kind), {"__module__": kind.__module__})
    return _CLASSES[kind]
