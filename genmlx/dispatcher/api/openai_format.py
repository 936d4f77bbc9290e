"""OpenAI's response bodies and stream chunks for chat and text completions.

Each endpoint has a format with the same five methods, so the handler that drives a request does
not care which endpoint it serves. The chat format splits reasoning and tool calls out of the reply
(``reply_parsing``); both carry log-probabilities in their endpoint's shape when asked. Shapes
follow OpenAI's API reference field for field; the tests parse them with the ``openai`` client's
own types.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Protocol

from genmlx.dispatcher.api.chat import ToolCall
from genmlx.dispatcher.api.reply_parsing import (
    ReplyParser,
    ReplyPiece,
    ReplyReasoning,
    ReplyText,
    ReplyToolCall,
)
from genmlx.dispatcher.engine.events import Finished, TextDelta, TokenLogprob, Usage


def usage_json(usage: Usage) -> dict:
    """OpenAI's ``usage`` object; ``cached_tokens`` counts prompt tokens the prefix cache supplied.
    There is never audio nor a predicted output here, so those counts are 0; ``reasoning_tokens``
    is left out rather than guessed, as the engine counts a reply's tokens without splitting them."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "accepted_prediction_tokens": 0,
            "audio_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


class RawJson(str):
    """A chunk already encoded as JSON text (the handler writes it as is)."""


class TextChunks:
    """Stream chunks that differ only in their text, encoded once: ``fill`` slots a text into the
    JSON of ``template`` (whose text is ``SLOT``) instead of encoding the whole chunk per token."""

    SLOT = "\ue000text\ue000"  # private-use characters: never in a chunk's own fields

    def __init__(self, template: dict):
        self._before, self._after = json.dumps(template, ensure_ascii=False).split(
            json.dumps(self.SLOT, ensure_ascii=False)
        )

    def fill(self, text: str) -> RawJson:
        return RawJson(self._before + _encode_string(text) + self._after)


_encode_string = json.encoder.encode_basestring  # a JSON string literal, non-ASCII kept as is


class ResponseFormat(Protocol):
    """Bodies and chunks for one response of one endpoint; it may keep state across a stream."""

    def stream_start(self) -> list[dict]: ...
    def stream_delta(self, delta: TextDelta) -> list[dict | RawJson]: ...
    def stream_finish(self, finished: Finished) -> list[dict]: ...
    def stream_usage(self, usage: Usage) -> dict: ...
    def full(self, deltas: list[TextDelta], finished: Finished) -> dict: ...


class ChatCompletionFormat:
    """``chat.completion`` bodies and ``chat.completion.chunk`` stream chunks, with reasoning and tool
    calls split out of the reply by ``parser``."""

    def __init__(
        self,
        model: str,
        parser: ReplyParser,
        *,
        include_usage: bool = False,
        logprobs: bool = False,
        parallel_tool_calls: bool = True,
    ):
        self._head = _ResponseHead(model, "chatcmpl-", service_tier="default")
        self._parser = parser
        self._parallel_tool_calls = parallel_tool_calls
        self._include_usage = include_usage
        self._logprobs = logprobs
        self._pending_logprobs: list[TokenLogprob] = []
        self._tool_call_index = 0
        self._call_kept = False
        self._text_chunks = TextChunks(self._chunk({"content": TextChunks.SLOT}, None))

    def stream_start(self) -> list[dict]:
        # OpenAI announces the role in a first chunk with empty content.
        return [self._chunk({"role": "assistant", "content": "", "refusal": None}, None)]

    def stream_delta(self, delta: TextDelta) -> list[dict | RawJson]:
        self._pending_logprobs += delta.logprobs
        return [self._delta_chunk(piece) for piece in self._kept(self._parser.feed(delta.text))]

    def stream_finish(self, finished: Finished) -> list[dict]:
        chunks = [self._chunk(self._piece_delta(piece), None) for piece in self._kept(self._parser.finish())]
        return [*chunks, self._chunk({}, self._finish_reason(finished.reason))]

    def stream_usage(self, usage: Usage) -> dict:
        return {**self._head.json("chat.completion.chunk"), "choices": [], "usage": usage_json(usage)}

    def full(self, deltas: list[TextDelta], finished: Finished) -> dict:
        pieces = self._kept([p for d in deltas for p in self._parser.feed(d.text)] + self._parser.finish())
        choice = {
            "index": 0,
            "message": _chat_message(pieces),
            "logprobs": self._logprobs_json([lp for d in deltas for lp in d.logprobs]),
            "finish_reason": self._finish_reason(finished.reason),
        }
        return {
            **self._head.json("chat.completion"),
            "choices": [choice],
            "usage": usage_json(finished.usage),
        }

    def _kept(self, pieces: list[ReplyPiece]) -> list[ReplyPiece]:
        """``pieces`` less the tool calls after the first when the request asked for one at most."""
        if self._parallel_tool_calls:
            return pieces
        kept = []
        for piece in pieces:
            if isinstance(piece, ReplyToolCall):
                if self._call_kept:
                    continue
                self._call_kept = True
            kept.append(piece)
        return kept

    def _finish_reason(self, reason: str) -> str:
        return "tool_calls" if reason == "stop" and self._parser.tool_calls else reason

    def _piece_delta(self, piece: ReplyPiece) -> dict:
        match piece:
            case ReplyText(text=text):
                return {"content": text}
            case ReplyReasoning(text=text):
                return {"reasoning_content": text, "reasoning": text}
            case ReplyToolCall(call=call):
                self._tool_call_index += 1
                return {"tool_calls": [{"index": self._tool_call_index - 1, **_tool_call_json(call)}]}
        raise TypeError(piece)

    def _delta_chunk(self, piece: ReplyPiece) -> dict | RawJson:
        if isinstance(piece, ReplyText) and not self._logprobs:  # most chunks: text alone
            return self._text_chunks.fill(piece.text)
        return self._chunk(self._piece_delta(piece), None)

    def _chunk(self, delta: dict, reason: str | None) -> dict:
        logprobs, self._pending_logprobs = self._pending_logprobs, []
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": self._logprobs_json(logprobs),
            "finish_reason": reason,
        }
        chunk = {**self._head.json("chat.completion.chunk"), "choices": [choice]}
        if self._include_usage:
            chunk["usage"] = None  # OpenAI sends null usage on every chunk but the last
        return chunk

    def _logprobs_json(self, logprobs: list[TokenLogprob]) -> dict | None:
        if not self._logprobs:
            return None
        return {"content": [_chat_token_logprob(lp) for lp in logprobs], "refusal": None}


class TextCompletionFormat:
    """``text_completion`` bodies and stream chunks (the legacy completions endpoint)."""

    def __init__(self, model: str, *, include_usage: bool = False, logprobs: bool = False):
        self._head = _ResponseHead(model, "cmpl-")
        self._include_usage = include_usage
        self._logprobs = logprobs
        self._text_offset = 0
        self._text_chunks = TextChunks(self._chunk(TextChunks.SLOT, (), None))

    def stream_start(self) -> list[dict]:
        return []

    def stream_delta(self, delta: TextDelta) -> list[dict | RawJson]:
        if not self._logprobs:
            return [self._text_chunks.fill(delta.text)]
        return [self._chunk(delta.text, delta.logprobs, None)]

    def stream_finish(self, finished: Finished) -> list[dict]:
        return [self._chunk("", (), finished.reason)]

    def stream_usage(self, usage: Usage) -> dict:
        return {**self._head.json("text_completion"), "choices": [], "usage": usage_json(usage)}

    def full(self, deltas: list[TextDelta], finished: Finished) -> dict:
        text = "".join(d.text for d in deltas)
        logprobs = self._logprobs_json(tuple(lp for d in deltas for lp in d.logprobs))
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finished.reason}
        return {
            **self._head.json("text_completion"),
            "choices": [choice],
            "usage": usage_json(finished.usage),
        }

    def _chunk(self, text: str, logprobs: tuple[TokenLogprob, ...], reason: str | None) -> dict:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": self._logprobs_json(logprobs),
            "finish_reason": reason,
        }
        # No ``usage: null`` here, unlike chat: the spec gives completion chunks the response's schema,
        # whose usage is an object when present.
        return {**self._head.json("text_completion"), "choices": [choice]}

    def _logprobs_json(self, logprobs: tuple[TokenLogprob, ...]) -> dict | None:
        """The legacy shape: parallel lists, the top alternatives as token-to-logprob maps."""
        if not self._logprobs:
            return None
        offsets = []
        for lp in logprobs:
            offsets.append(self._text_offset)
            self._text_offset += len(lp.token)
        return {
            "tokens": [lp.token for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [dict(lp.top) for lp in logprobs],
            "text_offset": offsets,
        }


@dataclass(frozen=True)
class _ResponseHead:
    """The fields every body and chunk of one response shares."""

    model: str
    id_prefix: str
    service_tier: str | None = None  # chat names the tier it served at; there is one tier here
    response_id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        object.__setattr__(self, "response_id", self.id_prefix + secrets.token_hex(14))

    def json(self, kind: str) -> dict:
        # No ``system_fingerprint``: the spec allows a string or nothing, and no fingerprint of the
        # backend's configuration is kept here.
        head = {"id": self.response_id, "object": kind, "created": self.created, "model": self.model}
        if self.service_tier is not None:
            head["service_tier"] = self.service_tier
        return head


def _chat_message(pieces: list[ReplyPiece]) -> dict:
    text = "".join(p.text for p in pieces if isinstance(p, ReplyText))
    reasoning = "".join(p.text for p in pieces if isinstance(p, ReplyReasoning))
    calls = [_tool_call_json(p.call) for p in pieces if isinstance(p, ReplyToolCall)]
    message: dict = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    if reasoning:
        message["reasoning_content"] = message["reasoning"] = reasoning
    if calls:
        message["tool_calls"] = calls
        message["content"] = text.strip() or None  # OpenAI's content is null beside tool calls
    return message


def _tool_call_json(call: ToolCall) -> dict:
    function = {"name": call.name, "arguments": call.arguments}
    return {"id": call.id, "type": "function", "function": function}


def _chat_token_logprob(lp: TokenLogprob) -> dict:
    top = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top]
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()), "top_logprobs": top}


def models_list(model_id: str, created: int) -> dict:
    """``GET /v1/models``: the one model this dispatcher serves."""
    return {"object": "list", "data": [model_json(model_id, created)]}


def model_json(model_id: str, created: int) -> dict:
    """One entry of the models list (also ``GET /v1/models/{id}``)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "genmlx"}
