"""Forced tool calls through constrained decoding, on a real dispatcher with the real clients:
OpenAI's ``tool_choice: "required"`` and a named function (chat and Responses), Anthropic's
``any`` and ``tool``. The scripted model would call get_weather by itself; forced to call get_time,
a tool it has never been scripted to call, it writes a call that parses and fits its parameters."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from dispatcher_process import ServedModel

pytestmark = pytest.mark.e2e

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {
    "name": "get_time",
    "description": "The time in a zone.",
    "parameters": {
        "type": "object",
        "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
ASK = [{"role": "user", "content": "What time is it?"}]


def openai_client(served: ServedModel) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=served.token, timeout=60, max_retries=0)


def test_required_gives_a_tool_call(scripted: ServedModel) -> None:
    reply = openai_client(scripted).chat.completions.create(
        model=scripted.name, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=100
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    json.loads(call.function.arguments)


def test_a_named_function_is_the_one_called_with_arguments_that_fit(scripted: ServedModel) -> None:
    forced = {"type": "function", "function": {"name": "get_time"}}
    reply = openai_client(scripted).chat.completions.create(
        model=scripted.name, messages=ASK, tools=TOOLS, tool_choice=forced, temperature=0, max_tokens=100
    )
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET", "PST")


def test_the_responses_api_forces_a_named_function(scripted: ServedModel) -> None:
    tools = [{"type": "function", **WEATHER}, {"type": "function", **TIME}]
    response = openai_client(scripted).responses.create(
        model=scripted.name,
        input="What time is it?",
        tools=tools,
        tool_choice={"type": "function", "name": "get_time"},
        temperature=0,
        max_output_tokens=100,
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_time" and json.loads(call.arguments)["zone"] in ("UTC", "CET", "PST")


def test_anthropics_tool_choice_tool_and_any(scripted: ServedModel) -> None:
    client = anthropic.Anthropic(base_url=scripted.base_url, api_key=scripted.token, max_retries=0)
    tools = [
        {"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
        for t in (WEATHER, TIME)
    ]
    named = client.messages.create(
        model=scripted.name,
        max_tokens=100,
        messages=ASK,
        tools=tools,
        tool_choice={"type": "tool", "name": "get_time"},
    )
    (use,) = [block for block in named.content if block.type == "tool_use"]
    assert use.name == "get_time" and use.input["zone"] in ("UTC", "CET", "PST")
    assert named.stop_reason == "tool_use"
    some = client.messages.create(
        model=scripted.name,
        max_tokens=100,
        messages=ASK,
        tools=tools,
        tool_choice={"type": "any"},
    )
    assert any(block.type == "tool_use" for block in some.content)


def test_a_named_tool_that_is_not_offered_is_a_400(scripted: ServedModel) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client(scripted).chat.completions.create(
            model=scripted.name,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "launch"}},
            max_tokens=10,
        )
    assert refused.value.body["param"] == "tool_choice"
