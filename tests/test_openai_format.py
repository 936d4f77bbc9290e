"""Text-only stream chunks are encoded once per response and the text slotted in: the result must be
the very JSON the whole chunk encodes to, whatever the text holds."""

from __future__ import annotations

import json

import pytest

from genmlx.dispatcher.api.openai_format import (
    ChatCompletionFormat,
    RawJson,
    TextChunks,
    TextCompletionFormat,
)
from genmlx.dispatcher.api.reply_parsing import ReplyMarkers, ReplyParser
from genmlx.dispatcher.engine.events import TextDelta, TokenLogprob

TEXTS = (
    "plain",
    'a "quoted" \\ back\\slash',
    "line\nbreak\ttab\x01\x1f",
    "é 中文 🙂",
    "\ue000text\ue000",
    " ",
)


@pytest.mark.parametrize("text", TEXTS)
def test_a_chat_text_chunk_is_the_chunk_encoded_whole(text: str) -> None:
    chat = ChatCompletionFormat("served-model", ReplyParser(ReplyMarkers()), include_usage=True)
    (chunk,) = chat.stream_delta(TextDelta(text))
    assert isinstance(chunk, RawJson)
    parsed = json.loads(chunk)
    assert parsed["choices"] == [
        {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    ]
    assert parsed["object"] == "chat.completion.chunk" and parsed["usage"] is None
    assert chunk == json.dumps(parsed, ensure_ascii=False)


@pytest.mark.parametrize("text", TEXTS)
def test_a_text_completion_chunk_is_the_chunk_encoded_whole(text: str) -> None:
    (chunk,) = TextCompletionFormat("served-model").stream_delta(TextDelta(text))
    parsed = json.loads(chunk)
    assert parsed["choices"] == [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]
    assert chunk == json.dumps(parsed, ensure_ascii=False)


def test_chunks_with_log_probabilities_are_built_whole() -> None:
    completion = TextCompletionFormat("served-model", logprobs=True)
    (chunk,) = completion.stream_delta(TextDelta("hi", (TokenLogprob("hi", -0.5),)))
    assert not isinstance(chunk, RawJson)
    assert chunk["choices"][0]["logprobs"]["token_logprobs"] == [-0.5]


def test_a_template_without_its_slot_is_refused() -> None:
    with pytest.raises(ValueError):
        TextChunks({"text": "no slot here"})
