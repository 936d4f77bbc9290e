"""Anthropic's Messages API at /v1/messages, through the real ``anthropic`` client against real
dispatchers: thinking and tool_use blocks on the scripted model, text, limits and stop sequences on
the random demo model, Anthropic's event sequence, errors and both ways of sending the key."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import anthropic
import pytest
from dispatcher_process import ServedModel
from test_scripted_model import TOOL_REPLY

pytestmark = pytest.mark.e2e  # every test here talks to a real dispatcher process

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
REASONING = "The user wants the weather in Paris."
THINKING = {"type": "enabled", "budget_tokens": 1024}
GREEDY = {"temperature": 0}  # this anthropic client no longer takes temperature as an argument


def client(served: ServedModel, api_key: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=served.base_url, api_key=api_key or served.token, timeout=30, max_retries=0
    )


def create(served: ServedModel, **kwargs) -> anthropic.types.Message:
    return client(served).messages.create(model=served.name, **kwargs)


def test_tool_use_with_thinking(scripted: ServedModel) -> None:
    message = create(scripted, max_tokens=100, messages=ASK, tools=[WEATHER_TOOL], thinking=THINKING)
    thinking, tool_use = message.content
    assert thinking.type == "thinking" and thinking.thinking == REASONING and thinking.signature == ""
    assert tool_use.type == "tool_use" and tool_use.name == "get_weather" and tool_use.id.startswith("toolu_")
    assert tool_use.input == {"city": "Paris"}
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    assert message.usage.output_tokens == 28 and message.usage.input_tokens > 0


def test_no_thinking_blocks_unless_enabled(scripted: ServedModel) -> None:
    message = create(scripted, max_tokens=100, messages=ASK, tools=[WEATHER_TOOL])
    assert [block.type for block in message.content] == ["tool_use"]


def test_the_stream_follows_anthropics_event_sequence_and_builds_the_same_message(
    scripted: ServedModel,
) -> None:
    kwargs = {"max_tokens": 100, "messages": ASK, "tools": [WEATHER_TOOL], "thinking": THINKING}
    with client(scripted).messages.stream(model=scripted.name, **kwargs) as stream:
        events = list(stream)
        streamed = stream.get_final_message()
    types = [event.type for event in events if event.type in _RAW_EVENTS]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["thinking", "tool_use"]
    assert types.count("content_block_stop") == 2
    deltas = {e.delta.type for e in events if e.type == "content_block_delta"}
    assert deltas == {"thinking_delta", "signature_delta", "input_json_delta"}
    whole = create(scripted, **kwargs)
    assert [b.model_dump(exclude={"id"}) for b in streamed.content] == [
        b.model_dump(exclude={"id"}) for b in whole.content
    ]
    assert streamed.stop_reason == "tool_use" and streamed.usage.output_tokens == 28


_RAW_EVENTS = {
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
}


def test_without_tools_the_call_is_text(scripted: ServedModel) -> None:
    message = create(scripted, max_tokens=100, messages=ASK)
    (text,) = message.content
    assert text.type == "text" and text.text == TOOL_REPLY.split("</think>")[1]
    assert message.stop_reason == "end_turn"


def test_system_blocks_and_tool_results_render_into_the_prompt(scripted: ServedModel) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 degrees."}],
        },
    ]
    system = [{"type": "text", "text": "You are a weather assistant."}]
    short = create(scripted, max_tokens=1, messages=ASK, tools=[WEATHER_TOOL])
    long = create(scripted, max_tokens=1, messages=history, tools=[WEATHER_TOOL], system=system)
    assert prompt_tokens(long.usage) > prompt_tokens(short.usage) + 15
    assert long.stop_reason == "max_tokens"


def test_max_tokens_and_stop_sequences(demo: ServedModel) -> None:
    limited = create(demo, max_tokens=6, messages=ASK, extra_body=GREEDY)
    assert limited.stop_reason == "max_tokens" and limited.usage.output_tokens == 6
    text = create(demo, max_tokens=30, messages=ASK, extra_body=GREEDY).content[0].text
    stop = text[10:13]
    stopped = create(demo, max_tokens=30, messages=ASK, extra_body=GREEDY, stop_sequences=[stop])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.content[0].text == text[: text.index(stop)]


def test_streamed_text_matches_the_whole_message(demo: ServedModel) -> None:
    kwargs = {"max_tokens": 20, "messages": ASK, "extra_body": GREEDY}
    with client(demo).messages.stream(model=demo.name, **kwargs) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == create(demo, **kwargs).content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 20


def test_prompt_tokens_read_from_the_prefix_cache_are_counted_apart(demo: ServedModel) -> None:
    kwargs = {
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "Tell me of lakes."}],
        "extra_body": GREEDY,
    }
    first = create(demo, **kwargs)  # at most the chat template's opening is cached before it
    with client(demo).messages.stream(model=demo.name, **kwargs) as stream:
        again = stream.get_final_message()
    assert again.usage.input_tokens == 1  # all but the last prompt token were read from the cache
    assert again.usage.cache_read_input_tokens > first.usage.cache_read_input_tokens
    assert prompt_tokens(again.usage) == prompt_tokens(first.usage)


def prompt_tokens(usage: anthropic.types.Usage) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens


def test_a_wrong_key_is_an_authentication_error(demo: ServedModel) -> None:
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client(demo, api_key="wrong").messages.create(model=demo.name, max_tokens=2, messages=ASK)
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "authentication_error"


def post_messages(served: ServedModel, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(
        served.base_url + "/v1/messages", data=json.dumps(body).encode(), method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_bearer_token_works_too_and_bad_requests_are_anthropic_errors(demo: ServedModel) -> None:
    bearer = {"Authorization": f"Bearer {demo.token}", "Content-Type": "application/json"}
    status, body = post_messages(demo, {"model": demo.name, "max_tokens": 2, "messages": ASK}, bearer)
    assert status == 200 and body["type"] == "message"
    status, body = post_messages(demo, {"model": demo.name, "messages": ASK}, bearer)
    assert (
        status == 400
        and body["error"]["type"] == "invalid_request_error"
        and "max_tokens" in body["error"]["message"]
    )
    image = [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": ""}}]}]
    status, body = post_messages(demo, {"max_tokens": 2, "messages": image}, bearer)
    assert status == 400 and "not supported" in body["error"]["message"]
    status, body = post_messages(demo, {"model": "other", "max_tokens": 2, "messages": ASK}, bearer)
    assert status == 404 and body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": body["error"]["message"]},
    }
