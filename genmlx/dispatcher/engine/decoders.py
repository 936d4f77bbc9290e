"""Which decoder a model gets (``make_decoder``): continuous batching (``decoding.BatchDecoder``)
where every cache of the model can be batched and the KV cache is not quantized, else
``SequentialDecoder``, one sequence at a time through mlx-lm's ``generate_step`` (which quantizes
the KV cache where asked), with no prefix cache."""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from genmlx.dispatcher.engine.constraints import GrammarConstraints, RequestRow, constraints_for
from genmlx.dispatcher.engine.decoding import BatchDecoder, Decoder, DecoderSettings, End, Sampled
from genmlx.dispatcher.engine.events import GenerationRequest
from genmlx.dispatcher.engine.sampling import make_logits_processors

log = logging.getLogger(__name__)


def make_decoder(model: Any, eos_ids: set[int], settings: DecoderSettings, tokenizer: Any = None) -> Decoder:
    """A ``BatchDecoder`` when every cache of ``model`` can be batched, else a ``SequentialDecoder``;
    with the ``tokenizer``, requests may carry a grammar."""
    constraints = constraints_for(tokenizer) if tokenizer is not None else None
    if settings.kv_bits is not None:
        log.info(
            "KV cache quantized to %d bits: one request at a time, since mlx-lm batches no quantized cache",
            settings.kv_bits,
        )
        return SequentialDecoder(model, constraints, (settings.kv_bits, settings.kv_group_size))
    if all(hasattr(cache, "merge") for cache in make_prompt_cache(model)):
        return BatchDecoder(model, eos_ids, settings, constraints)
    return SequentialDecoder(model, constraints)


class SequentialDecoder:
    """One sequence at a time through ``generate_step``, for models whose caches cannot batch."""

    capacity = 1
    cache_entries = 0

    def __init__(
        self,
        model: Any,
        constraints: GrammarConstraints | None = None,
        quantized_kv: tuple[int, int] | None = None,
    ):
        self._model = model
        self._constraints = constraints
        # (bits, group size) of a KV cache quantized from the first token, as mlx-lm's generate_step does it
        self._kv = (
            {"kv_bits": quantized_kv[0], "kv_group_size": quantized_kv[1], "quantized_kv_start": 0}
            if quantized_kv
            else {}
        )
        self._uid: int | None = None
        self._steps: Generator[tuple[Any, mx.array]] | None = None
        self._left = 0

    @property
    def active(self) -> int:
        return 0 if self._uid is None else 1

    def join(self, uid: int, request: GenerationRequest, cached_tokens: int | None = None) -> int:
        from mlx_lm.generate import generate_step

        if self._uid is not None:
            raise RuntimeError("this decoder generates one sequence at a time")
        self._uid, self._left = uid, request.max_tokens
        self._steps = generate_step(
            mx.array(request.prompt_tokens),
            self._model,
            max_tokens=request.max_tokens,
            sampler=RequestRow.of(request, self._constraints),
            logits_processors=make_logits_processors(request.sampling),
            **self._kv,
        )
        return 0

    def leave(self, uid: int) -> None:
        if uid == self._uid:
            self._end()

    def step(self) -> list[Sampled]:
        if self._uid is None:
            return []
        uid = self._uid
        token, logprobs = next(self._steps)
        self._left -= 1
        end: End | None = "length" if self._left == 0 else None
        if end:
            self._end()
        return [Sampled(uid, int(token), logprobs, end)]

    def trim_cache(self, entries: int) -> None:
        pass

    def offer_disk(self, prompt: list[int], limit: int | None = None, beyond: int = 0) -> int:
        return 0  # no prefix cache, so no disk tier

    def memory_tokens(self, prompt: list[int]) -> int:
        return 0

    def _end(self) -> None:
        steps, self._uid, self._steps = self._steps, None, None
        steps.close()
