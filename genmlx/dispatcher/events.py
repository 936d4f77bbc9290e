"""What goes into the model thread (``GenerationRequest``) and what comes out (``EngineEvent``).

These are the only types the HTTP layer and the engine share: handlers build a request, the engine
answers with a stream of ``TextDelta`` events closed by exactly one ``Finished`` or ``Failed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy; ``seed`` makes sampling repeatable."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to generate, already tokenized."""

    request_id: str
    prompt_tokens: tuple[int, ...]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token counts in OpenAI's sense; ``completion_tokens`` counts every token generated."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    """New text for the client; never part of a stop string."""

    text: str


@dataclass(frozen=True)
class Finished:
    """Generation ended: ``stop`` (end of turn or a stop string), ``length`` or ``cancelled``."""

    reason: FinishReason
    usage: Usage


@dataclass(frozen=True)
class Failed:
    """Generation raised; ``message`` is safe to show the client (no prompt content)."""

    message: str


EngineEvent = TextDelta | Finished | Failed
