"""A model's reply, as it streams in, split into what the APIs tell apart: plain text, reasoning (the
text inside the model's thinking markers) and tool calls (parsed with mlx-lm's tool parser for the
model, which ``mlx_lm.tokenizer_utils.load`` picks from the tokenizer config or the chat template).

Works on text, not tokens, so stop strings, the detokenizer and the markers compose, and so a
marker split across two deltas is still found: text that could be the start of a marker is held back
until it is known not to be one.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from genmlx.dispatcher.api.chat import FunctionTool, ToolCall

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from genmlx.dispatcher.engine.runner import LoadedModel

log = logging.getLogger(__name__)

Mode = Literal["text", "reasoning", "tool_call"]


@dataclass(frozen=True)
class ReplyText:
    """Text for the user."""

    text: str


@dataclass(frozen=True)
class ReplyReasoning:
    """Text the model wrote inside its thinking markers."""

    text: str


@dataclass(frozen=True)
class ReplyToolCall:
    """A complete, parsed tool call."""

    call: ToolCall


ReplyPiece = ReplyText | ReplyReasoning | ReplyToolCall


@dataclass(frozen=True)
class ReplyMarkers:
    """The markers one model writes; None where the model (or the request) has no such thing."""

    think: tuple[str, str] | None = None
    tool_call: tuple[str, str] | None = None
    parse_tool_call: Callable[[str, Any], Any] | None = None
    tools_json: tuple[dict, ...] = ()


def reply_markers(tokenizer: TokenizerWrapper, tools: tuple[FunctionTool, ...]) -> ReplyMarkers:
    """The markers to split ``tokenizer``'s model's replies on; tool calls only when tools are offered."""
    think = (tokenizer.think_start, tokenizer.think_end) if tokenizer.has_thinking else None
    if not tools or not tokenizer.has_tool_calling:
        return ReplyMarkers(think=think)
    return ReplyMarkers(
        think=think,
        tool_call=(tokenizer.tool_call_start, tokenizer.tool_call_end),
        parse_tool_call=tokenizer.tool_parser,
        tools_json=tuple(tool.template_json() for tool in tools),
    )


def prompt_opens_reasoning(tokenizer: TokenizerWrapper, prompt_tokens: tuple[int, ...]) -> bool:
    """Whether the prompt ends inside a thinking block (templates like Qwen3's open it for the model),
    so the reply starts as reasoning without an opening marker."""
    if not tokenizer.has_thinking:
        return False
    tail = tokenizer.decode(list(prompt_tokens[-16:]))
    return tail.rfind(tokenizer.think_start) > tail.rfind(tokenizer.think_end)


class ReplyParser:
    """Feed reply text as it arrives; get back the pieces that are certain so far."""

    def __init__(self, markers: ReplyMarkers, *, starts_in_reasoning: bool = False):
        self._markers = markers
        self._exits = {mode: self._markers_out_of(mode) for mode in ("text", "reasoning", "tool_call")}
        self._mode: Mode = "reasoning" if starts_in_reasoning and markers.think else "text"
        self._held = ""
        self._strip_leading = False  # whitespace right after a closing marker is layout, not text
        self.tool_calls = 0

    def feed(self, text: str) -> list[ReplyPiece]:
        """Add reply text; return the pieces it completes."""
        self._held += text
        pieces: list[ReplyPiece] = []
        while (marker := self._next_marker()) is not None:
            start, end, next_mode = marker
            pieces += self._piece(self._held[:start])
            self._held = self._held[end:]
            self._strip_leading = next_mode == "text"
            self._mode = next_mode
        if self._mode != "tool_call":  # a tool call is parsed whole, at its end marker
            safe = len(self._held) - self._partial_marker_length()
            pieces += self._piece(self._held[:safe])
            self._held = self._held[safe:]
        return pieces

    def finish(self) -> list[ReplyPiece]:
        """The end of the reply: release what was held (an unterminated tool call is still tried)."""
        held, self._held = self._held, ""
        return self._piece(held) if held else []

    def _next_marker(self) -> tuple[int, int, Mode] | None:
        """Where the first marker that ends the current mode starts and ends, and the mode it opens."""
        found = [
            (at, at + len(marker), mode)
            for marker, mode in self._exits[self._mode]
            if (at := self._held.find(marker)) >= 0
        ]
        return min(found, default=None)

    def _markers_out_of(self, mode: Mode) -> list[tuple[str, Mode]]:
        think, tool = self._markers.think, self._markers.tool_call
        if mode == "reasoning":
            return [(think[1], "text")] if think else []
        if mode == "tool_call":
            return [(tool[1], "text")] if tool else []
        return [(m[0], next_mode) for m, next_mode in ((think, "reasoning"), (tool, "tool_call")) if m]

    def _partial_marker_length(self) -> int:
        """Length of the longest end of the held text that could begin a marker."""
        markers = [m for m, _ in self._exits[self._mode]]
        longest = max(map(len, markers), default=1)
        tail = self._held[-(longest - 1) :] if longest > 1 else ""
        if not any(m[0] in tail for m in markers):  # most tokens: no marker can start in them
            return 0
        for length in range(min(len(self._held), max(map(len, markers), default=1) - 1), 0, -1):
            if any(m.startswith(self._held[-length:]) for m in markers):
                return length
        return 0

    def _piece(self, text: str) -> list[ReplyPiece]:
        if self._mode == "tool_call":
            return self._tool_call_pieces(text)
        if self._strip_leading:
            text = text.lstrip()
            self._strip_leading = not text
        if not text:
            return []
        return [ReplyReasoning(text) if self._mode == "reasoning" else ReplyText(text)]

    def _tool_call_pieces(self, body: str) -> list[ReplyPiece]:
        calls = self._parse_tool_calls(body)
        if calls is None:  # not a call after all: the user sees what the model wrote
            start, end = self._markers.tool_call or ("", "")
            return [ReplyText(start + body + end)]
        self.tool_calls += len(calls)
        return [ReplyToolCall(call) for call in calls]

    def _parse_tool_calls(self, body: str) -> list[ToolCall] | None:
        assert self._markers.parse_tool_call is not None
        try:
            parsed = self._markers.parse_tool_call(body, list(self._markers.tools_json))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("a tool call did not parse (%s: %s); it is returned as text", type(e).__name__, e)
            return None
        calls = parsed if isinstance(parsed, list) else [parsed]
        if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
            log.warning("a tool call parsed to something without a name; it is returned as text")
            return None
        return [_tool_call(c) for c in calls]


def _tool_call(parsed: dict) -> ToolCall:
    arguments = parsed.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id="call_" + secrets.token_hex(12), name=parsed["name"], arguments=arguments)


def reply_parser(
    loaded: LoadedModel, tools: tuple[FunctionTool, ...], prompt: tuple[int, ...]
) -> ReplyParser:
    """The parser that splits a reply to ``prompt`` into text, reasoning and tool calls, for the
    loaded model (its tokenizer's markers) and the tools on offer."""
    opens = prompt_opens_reasoning(loaded.tokenizer, prompt)
    return ReplyParser(reply_markers(loaded.tokenizer, tools), starts_in_reasoning=opens)
