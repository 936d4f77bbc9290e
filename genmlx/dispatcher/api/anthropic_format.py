"""Anthropic Messages API response bodies and stream events (errors: ``genmlx.core.http``).

The reply is split by ``reply_parsing`` into text, thinking and tool calls, which become ``text``,
``thinking`` and ``tool_use`` content blocks; streamed, each block is opened, filled with deltas and
closed in Anthropic's event sequence (``message_start`` ... ``message_stop``). Thinking blocks are sent
only when the request enabled thinking; their ``signature`` is empty, as nothing here signs them.
"""

from __future__ import annotations

import json
import secrets

from genmlx.dispatcher.api.chat import ToolCall
from genmlx.dispatcher.api.reply_parsing import (
    ReplyParser,
    ReplyPiece,
    ReplyReasoning,
    ReplyText,
    ReplyToolCall,
)
from genmlx.dispatcher.engine.events import Finished, TextDelta, Usage


class AnthropicMessageFormat:
    """One ``message`` response: a body, or the stream events that build it."""

    def __init__(self, model: str, parser: ReplyParser, *, prompt_tokens: int, thinking: bool):
        self._model = model
        self._parser = parser
        self._prompt_tokens = prompt_tokens
        self._thinking = thinking
        self._message_id = "msg_" + secrets.token_hex(12)
        self._open_block: str | None = None  # the type of the block being streamed
        self._index = -1

    def stream_start(self) -> list[dict]:
        message = self._message([], None, None, Usage(self._prompt_tokens, 0))
        return [{"type": "message_start", "message": message}]

    def stream_delta(self, delta: TextDelta) -> list[dict]:
        return [event for piece in self._parser.feed(delta.text) for event in self._piece_events(piece)]

    def stream_finish(self, finished: Finished) -> list[dict]:
        events = [event for piece in self._parser.finish() for event in self._piece_events(piece)]
        events += self._close_block()
        stop = {"stop_reason": self._stop_reason(finished), "stop_sequence": finished.stop_string}
        usage = {
            **_input_usage(finished.usage),
            "output_tokens": finished.usage.completion_tokens,
            "server_tool_use": None,
        }
        return [*events, {"type": "message_delta", "delta": stop, "usage": usage}, {"type": "message_stop"}]

    def stream_usage(self, usage: Usage) -> dict:
        return {}  # never asked for: usage travels in message_start and message_delta

    def full(self, deltas: list[TextDelta], finished: Finished) -> dict:
        pieces = [p for d in deltas for p in self._parser.feed(d.text)] + self._parser.finish()
        blocks = _merged_blocks([b for p in pieces if (b := self._block(p)) is not None])
        return self._message(blocks, self._stop_reason(finished), finished.stop_string, finished.usage)

    def _stop_reason(self, finished: Finished) -> str:
        if finished.reason == "length":
            return "max_tokens"
        if finished.stop_string is not None:
            return "stop_sequence"
        return "tool_use" if self._parser.tool_calls else "end_turn"

    def _message(
        self, content: list, stop_reason: str | None, stop_sequence: str | None, usage: Usage
    ) -> dict:
        return {
            "id": self._message_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": _message_usage(usage),
        }

    def _block(self, piece: ReplyPiece) -> dict | None:
        match piece:
            case ReplyText(text=text):
                return {"type": "text", "text": text}
            case ReplyReasoning(text=text):
                return {"type": "thinking", "thinking": text, "signature": ""} if self._thinking else None
            case ReplyToolCall(call=call):
                return _tool_use_block(call)
        raise TypeError(piece)

    def _piece_events(self, piece: ReplyPiece) -> list[dict]:
        block = self._block(piece)
        if block is None:
            return []
        kind = block["type"]
        events = []
        if kind != self._open_block or kind == "tool_use":
            events += self._close_block()
            events.append(self._start_block(block))
        events.append({"type": "content_block_delta", "index": self._index, "delta": _block_delta(block)})
        return events

    def _start_block(self, block: dict) -> dict:
        self._index += 1
        self._open_block = block["type"]
        empty = {
            "text": {"text": ""},
            "thinking": {"thinking": "", "signature": ""},
            "tool_use": {"input": {}},
        }
        start = {**block, **empty[block["type"]]}
        return {"type": "content_block_start", "index": self._index, "content_block": start}

    def _close_block(self) -> list[dict]:
        if self._open_block is None:
            return []
        events = []
        if self._open_block == "thinking":  # the SDK expects a signature before a thinking block ends
            signature = {"type": "signature_delta", "signature": ""}
            events.append({"type": "content_block_delta", "index": self._index, "delta": signature})
        self._open_block = None
        return [*events, {"type": "content_block_stop", "index": self._index}]


def _block_delta(block: dict) -> dict:
    match block["type"]:
        case "text":
            return {"type": "text_delta", "text": block["text"]}
        case "thinking":
            return {"type": "thinking_delta", "thinking": block["thinking"]}
    return {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}


def _tool_use_block(call: ToolCall) -> dict:
    try:
        arguments = json.loads(call.arguments)
    except ValueError:
        arguments = {"raw": call.arguments}
    if not isinstance(arguments, dict):  # Anthropic's input is always an object
        arguments = {"value": arguments}
    return {
        "type": "tool_use",
        "id": "toolu_" + call.id.removeprefix("call_"),
        "name": call.name,
        "input": arguments,
    }


def _merged_blocks(blocks: list[dict]) -> list[dict]:
    """Consecutive text (or thinking) pieces joined into one block, as Anthropic sends them."""
    merged: list[dict] = []
    for block in blocks:
        previous = merged[-1] if merged else None
        if previous and previous["type"] == block["type"] == "text":
            previous["text"] += block["text"]
        elif previous and previous["type"] == block["type"] == "thinking":
            previous["thinking"] += block["thinking"]
        else:
            merged.append(dict(block))
    return merged


def _input_usage(usage: Usage) -> dict:
    """Anthropic's input counts: ``input_tokens`` excludes the tokens read from the (prefix) cache.
    Nothing is written to a cache on request (there is no ``cache_control`` here), so no input is
    counted as a cache creation: the prefix cache's fills are plain ``input_tokens``."""
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
    }


def _message_usage(usage: Usage) -> dict:
    """A message's ``usage`` in the shape Anthropic's API writes it today."""
    return {
        **_input_usage(usage),
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "server_tool_use": None,
        "service_tier": "standard",
    }
