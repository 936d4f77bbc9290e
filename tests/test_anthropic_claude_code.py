"""What Claude Code relies on in Anthropic's Messages API: system turns inside ``messages``, errors in
Anthropic's shape and words (the context-limit messages it parses to retry), ``count_tokens``, 404s
under ``/v1/messages`` and today's ``usage``. The real ``anthropic`` client against a real dispatcher
on the demo model (llama-3 template); replies checked against the package's types."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import anthropic
import pytest
from anthropic_types import sse_events, validated
from dispatcher_process import ServedModel

from genmlx.core.errors import (
    BadGateway,
    ContextLengthExceeded,
    InternalError,
    InvalidRequest,
    NotReady,
    ProtocolError,
    QueueFull,
    Unauthorized,
    UnknownModel,
    UnknownRoute,
)
from genmlx.core.http import anthropic_error_reply
from genmlx.dispatcher.api.chat import ChatMessage, fold_system_turns
from genmlx.dispatcher.api.prompts import chat_prompt_tokens, template_takes_system_anywhere

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}
CONTEXT_LENGTH = 2048  # the demo model's max_position_embeddings
# Claude Code's own pattern for the error it answers by lowering max_tokens and retrying.
CONTEXT_LIMIT = re.compile(r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)")


def system(text: str) -> ChatMessage:
    return ChatMessage("system", text)


def user(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def assistant(text: str) -> ChatMessage:
    return ChatMessage("assistant", text)


FOLDS = [
    ("the opening ones join", [system("a"), system("b"), user("u")], False, [system("a\n\nb"), user("u")]),
    ("one mid-conversation stays", [user("u"), assistant("x"), system("s"), user("v")], True, None),
    (
        "one mid-conversation opens the next user turn",
        [system("top"), user("u"), assistant("x"), system("s"), user("v")],
        False,
        [system("top"), user("u"), assistant("x"), user("s\n\nv")],
    ),
    (
        "with no user turn after it, one joins the opening system turn",
        [user("u"), assistant("x"), system("s")],
        False,
        [system("s"), user("u"), assistant("x")],
    ),
    (
        "the opening ones join even where later ones stay",
        [system("a"), system("b"), user("u"), system("s"), user("v")],
        True,
        [system("a\n\nb"), user("u"), system("s"), user("v")],
    ),
]


@pytest.mark.parametrize(("case", "messages", "anywhere", "folded"), FOLDS, ids=[f[0] for f in FOLDS])
def test_system_turns_are_folded_where_the_template_takes_them(case, messages, anywhere, folded) -> None:
    expected = tuple(messages if folded is None else folded)
    assert fold_system_turns(tuple(messages), anywhere=anywhere) == expected


# Anthropic's published types by the status it answers with (docs.anthropic.com/en/api/errors).
ERRORS = [
    (InvalidRequest("bad"), 400, "invalid_request_error"),
    (ContextLengthExceeded("long"), 400, "invalid_request_error"),
    (Unauthorized("key"), 401, "authentication_error"),
    (UnknownModel("which"), 404, "not_found_error"),
    (UnknownRoute("where"), 404, "not_found_error"),
    (ProtocolError(413, "big"), 413, "request_too_large"),
    (QueueFull("busy"), 529, "overloaded_error"),
    (InternalError(), 500, "api_error"),
    (BadGateway("gone"), 502, "api_error"),
    (NotReady("loading"), 503, "api_error"),
]


@pytest.mark.parametrize(("error", "status", "kind"), ERRORS, ids=[type(e[0]).__name__ for e in ERRORS])
def test_errors_take_anthropics_types_and_statuses(error, status, kind) -> None:
    reply = anthropic_error_reply(error, 500)
    assert reply.status == status
    assert reply.body == {"type": "error", "error": {"type": kind, "message": error.message}}
    if kind != "request_too_large":  # a published type the package's union does not list
        validated(anthropic.types.ErrorResponse, reply.body)
    assert ("Retry-After" in reply.headers) == (status in (503, 529))


STRICT_TEMPLATE = (  # the shape of the templates that take a system turn first only (Mistral's, say)
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('A system message is only allowed first.') }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def test_the_demo_template_takes_a_mid_conversation_system_turn_and_a_strict_one_gets_it_merged(
    demo_model_dir: Path,
) -> None:
    from mlx_lm.utils import load_tokenizer

    llama3 = load_tokenizer(demo_model_dir)
    assert template_takes_system_anywhere(llama3)
    strict = load_tokenizer(demo_model_dir)
    strict._tokenizer.chat_template = STRICT_TEMPLATE
    assert not template_takes_system_anywhere(strict)
    conversation = (user("Hi"), assistant("Hello"), system("Answer briefly."), user("Why?"))
    folded = fold_system_turns(conversation, anywhere=False)
    prompt = strict.decode(list(chat_prompt_tokens(strict, folded)))
    assert "user<|end_header_id|>\n\nAnswer briefly.\n\nWhy?<|eot_id|>" in prompt
    assert "system<|end_header_id|>" not in prompt


def client(served: ServedModel) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.base_url, api_key=served.token, timeout=30, max_retries=0)


def count(served: ServedModel, **kwargs) -> int:
    return client(served).messages.count_tokens(model=served.name, **kwargs).input_tokens


def post(served: ServedModel, path: str, body: dict) -> tuple[int, bytes]:
    headers = {"x-api-key": served.token, "Content-Type": "application/json"}
    request = urllib.request.Request(
        served.base_url + path, data=json.dumps(body).encode(), method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.e2e
def test_system_messages_inside_messages_are_accepted_and_placed_for_the_template(
    demo: ServedModel, demo_model_dir: Path
) -> None:
    from mlx_lm.utils import load_tokenizer

    leading = [{"role": "system", "content": "You are terse."}, *ASK]
    assert count(demo, messages=leading) == count(demo, system="You are terse.", messages=ASK)
    mid = [*ASK, {"role": "assistant", "content": "Sunny."}, {"role": "system", "content": "Be kind."}, *ASK]
    tokenizer = load_tokenizer(demo_model_dir)  # llama-3's template: the system turn stays in place
    in_place = (user(ASK[0]["content"]), assistant("Sunny."), system("Be kind."), user(ASK[0]["content"]))
    assert count(demo, messages=mid) == len(chat_prompt_tokens(tokenizer, in_place))
    message = client(demo).messages.create(model=demo.name, max_tokens=3, messages=mid, extra_body=GREEDY)
    validated(anthropic.types.Message, message.model_dump(mode="json"))
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == count(demo, messages=mid)


@pytest.mark.e2e
def test_count_tokens_counts_the_prompt_a_request_is_given(demo: ServedModel) -> None:
    weather = {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}
    kwargs = {"messages": ASK, "system": [{"type": "text", "text": "Be brief."}]}
    status, body = post(demo, "/v1/messages/count_tokens", {"model": demo.name, **kwargs})
    assert status == 200 and validated(anthropic.types.MessageTokensCount, json.loads(body))
    message = client(demo).messages.create(model=demo.name, max_tokens=2, extra_body=GREEDY, **kwargs)
    usage = message.usage
    assert json.loads(body)["input_tokens"] == usage.input_tokens + usage.cache_read_input_tokens
    assert count(demo, tools=[weather], **kwargs) > usage.input_tokens + usage.cache_read_input_tokens
    with pytest.raises(anthropic.NotFoundError) as caught:
        client(demo).messages.count_tokens(model="other", messages=ASK)
    assert caught.value.body["error"]["type"] == "not_found_error"


@pytest.mark.e2e
def test_a_max_tokens_past_the_context_is_refused_in_the_words_claude_code_retries_on(
    demo: ServedModel,
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client(demo).messages.create(model=demo.name, max_tokens=32_000, messages=ASK)
    body = caught.value.body
    validated(anthropic.types.ErrorResponse, body)
    prompt = count(demo, messages=ASK)
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": f"input length and `max_tokens` exceed context limit: {prompt} + 32000 > "
        f"{CONTEXT_LENGTH}, decrease input length or `max_tokens` and try again",
    }
    given, asked, limit = map(int, CONTEXT_LIMIT.search(body["error"]["message"]).groups())
    kwargs = {"model": demo.name, "max_tokens": limit - given, "messages": ASK}
    with client(demo).messages.stream(**kwargs) as stream:  # the lowered budget is taken
        assert next(iter(stream)).type == "message_start"
    with pytest.raises(anthropic.BadRequestError):
        client(demo).messages.create(**{**kwargs, "max_tokens": limit - given + 1})


@pytest.mark.e2e
def test_a_prompt_past_the_context_is_too_long_as_anthropic_says_it(demo: ServedModel) -> None:
    long = [{"role": "user", "content": "The harbour town woke slowly. " * 800}]
    prompt = count(demo, messages=long)
    assert prompt > CONTEXT_LENGTH
    with pytest.raises(anthropic.BadRequestError) as caught:
        client(demo).messages.create(model=demo.name, max_tokens=10, messages=long)
    message = caught.value.body["error"]["message"]
    assert message == f"prompt is too long: {prompt} tokens > {CONTEXT_LENGTH} maximum"


@pytest.mark.e2e
def test_unknown_paths_under_messages_are_anthropic_404s(demo: ServedModel) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client(demo).messages.batches.create(
            requests=[{"custom_id": "a", "params": {"model": demo.name, "max_tokens": 2, "messages": ASK}}]
        )
    error = validated(anthropic.types.ErrorResponse, caught.value.body).error
    assert error.type == "not_found_error" and "/v1/messages/batches" in error.message
    status, body = post(demo, "/v1/messages/nothing/here", {})
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"


USAGE = {
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "cache_creation",
    "service_tier",
    "server_tool_use",
}


@pytest.mark.e2e
def test_usage_has_todays_shape_in_the_message_and_in_the_stream(demo: ServedModel) -> None:
    request = {"model": demo.name, "max_tokens": 4, "messages": ASK, **GREEDY}
    status, body = post(demo, "/v1/messages", request)
    assert status == 200
    message = validated(anthropic.types.Message, json.loads(body))
    assert set(json.loads(body)["usage"]) == USAGE
    assert message.usage.service_tier == "standard" and message.usage.cache_creation_input_tokens == 0
    assert message.usage.server_tool_use is None
    status, body = post(demo, "/v1/messages", {**request, "stream": True})
    events = [validated(anthropic.types.RawMessageStreamEvent, event) for event in sse_events(body)]
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and set(sse_events(body)[0]["message"]["usage"]) == USAGE
    assert delta.type == "message_delta" and delta.usage.output_tokens == 4
    total = delta.usage.input_tokens + delta.usage.cache_read_input_tokens
    assert total == message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert delta.usage.cache_creation_input_tokens == 0 and delta.usage.server_tool_use is None
