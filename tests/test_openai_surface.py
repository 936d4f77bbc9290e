"""The OpenAI surface beyond plain text, through the real ``openai`` client against real dispatchers:
tool calls and thinking (on the scripted model), log-probabilities, sampling fields and penalties
(on the random demo model), and the fields this server refuses rather than ignores."""

from __future__ import annotations

import json

import openai
import pytest
from dispatcher_process import ServedModel
from test_scripted_model import TOOL_REPLY

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
REASONING = "The user wants the weather in Paris."


def client(served: ServedModel) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=served.token, timeout=30, max_retries=0)


def chat(served: ServedModel, **kwargs):
    return client(served).chat.completions.create(model=served.name, **kwargs)


def test_a_tool_call_is_parsed_with_the_reasoning_split_out(scripted: ServedModel) -> None:
    response = chat(scripted, messages=ASK, tools=[WEATHER_TOOL], temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content is None and choice.message.refusal is None
    extra = choice.message.model_extra
    assert extra["reasoning_content"] == extra["reasoning"] == REASONING
    assert response.usage.completion_tokens == 28  # the whole script, every token counted


def test_streamed_tool_call_deltas_reassemble_to_the_same_call(scripted: ServedModel) -> None:
    stream = chat(
        scripted,
        messages=ASK,
        tools=[WEATHER_TOOL],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    reasoning, calls, finish = "", {}, None
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    assert reasoning == REASONING
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert finish == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 28
    assert not any(c.choices and c.choices[0].delta.content for c in chunks)  # no markers leak as text


def test_without_tools_a_call_is_just_text(scripted: ServedModel) -> None:
    choice = chat(scripted, messages=ASK, temperature=0).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    assert choice.message.content == TOOL_REPLY.split("</think>")[1]
    assert choice.message.model_extra["reasoning_content"] == REASONING


def test_tool_history_renders_through_the_template(scripted: ServedModel) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."},
    ]
    short = chat(scripted, messages=ASK, tools=[WEATHER_TOOL], temperature=0, max_tokens=1)
    long = chat(scripted, messages=history, tools=[WEATHER_TOOL], temperature=0, max_tokens=1)
    assert (
        long.usage.prompt_tokens > short.usage.prompt_tokens + 10
    )  # the call and its result are in the prompt


def test_chat_logprobs_in_openais_shape(demo: ServedModel) -> None:
    response = chat(demo, messages=ASK, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == response.usage.completion_tokens == 12
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        # Greedy: the chosen token is the most likely, so it leads its own top list.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert all(entry.logprob >= alt.logprob for alt in entry.top_logprobs)
    assert choice.logprobs.refusal is None


def test_streamed_logprobs_match_the_whole_response(demo: ServedModel) -> None:
    kwargs = {"messages": ASK, "temperature": 0, "max_tokens": 10, "logprobs": True, "top_logprobs": 1}
    whole = chat(demo, **kwargs).choices[0].logprobs.content
    streamed = [
        e
        for c in chat(demo, stream=True, **kwargs)
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-4)


def test_no_logprobs_unless_asked(demo: ServedModel) -> None:
    assert chat(demo, messages=ASK, temperature=0, max_tokens=3).choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(demo: ServedModel) -> None:
    response = client(demo).completions.create(
        model=demo.name, prompt="The river", max_tokens=8, temperature=0, logprobs=2
    )
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert "".join(logprobs.tokens) == choice.text
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(logprob)
        assert top[token] == pytest.approx(logprob)


def greedy_text(served: ServedModel, **kwargs) -> str:
    response = chat(served, messages=ASK, max_tokens=40, **kwargs)
    return response.choices[0].message.content


def test_top_k_one_and_min_p_one_sample_the_greedy_token(demo: ServedModel) -> None:
    greedy = greedy_text(demo, temperature=0)
    # Not in OpenAI's schema (vLLM's names), so the client sends them as extra body fields.
    assert greedy_text(demo, temperature=1.5, seed=3, extra_body={"top_k": 1}) == greedy
    assert greedy_text(demo, temperature=1.5, seed=4, extra_body={"min_p": 1.0}) == greedy
    assert greedy_text(demo, temperature=1.5, seed=5) != greedy  # so the two above had a real choice


@pytest.mark.parametrize(
    "penalty", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.8}]
)
def test_penalties_change_greedy_output(demo: ServedModel, penalty: dict) -> None:
    assert greedy_text(demo, temperature=0, extra_body=penalty) != greedy_text(demo, temperature=0)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "yaml"}}, "response_format"),  # JSON ones: test_structured_outputs
        ({"n": 2}, "n"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        # A forced call of a tool not on offer (forced calls themselves: test_forced_tools).
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER_TOOL]},
            "tool_choice",
        ),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ],
)
def test_fields_that_would_change_the_output_are_refused_not_ignored(
    demo: ServedModel, fields: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(demo, messages=ASK, max_tokens=2, **fields)
    error = caught.value.body
    assert error["param"] == param
    if param == "logit_bias":
        assert "not supported" in error["message"]


def test_text_response_format_and_harmless_fields_are_accepted(demo: ServedModel) -> None:
    response = chat(
        demo,
        messages=ASK,
        max_tokens=2,
        response_format={"type": "text"},
        user="u1",
        metadata={"k": "v"},
        store=False,
    )
    assert response.usage.completion_tokens == 2


def test_the_random_demo_model_takes_tools_too(demo: ServedModel) -> None:
    # It has the same Hermes template and parser; what it writes is noise, so no call is found.
    response = chat(demo, messages=ASK, tools=[WEATHER_TOOL], temperature=0, max_tokens=5)
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.tool_calls is None
