"""Splitting a streamed reply into text, reasoning and tool calls, however the text is cut."""

from __future__ import annotations

import json

import pytest
from mlx_lm.tool_parsers import json_tools

from genmlx.dispatcher.api.reply_parsing import (
    ReplyMarkers,
    ReplyParser,
    ReplyReasoning,
    ReplyText,
    ReplyToolCall,
)

MARKERS = ReplyMarkers(
    think=("<think>", "</think>"),
    tool_call=(json_tools.tool_call_start, json_tools.tool_call_end),
    parse_tool_call=json_tools.parse_tool_call,
)
REPLY = (
    '<think>Look it up.</think>\n\nLet me check.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
)


def split(text: str, piece_length: int, markers: ReplyMarkers = MARKERS, **kwargs) -> list:
    parser = ReplyParser(markers, **kwargs)
    pieces = [p for i in range(0, len(text), piece_length) for p in parser.feed(text[i : i + piece_length])]
    return _merged(pieces + parser.finish())


def _merged(pieces: list) -> list:
    merged: list = []
    for piece in pieces:
        if merged and type(piece) is type(merged[-1]) and not isinstance(piece, ReplyToolCall):
            merged[-1] = type(piece)(merged[-1].text + piece.text)
        else:
            merged.append(piece)
    return merged


@pytest.mark.parametrize("piece_length", [1, 2, 3, 7, len(REPLY)])
def test_markers_are_found_wherever_the_text_is_cut(piece_length: int) -> None:
    reasoning, text, call = split(REPLY, piece_length)
    assert reasoning == ReplyReasoning("Look it up.")
    assert text == ReplyText("Let me check.")  # the layout after </think> is not text
    assert call.call.name == "f" and json.loads(call.call.arguments) == {"x": 1}


def test_text_that_only_looks_like_a_marker_start_is_released() -> None:
    assert split("a <thin b < c", 1) == [ReplyText("a <thin b < c")]


def test_a_call_that_does_not_parse_stays_text() -> None:
    assert split("<tool_call>not json</tool_call>", 4) == [ReplyText("<tool_call>not json</tool_call>")]


def test_an_unterminated_call_is_still_parsed_at_the_end() -> None:
    (call,) = split('<tool_call>{"name": "f", "arguments": {}}', 5)
    assert call.call.name == "f" and call.call.arguments == "{}"


def test_a_prompt_that_opens_thinking_starts_the_reply_as_reasoning() -> None:
    assert split("hmm</think>Yes.", 3, starts_in_reasoning=True) == [ReplyReasoning("hmm"), ReplyText("Yes.")]


def test_without_tool_markers_a_call_is_text() -> None:
    markers = ReplyMarkers(think=("<think>", "</think>"))
    assert split('<tool_call>{"name": "f"}</tool_call>', 3, markers) == [
        ReplyText('<tool_call>{"name": "f"}</tool_call>')
    ]
