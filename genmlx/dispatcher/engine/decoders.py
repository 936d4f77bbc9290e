"""Which decoder a model gets (``make_decoder``): continuous batching (``decoding.BatchDecoder``)
where every cache of the model can be batched and the KV cache is not quantized, else
``SequentialDecoder``, one sequence at a time (``solo.Solo``, which quantizes the KV cache where
asked), with the same prefix cache and disk tier as the batch."""

from __future__ import annotations

import logging
from typing import Any

from mlx_lm.models.cache import make_prompt_cache

from genmlx.dispatcher.engine.constraints import GrammarConstraints, RequestRow, constraints_for
from genmlx.dispatcher.engine.decoding import (
    BatchDecoder,
    Decoder,
    DecoderSettings,
    Sampled,
    prefix_cache_for,
)
from genmlx.dispatcher.engine.events import GenerationRequest
from genmlx.dispatcher.engine.fixed_decode import fixed_decode_for
from genmlx.dispatcher.engine.sampling import make_logits_processors
from genmlx.dispatcher.engine.solo import Solo

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
        return SequentialDecoder(model, eos_ids, settings, constraints)
    if all(hasattr(cache, "merge") for cache in make_prompt_cache(model)):
        return BatchDecoder(model, eos_ids, settings, constraints)
    log.info("this model's caches cannot be batched by mlx-lm: one request at a time")
    return SequentialDecoder(model, eos_ids, settings, constraints)


class SequentialDecoder:
    """One sequence at a time, decoded by itself, with a prefix cache."""

    capacity = 1

    def __init__(
        self,
        model: Any,
        eos_ids: set[int],
        settings: DecoderSettings,
        constraints: GrammarConstraints | None = None,
    ):
        self._model = model
        self._eos_ids = eos_ids
        self._constraints = constraints
        self._quantize = settings.quantization
        self._fixed = None if self._quantize else fixed_decode_for(model)
        self._prefill_chunk = settings.prefill_chunk_alone  # one sequence at a time: always alone
        self._prefixes = prefix_cache_for(model, settings)
        self._solo: Solo | None = None
        self._boundaries: tuple[int, ...] = ()

    @property
    def active(self) -> int:
        return 0 if self._solo is None else 1

    @property
    def cache_entries(self) -> int:
        return len(self._prefixes)

    def join(self, uid: int, request: GenerationRequest, cached_tokens: int | None = None) -> int:
        """Start ``request`` as sequence ``uid``; how many prompt tokens the prefix cache supplied
        (exactly ``cached_tokens``, rank 0's answer, on the other ranks)."""
        if self._solo is not None:
            raise RuntimeError("this decoder generates one sequence at a time")
        prompt = list(request.prompt_tokens)
        reused = self._prefixes.take(prompt, cached_tokens)
        cached = reused.tokens if reused else 0
        self._boundaries = (*request.boundaries, len(prompt) - 1)
        self._solo = Solo(
            uid,
            self._model,
            reused.cache if reused else make_prompt_cache(self._model),
            prompt[:cached],
            prompt[cached:],
            RequestRow.of(request, self._constraints),
            request.max_tokens,
            processors=make_logits_processors(request.sampling),
            quantize=self._quantize,
            fixed=self._fixed,
            stops=self._boundaries if self._prefixes.boundaries_kept else (),
            on_stop=self._prefixes.put_boundary,
        )
        return cached

    def leave(self, uid: int) -> None:
        if self._solo is not None and self._solo.uid == uid:
            self._end()

    def step(self) -> list[Sampled]:
        if self._solo is None:
            return []
        sampled = self._solo.step(self._eos_ids, self._prefill_chunk)
        if sampled is None:
            return []
        if sampled.end is not None:
            self._end()
        return [sampled]

    def trim_cache(self, entries: int) -> None:
        self._prefixes.trim(entries)

    def offer_disk(self, prompt: list[int], limit: int | None = None, beyond: int = 0) -> int:
        return self._prefixes.offer(prompt, limit, beyond)

    def memory_tokens(self, prompt: list[int]) -> int:
        return self._prefixes.memory_tokens(prompt)

    def _end(self) -> None:
        """The sequence ends here (a step under way is finished and its token dropped); what it
        read stays in the prefix cache."""
        solo, self._solo = self._solo, None
        solo.settle(self._eos_ids)
        self._prefixes.put(solo.read, solo.cache, self._boundaries)
