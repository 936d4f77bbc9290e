"""Every request field OpenAI's spec defines for chat and text completions is honoured, ignored for
a stated reason, or refused with a 400 naming it; a field the spec adds fails here until it is
sorted. ``parallel_tool_calls: false`` keeps a reply to one tool call."""

from __future__ import annotations

import json

import pytest
from mlx_lm.tool_parsers import json_tools
from openai_schema import schema

from genmlx.core.errors import InvalidRequest
from genmlx.dispatcher.api.openai_format import ChatCompletionFormat
from genmlx.dispatcher.api.reply_parsing import ReplyMarkers, ReplyParser
from genmlx.dispatcher.api.request_fields import (
    CHAT_HONOURED,
    COMPLETION_HONOURED,
    IGNORED_FIELDS,
    REFUSED_FIELDS,
)
from genmlx.dispatcher.api.request_parsing import parse_chat_request, parse_completion_request
from genmlx.dispatcher.engine.events import Finished, TextDelta, Usage


def spec_fields(name: str) -> set[str]:
    """The properties of the spec's request schema ``name``, through its ``allOf`` and ``$ref``s."""
    found = schema(name)
    if "$ref" in found:
        return spec_fields(found["$ref"].rsplit("/", 1)[-1])
    fields = set(found.get("properties", {}))
    for part in found.get("allOf", []):
        fields |= spec_fields(part["$ref"].rsplit("/", 1)[-1]) if "$ref" in part else set(part["properties"])
    return fields


ENDPOINTS = {
    "CreateChatCompletionRequest": CHAT_HONOURED,
    "CreateCompletionRequest": COMPLETION_HONOURED,
}
SPEC_FIELDS = [(request, field) for request in ENDPOINTS for field in sorted(spec_fields(request))]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}
PARSERS = {"CreateChatCompletionRequest": (parse_chat_request, CHAT)}
PARSERS["CreateCompletionRequest"] = (parse_completion_request, COMPLETION)
IGNORED_EXAMPLES = {
    "user": "user-1",
    "safety_identifier": "hashed-1",
    "metadata": {"team": "a"},
    "store": True,
    "service_tier": "flex",
    "prompt_cache_key": "k",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"ttl": "1h"},
    "reasoning_effort": "low",
    "verbosity": "low",
}
REFUSED_EXAMPLES = {
    "logit_bias": {"5": 10},
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "mp3"},
    "prediction": {"type": "content", "content": "hi"},
    "web_search_options": {},
    "moderation": {"model": "omni-moderation-latest"},
    "suffix": "end",
}


@pytest.mark.parametrize(("request_schema", "field"), SPEC_FIELDS, ids=[f"{r}.{f}" for r, f in SPEC_FIELDS])
def test_every_spec_field_is_honoured_ignored_or_refused(request_schema: str, field: str) -> None:
    kinds = [field in ENDPOINTS[request_schema], field in IGNORED_FIELDS, field in REFUSED_FIELDS]
    assert kinds.count(True) == 1, f"{request_schema}.{field}: sort it into exactly one of the three kinds"
    if field in IGNORED_FIELDS or field in REFUSED_FIELDS:
        parse, body = PARSERS[request_schema]
        examples = IGNORED_EXAMPLES if field in IGNORED_FIELDS else REFUSED_EXAMPLES
        request = json.dumps({**body, field: examples[field]}).encode()
        if field in IGNORED_FIELDS:
            parse(request)
        else:
            with pytest.raises(InvalidRequest) as refused:
                parse(request)
            assert refused.value.param == field


def test_every_ignored_and_refused_field_is_one_the_spec_defines() -> None:
    defined = set().union(*(spec_fields(r) for r in ENDPOINTS))
    assert set(IGNORED_FIELDS) | set(REFUSED_FIELDS) <= defined


def test_an_empty_logit_bias_or_functions_list_asks_for_nothing() -> None:
    parse_chat_request(json.dumps({**CHAT, "logit_bias": {}, "functions": []}).encode())


TWO_CALLS = "".join(
    f'<tool_call>{{"name": "{name}", "arguments": {{}}}}</tool_call>' for name in ("first", "second")
)
MARKERS = ReplyMarkers(
    tool_call=(json_tools.tool_call_start, json_tools.tool_call_end),
    parse_tool_call=json_tools.parse_tool_call,
)


@pytest.mark.parametrize(("parallel", "names"), [(True, ["first", "second"]), (False, ["first"])])
def test_parallel_tool_calls_false_keeps_the_first_call(parallel: bool, names: list[str]) -> None:
    finished = Finished("stop", Usage(1, 2))
    chat = ChatCompletionFormat("m", ReplyParser(MARKERS), parallel_tool_calls=parallel)
    body = chat.full([TextDelta(TWO_CALLS)], finished)
    assert [c["function"]["name"] for c in body["choices"][0]["message"]["tool_calls"]] == names
    streamed = ChatCompletionFormat("m", ReplyParser(MARKERS), parallel_tool_calls=parallel)
    chunks = streamed.stream_delta(TextDelta(TWO_CALLS)) + streamed.stream_finish(finished)
    calls = [c for chunk in chunks for c in chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"]) for c in calls] == list(enumerate(names))
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
