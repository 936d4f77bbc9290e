"""OpenAI Responses API bodies and stream events.

The reply is split by ``reply_parsing`` into text, reasoning and tool calls, which become output
items: ``message`` (one ``output_text`` part), ``reasoning`` (one ``reasoning_text`` part) and
``function_call``. Streamed, the response goes ``response.created`` → ``response.in_progress`` →
per item ``response.output_item.added``, its part's ``added`` / deltas / ``done``,
``response.output_item.done`` → ``response.completed`` (or ``response.incomplete`` when
``max_output_tokens`` cut it short); every event carries a ``sequence_number`` from 0.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from genmlx.dispatcher.api.chat import ToolCall
from genmlx.dispatcher.api.reply_parsing import (
    ReplyParser,
    ReplyPiece,
    ReplyText,
    ReplyToolCall,
)
from genmlx.dispatcher.api.responses_request import ResponsesRequest
from genmlx.dispatcher.engine.events import Finished, TextDelta, Usage


def usage_json(usage: Usage) -> dict[str, Any]:
    """The Responses API's ``usage``; ``cached_tokens`` counts prompt tokens the prefix cache supplied."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


class ResponsesFormat:
    """One ``response`` object: a body, or the typed events that build it."""

    def __init__(self, model: str, parser: ReplyParser, request: ResponsesRequest):
        self._model = model
        self._parser = parser
        self._request = request
        self._id = new_id("resp")
        self._created = int(time.time())
        self._sequence = 0
        self._items: list[dict] = []  # finished output items
        self._open: dict | None = None  # the text or reasoning item being streamed

    @property
    def response_id(self) -> str:
        return self._id

    # ----- a whole body

    def full(self, deltas: list[TextDelta], finished: Finished) -> dict:
        pieces = [p for d in deltas for p in self._parser.feed(d.text)] + self._parser.finish()
        items: list[dict] = []
        for piece in pieces:
            _merge_piece(items, piece, self._request.namespaces)
        if not self._request.parallel_tool_calls:
            calls = [i for i in items if i["type"] == "function_call"]
            items = [i for i in items if i["type"] != "function_call" or i is calls[0]]
        return self.response(finished, [_completed(item) for item in items])

    def response(self, finished: Finished | None, output: list[dict]) -> dict:
        """The response object: in progress while ``finished`` is None."""
        request = self._request
        incomplete = finished is not None and finished.reason == "length"
        status = "in_progress" if finished is None else "incomplete" if incomplete else "completed"
        body: dict[str, Any] = {
            "id": self._id,
            "object": "response",
            "created_at": self._created,
            "status": status,
            "model": self._model,
            "output": output,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": request.instructions,
            "max_output_tokens": request.options.max_tokens,
            "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": request.previous_response_id,
            "reasoning": request.reasoning,
            "temperature": request.options.sampling.temperature,
            "top_p": request.options.sampling.top_p,
            "text": {"format": request.text_format},
            "tool_choice": request.tool_choice,
            "tools": [_echoed_tool(tool) for tool in request.tools_given],
            "truncation": "disabled",
            "metadata": request.metadata or {},
        }
        if finished is not None:  # the spec has no null usage: none while in progress
            body["usage"] = usage_json(finished.usage)
            body["completed_at"] = int(time.time())
        return body

    # ----- a stream

    def stream_start(self) -> list[dict]:
        in_progress = self.response(None, [])
        return [
            self.event("response.created", response=in_progress),
            self.event("response.in_progress", response=in_progress),
        ]

    def stream_delta(self, delta: TextDelta) -> list[dict]:
        return [event for piece in self._parser.feed(delta.text) for event in self._piece_events(piece)]

    def stream_finish(self, finished: Finished) -> list[dict]:
        events = [event for piece in self._parser.finish() for event in self._piece_events(piece)]
        events += self._close_open()
        kind = "response.incomplete" if finished.reason == "length" else "response.completed"
        return [*events, self.event(kind, response=self.response(finished, self._items))]

    def stream_usage(self, usage: Usage) -> dict:
        return {}  # never asked for: usage travels in response.completed

    def _piece_events(self, piece: ReplyPiece) -> list[dict]:
        if isinstance(piece, ReplyToolCall):
            if not self._request.parallel_tool_calls and any(
                i["type"] == "function_call" for i in self._items
            ):
                return []  # parallel_tool_calls false: the first call only
            return [*self._close_open(), *self._call_events(piece.call)]
        kind = "message" if isinstance(piece, ReplyText) else "reasoning"
        if not piece.text:
            return []
        events = []
        if self._open is None or self._open["type"] != kind:
            events += self._close_open()
            events += self._open_item(kind)
        part = _part_of(self._open)
        part["text"] += piece.text
        delta_type = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        events.append(self.event(delta_type, **self._where(), content_index=0, delta=piece.text, **extra))
        return events

    def _open_item(self, kind: str) -> list[dict]:
        item = _empty_item(kind)
        self._open = item
        added = self.event("response.output_item.added", output_index=len(self._items), item=_shown(item, []))
        part_added = self.event(
            "response.content_part.added", **self._where(), content_index=0, part=_empty_part(kind)
        )
        return [added, part_added]

    def _close_open(self) -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        part = _part_of(item)
        where = {"item_id": item["id"], "output_index": len(self._items)}
        if item["type"] == "message":
            done = self.event(
                "response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[]
            )
        else:
            done = self.event("response.reasoning_text.done", **where, content_index=0, text=part["text"])
        part_done = self.event("response.content_part.done", **where, content_index=0, part=part)
        finished = _completed(item)
        self._items.append(finished)
        return [
            done,
            part_done,
            self.event("response.output_item.done", output_index=where["output_index"], item=finished),
        ]

    def _call_events(self, call: ToolCall) -> list[dict]:
        item = _call_item(call, self._request.namespaces)
        index = len(self._items)
        where = {"item_id": item["id"], "output_index": index}
        events = [
            self.event(
                "response.output_item.added",
                output_index=index,
                item={**item, "arguments": "", "status": "in_progress"},
            ),
            self.event("response.function_call_arguments.delta", **where, delta=call.arguments),
            self.event(
                "response.function_call_arguments.done", **where, arguments=call.arguments, name=call.name
            ),
            self.event("response.output_item.done", output_index=index, item=item),
        ]
        self._items.append(item)
        return events

    def _where(self) -> dict:
        return {"item_id": self._open["id"], "output_index": len(self._items)}

    def event(self, kind: str, **fields: Any) -> dict:
        """One stream event, numbered."""
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event


def _empty_item(kind: str) -> dict:
    if kind == "message":
        part = _empty_part(kind)
        return {
            "id": new_id("msg"),
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [part],
        }
    return {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [_empty_part(kind)]}


def _empty_part(kind: str) -> dict:
    if kind == "message":
        return {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    return {"type": "reasoning_text", "text": ""}


def _part_of(item: dict) -> dict:
    return item["content"][0]


def _shown(item: dict, content: list) -> dict:
    """An item as ``output_item.added`` shows it: before any content."""
    return {**item, "content": content}


def _completed(item: dict) -> dict:
    if item["type"] == "message":
        return {**item, "status": "completed", "content": [dict(part) for part in item["content"]]}
    if item["type"] == "reasoning":
        return {**item, "content": [dict(part) for part in item["content"]]}
    return item


def _merge_piece(items: list[dict], piece: ReplyPiece, namespaces: dict[str, str]) -> None:
    """A whole body's pieces as items: consecutive text (or reasoning) joins one item."""
    if isinstance(piece, ReplyToolCall):
        items.append(_call_item(piece.call, namespaces))
        return
    kind = "message" if isinstance(piece, ReplyText) else "reasoning"
    if not piece.text:
        return
    if not items or items[-1]["type"] != kind:
        items.append(_empty_item(kind))
    _part_of(items[-1])["text"] += piece.text


def _call_item(call: ToolCall, namespaces: dict[str, str]) -> dict:
    """A ``function_call`` item; a function offered inside a namespace tool is called in it."""
    item = {
        "id": new_id("fc"),
        "type": "function_call",
        "status": "completed",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
    }
    if call.name in namespaces:
        item["namespace"] = namespaces[call.name]
    return item


def _echoed_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool as the response repeats it: function tools always say whether they were ``strict``."""
    if tool.get("type") == "function":
        return {**tool, "strict": tool.get("strict")}
    if tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
        return {**tool, "tools": [_echoed_tool(inner) for inner in tool["tools"]]}
    return tool
