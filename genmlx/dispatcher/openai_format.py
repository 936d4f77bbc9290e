"""OpenAI's response bodies and stream chunks for chat and text completions.

Each endpoint has a format with the same five methods, so the handler that drives a request does
not care which endpoint it serves. Shapes follow OpenAI's API reference field for field; the tests
parse them with the ``openai`` client's own types.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Protocol

from genmlx.dispatcher.events import Usage


def usage_json(usage: Usage) -> dict:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


class ResponseFormat(Protocol):
    """Bodies and chunks for one response of one endpoint."""

    def stream_start(self) -> dict | None: ...
    def stream_text(self, text: str) -> dict: ...
    def stream_finish(self, reason: str) -> dict: ...
    def stream_usage(self, usage: Usage) -> dict: ...
    def full(self, text: str, reason: str, usage: Usage) -> dict: ...


@dataclass(frozen=True)
class ChatCompletionFormat:
    """``chat.completion`` bodies and ``chat.completion.chunk`` stream chunks."""

    model: str
    include_usage: bool = False
    response_id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(14))
    created: int = field(default_factory=lambda: int(time.time()))

    def stream_start(self) -> dict | None:
        # OpenAI announces the role in a first chunk with empty content.
        return self._chunk({"role": "assistant", "content": "", "refusal": None}, None)

    def stream_text(self, text: str) -> dict:
        return self._chunk({"content": text}, None)

    def stream_finish(self, reason: str) -> dict:
        return self._chunk({}, reason)

    def stream_usage(self, usage: Usage) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage_json(usage)}

    def full(self, text: str, reason: str, usage: Usage) -> dict:
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage_json(usage)}

    def _chunk(self, delta: dict, reason: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        chunk = {**self._head("chat.completion.chunk"), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None  # OpenAI sends null usage on every chunk but the last
        return chunk

    def _head(self, kind: str) -> dict:
        return {
            "id": self.response_id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }


@dataclass(frozen=True)
class TextCompletionFormat:
    """``text_completion`` bodies and stream chunks (the legacy completions endpoint)."""

    model: str
    include_usage: bool = False
    response_id: str = field(default_factory=lambda: "cmpl-" + secrets.token_hex(14))
    created: int = field(default_factory=lambda: int(time.time()))

    def stream_start(self) -> dict | None:
        return None

    def stream_text(self, text: str) -> dict:
        return self._chunk(text, None)

    def stream_finish(self, reason: str) -> dict:
        return self._chunk("", reason)

    def stream_usage(self, usage: Usage) -> dict:
        return {**self._head(), "choices": [], "usage": usage_json(usage)}

    def full(self, text: str, reason: str, usage: Usage) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._head(), "choices": [choice], "usage": usage_json(usage)}

    def _chunk(self, text: str, reason: str | None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        chunk = {**self._head(), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _head(self) -> dict:
        return {
            "id": self.response_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }


def models_list(model_id: str, created: int) -> dict:
    """``GET /v1/models``: the one model this dispatcher serves."""
    return {"object": "list", "data": [model_json(model_id, created)]}


def model_json(model_id: str, created: int) -> dict:
    """One entry of the models list (also ``GET /v1/models/{id}``)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "genmlx"}
