"""OpenAI's Responses API on a real dispatcher, through the real ``openai`` client: text, streamed
events in order, function calls (on the scripted model), input items that replay a tool turn, and
the fields this server refuses rather than ignores. Every body and event is validated against the
``openai`` package's types, which are generated from OpenAI's published API spec."""

from __future__ import annotations

import json

import openai
import pytest
from agent_harness import Reply, call
from dispatcher_process import ServedModel
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

pytestmark = pytest.mark.e2e

EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def client(served: ServedModel) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=served.token, timeout=30, max_retries=0)


def raw(base_url: str, token: str, body: dict) -> Reply:
    return call("POST", f"{base_url}/v1/responses", token, body)


def stream_events(base_url: str, token: str, body: dict) -> list[dict]:
    """A streamed response's events, each checked to be named as its type."""
    reply = raw(base_url, token, {**body, "stream": True})
    assert reply.status == 200, reply.body
    events = []
    for frame in reply.body.decode().split("\n\n"):
        if not frame.strip():
            continue
        name, data = frame.split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}", "each event is named as its type"
        events.append(event)
    return events


def test_a_text_response_validates_and_counts_its_tokens(demo: ServedModel) -> None:
    reply = raw(
        demo.base_url,
        demo.token,
        {"model": demo.name, "input": "Hello there", "max_output_tokens": 6, "temperature": 0},
    )
    assert reply.status == 200, reply.body
    response = Response.model_validate(reply.json())
    assert response.object == "response" and response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert response.usage.output_tokens == 6 and response.usage.input_tokens > 0
    assert response.output_text == message.content[0].text
    # The real client reads the same.
    again = client(demo).responses.create(
        model=demo.name, input="Hello there", max_output_tokens=6, temperature=0
    )
    assert again.output_text == response.output_text


def test_a_stream_sends_the_typed_events_in_order_with_sequence_numbers(demo: ServedModel) -> None:
    events = stream_events(
        demo.base_url,
        demo.token,
        {"model": demo.name, "input": "Hi", "max_output_tokens": 5, "temperature": 0},
    )
    for event in events:
        EVENTS.validate_python(event)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == text == events[-4]["text"]
    assert final["usage"]["output_tokens"] == 5


def test_a_function_call_comes_back_as_a_function_call_item(scripted: ServedModel) -> None:
    response = client(scripted).responses.create(
        model=scripted.name, input="What is the weather in Paris?", tools=[WEATHER], temperature=0
    )
    Response.model_validate(response.model_dump())
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "function_call"]
    call = response.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.call_id
    assert response.output[0].content[0].text == "The user wants the weather in Paris."


def test_a_streamed_function_call_sends_its_arguments(scripted: ServedModel) -> None:
    events = stream_events(
        scripted.base_url,
        scripted.token,
        {"model": scripted.name, "input": "Weather?", "tools": [WEATHER], "temperature": 0},
    )
    for event in events:
        EVENTS.validate_python(event)
    kinds = [e["type"] for e in events]
    assert "response.reasoning_text.delta" in kinds
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert json.loads(done["arguments"]) == {"city": "Paris"}
    assert kinds[-1] == "response.completed"
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["reasoning", "function_call"]


def test_input_items_replay_a_tool_turn(scripted: ServedModel) -> None:
    first = client(scripted).responses.create(
        model=scripted.name, input="Weather?", tools=[WEATHER], temperature=0
    )
    call = first.output[1]
    items = [
        {"role": "user", "content": "Weather?"},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'},
    ]
    second = client(scripted).responses.create(
        model=scripted.name, input=items, tools=[WEATHER], instructions="Be brief.", temperature=0
    )
    assert second.status == "completed" and second.usage.input_tokens > first.usage.input_tokens


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "custom", "name": "apply_patch"}]}, "tools[0]"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0]"),
    ],
)
def test_what_this_server_cannot_honour_is_a_400_naming_the_field(demo: ServedModel, change, param) -> None:
    reply = raw(demo.base_url, demo.token, {"model": demo.name, "input": "Hi", **change})
    assert reply.status == 400, reply.body
    assert reply.json()["error"]["param"] == param


def test_fields_outside_the_spec_are_left_alone_as_openai_does(demo: ServedModel) -> None:
    body = {"model": demo.name, "input": "Hi", "max_output_tokens": 2, "client_metadata": {"x": "y"}}
    assert raw(demo.base_url, demo.token, body).status == 200


def test_codex_style_tools_hosted_ones_are_not_offered_and_namespaced_calls_say_their_namespace(
    scripted: ServedModel,
) -> None:
    tools = [
        {"type": "namespace", "name": "forecast", "description": "Weather.", "tools": [WEATHER]},
        {"type": "web_search", "external_web_access": False},
    ]
    reply = raw(
        scripted.base_url,
        scripted.token,
        {"model": scripted.name, "input": "Weather?", "tools": tools, "temperature": 0},
    )
    assert reply.status == 200, reply.body
    response = Response.model_validate(reply.json())
    call = response.output[-1]
    assert (call.type, call.name, call.namespace) == ("function_call", "get_weather", "forecast")
    echoed = reply.json()["tools"]
    assert echoed[1] == tools[1] and echoed[0]["tools"] == [{**WEATHER, "strict": None}], (
        "the tools are echoed as sent, function tools saying whether they were strict"
    )


def test_a_response_must_name_its_model(demo: ServedModel) -> None:
    reply = raw(demo.base_url, demo.token, {"input": "Hi"})
    assert reply.status == 400 and reply.json()["error"]["param"] == "model"
