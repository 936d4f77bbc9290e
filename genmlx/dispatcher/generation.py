"""One request's generation as a generator of typed events, built on mlx-lm's ``generate_step``.

Layers, each adding one concern: ``generate_step`` yields sampled token ids; ``_TextStream`` turns
them into text and applies stop strings; ``generate_events`` adds end-of-turn, cancellation and
usage. The engine only iterates; a batch scheduler can replace it without touching the HTTP layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import TokenizerWrapper

from genmlx.dispatcher.events import EngineEvent, Finished, FinishReason, GenerationRequest, TextDelta, Usage
from genmlx.dispatcher.sampling import make_token_sampler
from genmlx.dispatcher.stop_strings import StopStringMatcher


def generate_events(
    model: Any, tokenizer: TokenizerWrapper, request: GenerationRequest, is_cancelled: Callable[[], bool]
) -> Iterator[EngineEvent]:
    """Generate ``request`` with ``model`` (an mlx-lm model): ``TextDelta`` events, then one ``Finished``.

    ``is_cancelled`` is checked before each token is used, so a cancelled request costs at most one
    more decoding step.
    """
    text = _TextStream(tokenizer, request.stop)
    eos_ids = tokenizer.eos_token_ids
    generated = 0
    reason: FinishReason = "length"
    with closing(_sampled_tokens(model, request)) as tokens:
        for token in tokens:
            if is_cancelled():
                reason = "cancelled"
                break
            generated += 1
            if token in eos_ids:
                reason = "stop"
                break
            if delta := text.add_token(token):
                yield TextDelta(delta)
            if text.stopped:
                reason = "stop"
                break
    if reason != "cancelled" and not text.stopped:
        if delta := text.finish():
            yield TextDelta(delta)
        reason = "stop" if text.stopped else reason
    yield Finished(reason, Usage(prompt_tokens=len(request.prompt_tokens), completion_tokens=generated))


def _sampled_tokens(model: Any, request: GenerationRequest) -> Iterator[int]:
    steps = generate_step(
        mx.array(request.prompt_tokens),
        model,
        max_tokens=request.max_tokens,
        sampler=make_token_sampler(request.sampling),
    )
    with closing(steps):
        for token, _logprobs in steps:
            yield int(token)


class _TextStream:
    """Token ids in, client-safe text out: detokenizes incrementally and applies stop strings."""

    def __init__(self, tokenizer: TokenizerWrapper, stop: tuple[str, ...]):
        self._detokenizer = tokenizer.detokenizer  # a fresh copy per request
        self._stop = StopStringMatcher(stop)

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def add_token(self, token: int) -> str:
        self._detokenizer.add_token(token)
        return self._stop.feed(self._detokenizer.last_segment)

    def finish(self) -> str:
        """The text held back until the end (partial characters, possible stop-string starts)."""
        self._detokenizer.finalize()
        text = self._stop.feed(self._detokenizer.last_segment)
        return text if self._stop.stopped else text + self._stop.flush()
