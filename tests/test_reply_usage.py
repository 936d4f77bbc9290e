"""The tokens a reply reports, read by the master as it passes (``genmlx.master.api.usage``): a whole
chat, completion, Responses or Anthropic reply, and their streams cut at any byte."""

from __future__ import annotations

import json

import pytest

from genmlx.master.api.usage import ReplyUsage


def events(*documents: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(d).encode() + b"\n\n" for d in documents) + b"data: [DONE]\n\n"


CHAT_STREAM = events(
    {"choices": [{"delta": {"content": "Hi"}}]},
    {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}},
)
ANTHROPIC_STREAM = b"event: message_start\n" + events(
    {"type": "message_start", "message": {"usage": {"input_tokens": 20, "output_tokens": 1}}},
    {"type": "content_block_delta", "delta": {"text": "the prompt_tokens of a story"}},
    {"type": "message_delta", "usage": {"output_tokens": 7}},
)
RESPONSES_STREAM = events(
    {"type": "response.output_text.delta", "delta": "x"},
    {"type": "response.completed", "response": {"usage": {"input_tokens": 9, "output_tokens": 4}}},
)


@pytest.mark.parametrize(
    ("stream", "expected"), [(CHAT_STREAM, (12, 3)), (ANTHROPIC_STREAM, (20, 7)), (RESPONSES_STREAM, (9, 4))]
)
@pytest.mark.parametrize("cut", [1, 7, 64, 100_000])
def test_a_stream_reports_its_usage_however_it_is_cut(
    stream: bytes, expected: tuple[int, int], cut: int
) -> None:
    usage = ReplyUsage()
    for start in range(0, len(stream), cut):
        usage.streamed(stream[start : start + cut])
    assert (usage.prompt_tokens, usage.completion_tokens) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"usage": {"prompt_tokens": 5, "completion_tokens": 2}}, (5, 2)),
        ({"type": "message", "usage": {"input_tokens": 8, "output_tokens": 3}}, (8, 3)),
        ({"object": "response", "usage": {"input_tokens": 6, "output_tokens": 1}}, (6, 1)),
        ({"error": {"message": "no"}}, (0, 0)),
        ({"usage": {"prompt_tokens": True, "completion_tokens": -4}}, (0, 0)),
    ],
)
def test_a_whole_reply_reports_its_usage(body: dict, expected: tuple[int, int]) -> None:
    usage = ReplyUsage()
    usage.whole(json.dumps(body).encode())
    assert (usage.prompt_tokens, usage.completion_tokens) == expected


def test_a_body_that_is_not_json_counts_nothing() -> None:
    usage = ReplyUsage()
    usage.whole(b"<html>bad gateway</html>")
    usage.streamed(b"data: {not json _tokens\n\n")
    assert (usage.prompt_tokens, usage.completion_tokens) == (0, 0)
