"""One sequence decoded by itself on plain caches (``Solo``), as mlx-lm's ``generate_step`` decodes:
one step ahead, so building one step's graph overlaps computing the other's. ``BatchDecoder`` runs
a sequence this way while nothing else decodes; ``SequentialDecoder`` runs every sequence this way.

Beyond ``generate_step``, a ``Solo`` knows exactly which tokens its cache holds (``read``), so the
cache can go to the prefix cache where it stands; it stops reading the prompt at ``stops`` (the
boundaries whose state the prefix cache keeps whole, for caches that cannot be cut back to them
later) and hands that state to ``on_stop``; it quantizes the KV cache after every forward pass
where asked (``KvQuantization``), as ``generate_step`` does with ``kv_bits``; and, given its
decoder's ``fixed_decode.FixedDecode``, it decodes through one compiled step per token over fixed
KV buffers, its cache back in plain layers when it settles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from genmlx.dispatcher.engine.constraints import RequestRow
from genmlx.dispatcher.engine.fixed_decode import FixedDecode

End = Literal["stop", "length"]
CLEAR_CACHE_EVERY = 256  # tokens a sequence alone decodes between releases of MLX's buffer cache


@dataclass(frozen=True)
class Sampled:
    """One token of sequence ``uid``; ``end`` when the decoder ended the sequence with it."""

    uid: int
    token: int
    logprobs: mx.array
    end: End | None


@dataclass(frozen=True)
class KvQuantization:
    """mlx-lm's quantized KV cache: every plain ``KVCache`` layer becomes a ``QuantizedKVCache`` of
    ``bits`` after the first forward pass (layers of other kinds, such as sliding windows, stay as
    they are: mlx-lm quantizes only plain ones)."""

    bits: int
    group_size: int = 64

    def __call__(self, cache: list[Any]) -> None:
        for i, layer in enumerate(cache):
            if type(layer) is KVCache:
                cache[i] = layer.to_quantized(group_size=self.group_size, bits=self.bits)


@dataclass
class _Ahead:
    """A decoding step already under way: ``fed`` went into the model, ``token`` is being sampled."""

    fed: mx.array
    token: mx.array
    logprobs: mx.array


@dataclass
class Solo:
    """``read`` are the tokens whose KV state ``cache`` holds, ``unread`` the ones still to feed
    (the prompt's rest, then the last token sampled). ``settle`` ends any step under way so that
    the sequence can move into a batch (or its cache into the prefix cache) exactly where it
    stands. ``processors`` are mlx-lm logits processors (penalties), given every token so far."""

    uid: int
    model: Any
    cache: list[Any]
    read: list[int]
    unread: list[int]
    row: RequestRow
    max_tokens: int
    processors: list = field(default_factory=list)
    quantize: KvQuantization | None = None
    fixed: FixedDecode | None = None  # the decoder's compiled step, for decoding (not with ``quantize``)
    stops: Sequence[int] = ()  # prompt positions to stop reading at, for ``on_stop``
    on_stop: Callable[[list[int], list[Any]], None] | None = None
    generated: int = 0
    ahead: _Ahead | None = field(default=None, repr=False)
    history: mx.array | None = field(default=None, repr=False)  # every token fed, for ``processors``

    def step(self, eos_ids: set[int], prefill_chunk: int) -> Sampled | None:
        """Read one chunk of the prompt (None) or decode the next token."""
        if len(self.unread) > 1:
            self._read_chunk(prefill_chunk)
            return None
        current = self.ahead or self._launch(mx.array(self.unread[-1:]))
        self.unread = []
        self.ahead = None
        if self.generated + 1 < self.max_tokens:
            self.ahead = self._launch(current.token)
        return self._sampled(current, eos_ids)

    def settle(self, eos_ids: set[int]) -> Sampled | None:
        """Finish the step under way, if one is; the token it sampled (now in ``unread``). The
        cache is plain ``KVCache`` layers again afterwards (out of ``fixed``'s buffers)."""
        sampled = None
        if self.ahead is not None:
            current, self.ahead = self.ahead, None
            sampled = self._sampled(current, eos_ids)
            self.unread = [sampled.token]
        if self.fixed is not None and self.fixed.holder is self:
            self.cache = self.fixed.release()
        return sampled

    def _read_chunk(self, prefill_chunk: int) -> None:
        """Feed up to ``prefill_chunk`` prompt tokens (never the last), ending at the next stop."""
        end = len(self.read) + min(prefill_chunk, len(self.unread) - 1)
        end = min([end, *(s for s in self.stops if len(self.read) < s < end)])
        chunk = self.unread[: end - len(self.read)]
        self.model(mx.array(chunk)[None], cache=self.cache)
        if self.quantize:
            self.quantize(self.cache)
        mx.eval([c.state for c in self.cache])
        if self.processors:
            self.history = self._fed(mx.array(chunk))
        self.read += chunk
        self.unread = self.unread[len(chunk) :]
        if self.on_stop and len(self.read) in self.stops:
            self.on_stop(list(self.read), self.cache)

    def _launch(self, fed: mx.array) -> _Ahead:
        logits = self._forward(fed)
        if self.processors:
            self.history = self._fed(fed)
            for processor in self.processors:
                logits = processor(self.history, logits)
        if self.quantize:
            self.quantize(self.cache)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = self.row(logprobs)
        mx.async_eval(token, logprobs)
        return _Ahead(fed, token, logprobs)

    def _forward(self, fed: mx.array) -> mx.array:
        """The logits of the step that feeds ``fed``: through ``fixed``'s compiled step where it
        serves (the cache moves into its buffers at the first decode step), else the model's call."""
        fixed = self.fixed
        # A cache still empty (a one-token prompt's first step) has nothing to size the buffers by.
        if (
            fixed is None
            or fixed.usable is False
            or not (fixed.holder is self or fixed.hold(self, self.cache))
        ):
            return self.model(fed[None], cache=self.cache)[:, -1, :]
        logits = fixed.logits(fed, self.cache)
        if fixed.holder is self:  # the buffers hold the sequence until ``settle``
            self.cache = []  # the plain layers would only keep their memory meanwhile
        return logits

    def _fed(self, tokens: mx.array) -> mx.array:
        """Every token fed so far, ``tokens`` last (the prompt's reused start included): called
        before ``tokens`` count as ``read``."""
        before = self.history if self.history is not None else mx.array(self.read, dtype=mx.int32)
        return mx.concatenate([before, tokens.astype(mx.int32)])

    def _sampled(self, current: _Ahead, eos_ids: set[int]) -> Sampled:
        """``current``'s token, once computed; what it fed is now in the cache."""
        token = current.token.item()
        self.read.append(current.fed.item())
        self.generated += 1
        if self.generated % CLEAR_CACHE_EVERY == 0:  # as generate_step does: return freed buffers
            mx.clear_cache()
        end: End | None = (
            "stop" if token in eos_ids else "length" if self.generated >= self.max_tokens else None
        )
        return Sampled(self.uid, token, current.logprobs[0], end)
