"""One request's sampled tokens turned into the events its client sees.

The decoder (``decoding``) samples token ids for a whole batch; ``Reply`` takes one sequence's
tokens and adds, layer by layer: text (incremental detokenizing), stop strings matched on that
text, end of turn, each token's log-probability when asked for, usage. Only rank 0 builds replies;
the other ranks decode the same tokens and discard them.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from genmlx.dispatcher.engine.events import (
    EngineEvent,
    Finished,
    FinishReason,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
    Usage,
)
from genmlx.dispatcher.engine.stop_strings import StopStringMatcher


class Reply:
    """The events of one request, built token by token; ``finished`` once its ``Finished`` is out."""

    def __init__(self, tokenizer: TokenizerWrapper, request: GenerationRequest, cached_tokens: int):
        self._request = request
        self._cached_tokens = cached_tokens
        self._text = _TextStream(tokenizer, request.stop)
        self._logprobs = _LogprobRecorder(tokenizer, request.top_logprobs)
        self._eos_ids = tokenizer.eos_token_ids
        self.generated = 0
        self._delivered = 0  # tokens counted by the deltas so far
        self.finished = False

    def add(self, token: int, logprobs: mx.array, end: FinishReason | None) -> list[EngineEvent]:
        """Events for the next sampled ``token``; ``end`` is the decoder's reason to end here, if any
        (``stop`` at an end-of-turn token, ``length`` at the token limit)."""
        self.generated += 1
        if token in self._eos_ids:
            return self._finish("stop", [])
        self._logprobs.record(token, logprobs)
        events: list[EngineEvent] = []
        if delta := self._text.add_token(token):
            events.append(self._delta(delta))
        if self._text.stopped:
            return self._finish("stop", events)
        if end is not None:
            return self._finish(end, events)
        return events

    def cancel(self) -> list[EngineEvent]:
        """The one event that ends a request cancelled before it finished."""
        self.finished = True
        return [Finished("cancelled", self._usage())]

    def _finish(self, reason: FinishReason, events: list[EngineEvent]) -> list[EngineEvent]:
        if not self._text.stopped:
            delta = self._text.finish()
            if delta or self._logprobs.pending:
                events.append(self._delta(delta))
            reason = "stop" if self._text.stopped else reason
        self.finished = True
        events.append(Finished(reason, self._usage(), stop_string=self._text.matched_stop))
        return events

    def _delta(self, text: str) -> TextDelta:
        tokens, self._delivered = self.generated - self._delivered, self.generated
        return TextDelta(text, self._logprobs.take(), tokens)

    def _usage(self) -> Usage:
        return Usage(len(self._request.prompt_tokens), self.generated, self._cached_tokens)


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
