"""What goes into the model thread (``GenerationRequest``) and what comes out (``EngineEvent``).

These are the only types the HTTP layer and the engine share: handlers build a request, the engine
answers with a stream of ``TextDelta`` events closed by exactly one ``Finished`` or ``Failed``, and
the ``Job`` it gives back is the handler's handle on the request (to cancel it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy; ``seed`` makes sampling repeatable."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token already written
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was written
    repetition_penalty: float = 1.0  # CTRL's multiplicative penalty, as mlx-lm and vLLM take it


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to generate, already tokenized."""

    request_id: str
    prompt_tokens: tuple[int, ...]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no log-probabilities; n: the chosen token's and n more
    grammar: str | None = None  # llguidance grammar the output must follow (``constraints``)
    # Prompt positions other conversations share (where the system turns and tools end): the
    # prefix cache's disk tier keeps a snapshot there.
    boundaries: tuple[int, ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token counts in OpenAI's sense; ``completion_tokens`` counts every token generated and
    ``cached_tokens`` the prompt tokens whose state came from the prefix cache."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives (best first)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New text for the client; never part of a stop string. ``logprobs`` covers the tokens generated
    since the previous delta (only when the request asked for them); ``tokens`` counts them (what
    the generation counter adds as they come)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    tokens: int = 0


@dataclass(frozen=True)
class Finished:
    """Generation ended: ``stop`` (end of turn or a stop string), ``length`` or ``cancelled``."""

    reason: FinishReason
    usage: Usage
    stop_string: str | None = None  # which of the request's stop strings ended it, if one did


@dataclass(frozen=True)
class Failed:
    """Generation raised; ``message`` is safe to show the client (no prompt content)."""

    message: str


EngineEvent = TextDelta | Finished | Failed


@dataclass
class StepStats:
    """The model thread's steps since the process started: counted by that thread, read when the
    metrics are scraped (a scrape may catch a step half counted; every count only grows)."""

    steps: int = 0
    seconds: float = 0.0  # spent in steps: admitting, decoding, handing the tokens out
    tokens: int = 0  # decoded: one per sequence generating in a step

    def record(self, seconds: float, tokens: int) -> None:
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens


class Job:
    """A submitted request: the handler may cancel it; the engine delivers its events."""

    def __init__(self, request: GenerationRequest, deliver: Callable[[EngineEvent], None]):
        self.request = request
        self.deliver = deliver
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this job at the next token (or skip it if it has not started)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()
