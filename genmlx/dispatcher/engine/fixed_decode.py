"""A sequence decoded by itself through one compiled graph per step (``FixedDecode``).

A decode step of one sequence calls the model with one token and its KV cache. mlx-lm's
``KVCache`` writes the token's keys and values at its offset, a Python integer, and hands the
attention the keys up to it, so every step's graph differs and Python builds it anew, module by
module (on an H100 with Llama 3.2 1B's shape in 4 bits, about 0.7 ms of a 2.3 ms step, the device
waiting meanwhile). Here the sequence's keys and values live in buffers of a fixed capacity,
written at an offset held in an array, and the attention reads the whole buffer through a mask
that hides what lies past the offset (mlx-lm's models take an array offset for their rotary
embeddings and a cache's own mask, as they do for a batch's caches). A step's graph is then the
same from one step to the next, and ``mx.compile`` traces the model's call once per capacity and
replays it: no Python per module, and runs of element-wise operations fused. The buffers grow by
256 positions when full, as ``KVCache`` grows (a new capacity is traced once per process).

A decoder keeps one ``FixedDecode`` for the sequences it decodes alone (``solo.Solo``), one at a
time: a sequence's cache moves into the buffers at its first decode step (``hold``) and back into
plain ``KVCache`` layers when it settles (``release``), so the prefix cache and the batch take it
as before. It is used where every layer's cache is a plain ``KVCache`` and the model is not split
across ranks (its collectives are left to the plain call). The first step it decodes is also
decoded the plain way and the logits compared: a model whose attention ignored the cache's mask
would read the buffer's empty rest, and one whose call cannot be traced fails there; either way
the decoder keeps the plain call from then on and the log says why.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache

from genmlx.dispatcher.engine.compiled_decode import holds_shards

__all__ = ["STEP", "FixedDecode", "fixed_decode_for"]

log = logging.getLogger(__name__)

STEP = 256  # positions the buffers grow by, as KVCache's
# How far the compiled step's logits may be from the plain call's on the first step, as a share of
# the largest. The two sum the attention over different lengths (the whole buffer, masked, against
# the offset's keys), which a GPU's kernels may round differently (on this project's CPU they came
# out identical, in float32 and bfloat16); attending to the buffer's empty rest moves them by far
# more.
TOLERANCE = 0.05


def fixed_decode_for(model: nn.Module) -> FixedDecode | None:
    """A ``FixedDecode`` for ``model``, or None where it does not apply (see the module)."""
    if any(type(cache) is not KVCache for cache in make_prompt_cache(model)):
        return None
    if getattr(getattr(model, "model", model), "pipeline_size", 1) > 1:
        return None  # a pipeline's ranks pass activations to each other within the call
    if holds_shards(model):
        return None  # a tensor group's products sum across the ranks within the call
    return FixedDecode(model)


class _Buffers:
    """One layer's keys and values as the model's attention sees a cache: buffers of a fixed
    capacity and an offset in an array, all in ``state`` (what the compiled step reads and writes)."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: dict[str, mx.array] = {}

    @property
    def offset(self) -> mx.array:
        return self.state["offset"]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        state = self.state
        at = state["offset"].reshape(1)
        state["keys"] = mx.slice_update(state["keys"], keys, at, axes=(2,))
        state["values"] = mx.slice_update(state["values"], values, at, axes=(2,))
        state["offset"] = state["offset"] + keys.shape[2]
        return state["keys"], state["values"]

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        """The positions of the buffer a token at the offset sees: those up to it (and, with a
        window, the ``window_size`` last of them); the token's own is written before attention."""
        if n != 1:
            raise ValueError("fixed buffers decode one token at a time")
        positions, offset = mx.arange(self.state["keys"].shape[2]), self.state["offset"]
        seen = positions <= offset
        if window_size is not None:
            seen = seen & (positions > offset - window_size)
        return seen[None, None, None, :]


class FixedDecode:
    """One compiled decode step of ``model`` over fixed buffers, for one sequence at a time (see
    the module). ``usable`` is None until the first step was checked, then whether it passed."""

    def __init__(self, model: nn.Module):
        self._model = model
        self._layers = [_Buffers() for _ in make_prompt_cache(model)]
        states = [layer.state for layer in self._layers]
        self._compiled = mx.compile(self._logits, inputs=states, outputs=states)
        self.usable: bool | None = None
        self.holder: object | None = None
        self._length = 0  # positions the buffers hold
        self._capacity = 0

    def _logits(self, token: mx.array) -> mx.array:
        return self._model(token[None], cache=self._layers)[:, -1, :]

    def hold(self, holder: object, cache: list[Any]) -> bool:
        """Move ``cache`` (plain ``KVCache`` layers, left as they are) into the buffers, for
        ``holder``; False, holding nothing, while the cache is empty (no keys to size them by)."""
        length = cache[0].offset
        if length == 0 or cache[0].keys is None:
            return False
        self._capacity = (length // STEP + 1) * STEP  # room for the next token at least
        for layer, plain in zip(self._layers, cache, strict=True):
            layer.state["keys"] = _placed(plain.keys[..., :length, :], self._capacity)
            layer.state["values"] = _placed(plain.values[..., :length, :], self._capacity)
            layer.state["offset"] = mx.array(length, dtype=mx.int32)
        self._length, self.holder = length, holder
        return True

    def logits(self, token: mx.array, cache: list[Any]) -> mx.array:
        """The logits of the step that feeds ``token`` (shape (1,)); the first step ever is
        checked against the plain call on ``cache``, which it also advances (see the module)."""
        if self._length == self._capacity:
            self._grow()
        if token.dtype != mx.uint32:  # a prompt's last token; sampled ones are (a new dtype retraces)
            token = token.astype(mx.uint32)
        if self.usable is None:
            return self._checked(token, cache)
        self._length += 1
        return self._compiled(token)

    def release(self) -> list[KVCache]:
        """The held sequence's cache as plain ``KVCache`` layers; the buffers are let go."""
        caches = []
        for layer in self._layers:
            cache = KVCache()  # as its own writes leave it: buffers that may run past the offset
            cache.keys, cache.values, cache.offset = layer.state["keys"], layer.state["values"], self._length
            caches.append(cache)
        self._let_go()
        return caches

    def _checked(self, token: mx.array, cache: list[Any]) -> mx.array:
        plain = self._model(token[None], cache=cache)[:, -1, :]
        try:
            fixed = self._compiled(token)
            far = mx.max(mx.abs(fixed.astype(mx.float32) - plain.astype(mx.float32))).item()
        except Exception as e:  # a model whose call cannot be traced keeps the plain one
            self._give_up(f"its call could not be compiled ({type(e).__name__}: {e})")
            return plain
        if not far <= TOLERANCE * max(1.0, mx.max(mx.abs(plain)).item()):
            self._give_up(f"its logits were {far:.3g} from the plain call's on the first step")
            return plain
        self.usable = True
        self._length += 1
        log.info("a sequence decoded alone runs one compiled step per token over fixed buffers")
        return fixed

    def _give_up(self, reason: str) -> None:
        log.warning("a sequence decoded alone keeps the plain step: %s", reason)
        self.usable = False
        self._let_go()

    def _let_go(self) -> None:
        for layer in self._layers:
            layer.state.clear()
        self.holder, self._length, self._capacity = None, 0, 0

    def _grow(self) -> None:
        self._capacity += STEP
        for layer in self._layers:
            for name in ("keys", "values"):
                layer.state[name] = _placed(layer.state[name], self._capacity)


def _placed(array: mx.array, capacity: int) -> mx.array:
    """``array`` (batch, heads, positions, dims) at the start of zeros ``capacity`` positions long."""
    batch, heads, positions, dims = array.shape
    rest = mx.zeros((batch, heads, capacity - positions, dims), dtype=array.dtype)
    return mx.concatenate([array, rest], axis=2)
