"""One request's generation as a generator of typed events, built on mlx-lm's ``generate_step``.

Layers, each adding one concern: ``generate_step`` yields sampled token ids; ``_TextStream`` turns
them into text and applies stop strings; ``generate_events`` adds end-of-turn, cancellation,
usage and, when asked, each token's log-probability. The engine only iterates; a batch scheduler
can replace it without touching the HTTP layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import TokenizerWrapper

from genmlx.dispatcher.events import (
    EngineEvent,
    Finished,
    FinishReason,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
    Usage,
)
from genmlx.dispatcher.sampling import make_logits_processors, make_token_sampler
from genmlx.dispatcher.stop_strings import StopStringMatcher


def generate_events(
    model: Any, tokenizer: TokenizerWrapper, request: GenerationRequest, is_cancelled: Callable[[], bool]
) -> Iterator[EngineEvent]:
    """Generate ``request`` with ``model`` (an mlx-lm model): ``TextDelta`` events, then one ``Finished``.

    ``is_cancelled`` is checked before each token is used, so a cancelled request costs at most one
    more decoding step.
    """
    text = _TextStream(tokenizer, request.stop)
    logprobs = _LogprobRecorder(tokenizer, request.top_logprobs)
    eos_ids = tokenizer.eos_token_ids
    generated = 0
    reason: FinishReason = "length"
    with closing(_sampled_tokens(model, request)) as tokens:
        for token, token_logprobs in tokens:
            if is_cancelled():
                reason = "cancelled"
                break
            generated += 1
            if token in eos_ids:
                reason = "stop"
                break
            logprobs.record(token, token_logprobs)
            if delta := text.add_token(token):
                yield TextDelta(delta, logprobs.take())
            if text.stopped:
                reason = "stop"
                break
    if reason != "cancelled" and not text.stopped:
        delta = text.finish()
        if delta or logprobs.pending:
            yield TextDelta(delta, logprobs.take())
        reason = "stop" if text.stopped else reason
    usage = Usage(prompt_tokens=len(request.prompt_tokens), completion_tokens=generated)
    yield Finished(reason, usage, stop_string=text.matched_stop)


def _sampled_tokens(model: Any, request: GenerationRequest) -> Iterator[tuple[int, mx.array]]:
    steps = generate_step(
        mx.array(request.prompt_tokens),
        model,
        max_tokens=request.max_tokens,
        sampler=make_token_sampler(request.sampling),
        logits_processors=make_logits_processors(request.sampling),
    )
    with closing(steps):
        for token, logprobs in steps:
            yield int(token), logprobs


class _LogprobRecorder:
    """Collects each token's log-probability (and the top alternatives) until a delta carries them;
    does nothing when the request did not ask for log-probabilities."""

    def __init__(self, tokenizer: TokenizerWrapper, top_logprobs: int | None):
        self._tokenizer = tokenizer
        self._top = top_logprobs
        self.pending: list[TokenLogprob] = []

    def record(self, token: int, logprobs: mx.array) -> None:
        if self._top is None:
            return
        top: tuple[tuple[str, float], ...] = ()
        if self._top > 0:
            best = mx.argpartition(-logprobs, kth=self._top - 1)[: self._top].tolist()
            values = logprobs[mx.array(best)].tolist()
            top = tuple(
                sorted(((self._text(t), v) for t, v in zip(best, values, strict=True)), key=lambda p: -p[1])
            )
        self.pending.append(TokenLogprob(self._text(token), logprobs[token].item(), top))

    def take(self) -> tuple[TokenLogprob, ...]:
        taken, self.pending = tuple(self.pending), []
        return taken

    def _text(self, token: int) -> str:
        return self._tokenizer.decode([token])


class _TextStream:
    """Token ids in, client-safe text out: detokenizes incrementally and applies stop strings."""

    def __init__(self, tokenizer: TokenizerWrapper, stop: tuple[str, ...]):
        self._detokenizer = tokenizer.detokenizer  # a fresh copy per request
        self._stop = StopStringMatcher(stop)

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    @property
    def matched_stop(self) -> str | None:
        return self._stop.matched

    def add_token(self, token: int) -> str:
        self._detokenizer.add_token(token)
        return self._stop.feed(self._detokenizer.last_segment)

    def finish(self) -> str:
        """The text held back until the end (partial characters, possible stop-string starts)."""
        self._detokenizer.finalize()
        text = self._stop.feed(self._detokenizer.last_segment)
        return text if self._stop.stopped else text + self._stop.flush()
