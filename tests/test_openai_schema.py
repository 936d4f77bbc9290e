"""Every reply body and every stream event of our OpenAI API validates against OpenAI's published
OpenAPI spec (``openai_schema``), request by request from one table, on real dispatchers: chat
(plain, tools, log-probabilities, streamed with usage), completions (plain, streamed,
log-probabilities), the model list, the Responses API, and errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from agent_harness import call
from dispatcher_process import ServedModel
from openai_schema import validate

# Fields we add to chat messages and deltas on purpose: the reasoning split out of the reply, under
# both names that OpenAI-compatible servers use (vLLM's ``reasoning_content``, and ``reasoning``).
REASONING_FIELDS = frozenset({"reasoning_content", "reasoning"})
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@dataclass(frozen=True)
class Case:
    """One request and the spec schema its reply (or each of its stream events) must satisfy."""

    name: str
    path: str
    schema: str
    body: dict | None = None  # None: a GET
    model: str = "demo"  # the fixture that serves it
    status: int = 200
    token: bool = True
    extensions: frozenset[str] = field(default=frozenset())


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
CASES = [
    Case("chat", CHAT, "CreateChatCompletionResponse", {"messages": ASK, "max_tokens": 8}),
    Case(
        "chat with tools",
        CHAT,
        "CreateChatCompletionResponse",
        {"messages": ASK, "tools": [WEATHER_TOOL], "temperature": 0},
        model="scripted",
        extensions=REASONING_FIELDS,
    ),
    Case(
        "chat with logprobs",
        CHAT,
        "CreateChatCompletionResponse",
        {"messages": ASK, "max_tokens": 6, "logprobs": True, "top_logprobs": 2},
    ),
    Case(
        "chat streamed with usage",
        CHAT,
        "CreateChatCompletionStreamResponse",
        {"messages": ASK, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}},
    ),
    Case(
        "chat streamed with tools and logprobs",
        CHAT,
        "CreateChatCompletionStreamResponse",
        {"messages": ASK, "tools": [WEATHER_TOOL], "stream": True, "logprobs": True},
        model="scripted",
        extensions=REASONING_FIELDS,
    ),
    Case("completion", COMPLETIONS, "CreateCompletionResponse", {"prompt": "Once upon", "max_tokens": 6}),
    Case(
        "completion streamed",
        COMPLETIONS,
        "CompletionStreamChunk",
        {"prompt": "Once upon", "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}},
    ),
    Case(
        "completion with logprobs",
        COMPLETIONS,
        "CreateCompletionResponse",
        {"prompt": "Once upon", "max_tokens": 6, "logprobs": 2},
    ),
    Case("models", "/v1/models", "ListModelsResponse"),
    Case("model", "/v1/models/{model}", "Model"),
    *(
        pytest.param(case, id=case.name)
        for case in [
            Case("response", RESPONSES, "Response", {"input": "Hello", "max_output_tokens": 6}),
            Case(
                "response streamed",
                RESPONSES,
                "ResponseStreamEvent",
                {"input": "Hello", "max_output_tokens": 6, "stream": True},
            ),
            Case(
                "response with a function call",
                RESPONSES,
                "Response",
                {"input": "Weather?", "tools": [{"type": "function", **WEATHER_TOOL["function"]}]},
                model="scripted",
            ),
        ]
    ),
    Case("400 bad field", CHAT, "ErrorResponse", {"messages": ASK, "n": 2}, status=400),
    Case("400 no messages", CHAT, "ErrorResponse", {"messages": []}, status=400),
    Case("400 refused field", COMPLETIONS, "ErrorResponse", {"prompt": "x", "suffix": "y"}, status=400),
    Case("401", CHAT, "ErrorResponse", {"messages": ASK}, status=401, token=False),
    Case("404 model", "/v1/models/no-such-model", "ErrorResponse", status=404),
    Case("404 route", "/v1/no-such-endpoint", "ErrorResponse", status=404),
]


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES, ids=[getattr(c, "name", None) for c in CASES])
def test_every_reply_validates_against_openais_spec(case: Case, request: pytest.FixtureRequest) -> None:
    served: ServedModel = request.getfixturevalue(case.model)
    body = None if case.body is None else {"model": served.name, **case.body}
    url = served.base_url + case.path.format(model=served.name)
    reply = call("GET" if body is None else "POST", url, served.token if case.token else None, body)
    assert reply.status == case.status, reply.body
    documents = stream_events(reply.body) if body and body.get("stream") else [reply.json()]
    assert documents
    for document in documents:
        validate(case.schema, document, case.extensions)


def stream_events(body: bytes) -> list[dict]:
    """The JSON events of a server-sent event stream; a chat or completion stream ends with [DONE]."""
    datas = [
        line.removeprefix("data: ")
        for frame in body.decode().split("\n\n")
        for line in frame.splitlines()
        if line.startswith("data: ")
    ]
    if datas and datas[-1] == "[DONE]":
        datas.pop()
    return [json.loads(d) for d in datas]


CHAT_REPLY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi", "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
}


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"system_fingerprint": None}, "None is not of type 'string'"),
        ({"sytem_fingerprint": "fp"}, "does not define: ['CreateChatCompletionResponse.sytem_fingerprint']"),
        (
            {"choices": [{**CHAT_REPLY["choices"][0], "message": {"role": "assistant", "content": "hi"}}]},
            "'refusal' is a required property",
        ),
    ],
)
def test_the_check_catches_a_null_a_misspelt_and_a_missing_field(change: dict, complaint: str) -> None:
    validate("CreateChatCompletionResponse", CHAT_REPLY)
    with pytest.raises(AssertionError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        validate("CreateChatCompletionResponse", {**CHAT_REPLY, **change})
