"""OpenAI request bodies in, frozen request dataclasses out; anything invalid raises ``InvalidRequest``
naming the field, so handlers never see a raw dict.

Fields this server does not act on (``user``, ``logit_bias``, ``tools`` ...) are accepted and ignored,
as OpenAI-compatible servers commonly do; those it cannot honour in a way a client would notice
(``n`` other than 1, non-text content) are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from genmlx.api_errors import InvalidRequest
from genmlx.dispatcher.events import Sampling

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn with its text content (content parts already joined)."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationOptions:
    """What both endpoints accept besides the prompt."""

    model: str | None
    max_tokens: int | None
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatCompletionRequest:
    """A parsed ``POST /v1/chat/completions`` body."""

    messages: tuple[ChatMessage, ...]
    options: GenerationOptions


@dataclass(frozen=True)
class CompletionRequest:
    """A parsed ``POST /v1/completions`` body; ``prompt`` is text or token ids."""

    prompt: str | tuple[int, ...]
    options: GenerationOptions


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Parse and validate a chat completion request body."""
    fields = _Fields(_json_object(body))
    messages = fields.require("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array of messages.", param="messages")
    parsed = tuple(_parse_message(m, f"messages[{i}]") for i, m in enumerate(messages))
    max_tokens = fields.optional_int("max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = fields.optional_int("max_tokens", minimum=1)
    return ChatCompletionRequest(messages=parsed, options=_parse_options(fields, max_tokens))


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Parse and validate a (legacy) text completion request body."""
    fields = _Fields(_json_object(body))
    prompt = _parse_prompt(fields.require("prompt"))
    max_tokens = fields.optional_int("max_tokens", minimum=1)
    return CompletionRequest(prompt=prompt, options=_parse_options(fields, max_tokens))


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def _parse_options(fields: _Fields, max_tokens: int | None) -> GenerationOptions:
    n = fields.optional_int("n", minimum=1)
    if n not in (None, 1):
        raise InvalidRequest("Only n=1 is supported.", param="n")
    stream = fields.optional_bool("stream") or False
    return GenerationOptions(
        model=fields.optional_str("model"),
        max_tokens=max_tokens,
        sampling=Sampling(
            temperature=fields.optional_number("temperature", low=0.0, high=2.0, default=1.0),
            top_p=fields.optional_number("top_p", low=0.0, high=1.0, default=1.0, low_open=True),
            seed=fields.optional_int("seed"),
        ),
        stop=_parse_stop(fields.get("stop")),
        stream=stream,
        include_usage=_parse_include_usage(fields.get("stream_options")),
    )


def _parse_message(message: Any, where: str) -> ChatMessage:
    if not isinstance(message, dict):
        raise InvalidRequest(f"'{where}' must be an object with 'role' and 'content'.", param=where)
    role = message.get("role")
    if role not in CHAT_ROLES:
        allowed = ", ".join(sorted(CHAT_ROLES))
        raise InvalidRequest(f"'{where}.role' must be one of {allowed}; got {role!r}.", param=f"{where}.role")
    return ChatMessage(role=role, content=_message_text(message.get("content"), f"{where}.content"))


def _message_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}' must be a string or an array of content parts.", param=where)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f'\'{where}[{i}]\' must be a text part {{"type": "text", "text": ...}}: '
                "this server accepts text content only.",
                param=f"{where}[{i}]",
            )
        texts.append(part["text"])
    return "".join(texts)


def _parse_prompt(prompt: Any) -> str | tuple[int, ...]:
    # A batch of one prompt is accepted as that prompt; larger batches need n prompts' worth of choices.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return tuple(prompt)
    raise InvalidRequest(
        "'prompt' must be a string or a non-empty array of token ids (one prompt per request).",
        param="prompt",
    )


def _parse_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(s for s in stop if s)
    raise InvalidRequest("'stop' must be a string or an array of strings.", param="stop")


def _parse_include_usage(stream_options: Any) -> bool:
    if stream_options is None:
        return False
    if not isinstance(stream_options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    include = stream_options.get("include_usage", False)
    if not isinstance(include, bool):
        raise InvalidRequest(
            "'stream_options.include_usage' must be a boolean.", param="stream_options.include_usage"
        )
    return include


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Fields:
    """Typed reads of top-level fields; JSON null counts as absent, as in OpenAI's API."""

    def __init__(self, data: dict[str, Any]):
        self._data = data

    def get(self, name: str) -> Any:
        return self._data.get(name)

    def require(self, name: str) -> Any:
        if self._data.get(name) is None:
            raise InvalidRequest(
                f"Missing required parameter: '{name}'.", param=name, code="missing_required"
            )
        return self._data[name]

    def optional_str(self, name: str) -> str | None:
        value = self._data.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"'{name}' must be a string.", param=name)
        return value

    def optional_bool(self, name: str) -> bool | None:
        value = self._data.get(name)
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest(f"'{name}' must be a boolean.", param=name)
        return value

    def optional_int(self, name: str, minimum: int | None = None) -> int | None:
        value = self._data.get(name)
        if value is None:
            return None
        if not _is_int(value):
            raise InvalidRequest(f"'{name}' must be an integer.", param=name)
        if minimum is not None and value < minimum:
            raise InvalidRequest(f"'{name}' must be at least {minimum}; got {value}.", param=name)
        return value

    def optional_number(
        self, name: str, *, low: float, high: float, default: float, low_open: bool = False
    ) -> float:
        value = self._data.get(name)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise InvalidRequest(f"'{name}' must be a number.", param=name)
        if value > high or value < low or (low_open and value == low):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise InvalidRequest(f"'{name}' must be in {interval}; got {value}.", param=name)
        return float(value)
