"""OpenAI request bodies in, frozen request dataclasses out; anything invalid raises ``InvalidRequest``
naming the field, so handlers never see a raw dict.

Every field OpenAI's spec defines is honoured, ignored because it changes nothing a client can see
here, or refused with a 400 that names it (``request_fields`` lists which and why): ``n`` other
than 1, ``logit_bias``, forced tool choices and non-text content are
refused, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from genmlx.core.errors import InvalidRequest, ModelNotNamed
from genmlx.dispatcher.api.chat import ChatMessage, FunctionTool, ToolCall, ToolChoice
from genmlx.dispatcher.api.request_fields import EMPTY_IS_ABSENT, REFUSED_FIELDS
from genmlx.dispatcher.api.structured import ForcedTools, OutputConstraint, response_format_constraint
from genmlx.dispatcher.engine.events import Sampling

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "GenerationOptions"]

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5  # the legacy endpoint's limit


@dataclass(frozen=True)
class GenerationOptions:
    """What both endpoints accept besides the prompt."""

    model: str | None  # None: whichever model this server serves
    max_tokens: int | None
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    top_logprobs: int | None = None  # None: no log-probabilities
    constraint: OutputConstraint | None = None  # the grammar the output must follow
    forced_tools: ForcedTools | None = None  # a tool call the output must be


@dataclass(frozen=True)
class ChatCompletionRequest:
    """A parsed ``POST /v1/chat/completions`` body."""

    messages: tuple[ChatMessage, ...]
    options: GenerationOptions
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True  # False: at most one tool call per reply


@dataclass(frozen=True)
class CompletionRequest:
    """A parsed ``POST /v1/completions`` body; ``prompt`` is text or token ids."""

    prompt: str | tuple[int, ...]
    options: GenerationOptions


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Parse and validate a chat completion request body."""
    fields = Fields(json_object(body))
    model = required_model(fields)
    messages = fields.require("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array of messages.", param="messages")
    parsed = tuple(_parse_message(m, f"messages[{i}]") for i, m in enumerate(messages))
    max_tokens = fields.optional_int("max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = fields.optional_int("max_tokens", minimum=1)
    options = _parse_options(fields, model, max_tokens, _parse_chat_logprobs(fields))
    parallel = fields.optional_bool("parallel_tool_calls") is not False
    tool_choice, forced = _parse_tool_choice(fields.get("tool_choice"), parallel)
    tools = _parse_tools(fields.get("tools")) if tool_choice != "none" else ()
    options = dataclasses.replace(options, forced_tools=forced)
    return ChatCompletionRequest(parsed, options, tools, tool_choice, parallel_tool_calls=parallel)


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Parse and validate a (legacy) text completion request body."""
    fields = Fields(json_object(body))
    model = required_model(fields)
    prompt = _parse_prompt(fields.require("prompt"))
    max_tokens = fields.optional_int("max_tokens", minimum=1)
    if fields.optional_bool("echo"):
        raise InvalidRequest("'echo' is not supported by this server.", param="echo")
    if fields.optional_int("best_of", minimum=1) not in (None, 1):
        raise InvalidRequest("Only best_of=1 is supported.", param="best_of")
    top_logprobs = fields.optional_int("logprobs", minimum=0)
    if top_logprobs is not None and top_logprobs > MAX_COMPLETION_LOGPROBS:
        raise InvalidRequest(f"'logprobs' must be at most {MAX_COMPLETION_LOGPROBS}.", param="logprobs")
    return CompletionRequest(prompt=prompt, options=_parse_options(fields, model, max_tokens, top_logprobs))


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        data = json.loads(body or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("The request body's JSON is nested too deeply.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def required_model(fields: Fields) -> str:
    """The model the request names: OpenAI requires one, and so does the master that routes by it."""
    model = fields.get("model")
    if not isinstance(model, str) or not model:
        raise ModelNotNamed()
    return model


def _parse_options(
    fields: Fields, model: str, max_tokens: int | None, top_logprobs: int | None
) -> GenerationOptions:
    _refuse_unsupported(fields)
    n = fields.optional_int("n", minimum=1)
    if n not in (None, 1):
        raise InvalidRequest("Only n=1 is supported.", param="n")
    stream = fields.optional_bool("stream") or False
    return GenerationOptions(
        model=model,
        max_tokens=max_tokens,
        sampling=_parse_sampling(fields),
        stop=parse_stop_strings(fields.get("stop")),
        stream=stream,
        include_usage=_parse_include_usage(fields.get("stream_options")),
        top_logprobs=top_logprobs,
        constraint=response_format_constraint(fields.get("response_format")),
    )


def _parse_sampling(fields: Fields) -> Sampling:
    top_k = fields.optional_int("top_k", minimum=-1)
    return Sampling(
        temperature=fields.optional_number("temperature", low=0.0, high=2.0, default=1.0),
        top_p=fields.optional_number("top_p", low=0.0, high=1.0, default=1.0, low_open=True),
        seed=fields.optional_int("seed"),
        top_k=max(top_k or 0, 0),  # -1 is vLLM's "off", as 0 is
        min_p=fields.optional_number("min_p", low=0.0, high=1.0, default=0.0),
        presence_penalty=fields.optional_number("presence_penalty", low=-2.0, high=2.0, default=0.0),
        frequency_penalty=fields.optional_number("frequency_penalty", low=-2.0, high=2.0, default=0.0),
        repetition_penalty=fields.optional_number(
            "repetition_penalty", low=0.0, high=10.0, default=1.0, low_open=True
        ),
    )


def _refuse_unsupported(fields: Fields) -> None:
    for name, why in REFUSED_FIELDS.items():
        value = fields.get(name)
        if value is not None and not (name in EMPTY_IS_ABSENT and value in ({}, [])):
            raise InvalidRequest(why, param=name, code="unsupported_parameter")
    if fields.get("modalities") not in (None, ["text"]):
        raise InvalidRequest(
            "Only text output is supported.", param="modalities", code="unsupported_parameter"
        )


def _parse_chat_logprobs(fields: Fields) -> int | None:
    top = fields.optional_int("top_logprobs", minimum=0)
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"'top_logprobs' must be at most {MAX_TOP_LOGPROBS}.", param="top_logprobs")
    if not fields.optional_bool("logprobs"):
        if top:
            raise InvalidRequest("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")
        return None
    return top or 0


def _parse_tool_choice(choice: Any, parallel: bool) -> tuple[ToolChoice, ForcedTools | None]:
    """``auto`` or ``none``, or a forced call: ``required`` (any tool) or a named function."""
    if choice in (None, "auto", "none"):
        return choice or "auto", None
    if choice == "required":
        return "auto", ForcedTools(None, parallel, "tool_choice")
    named = isinstance(choice, dict) and choice.get("type") == "function"
    function = choice.get("function") if named else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return "auto", ForcedTools((function["name"],), False, "tool_choice")
    raise InvalidRequest(
        "'tool_choice' must be 'auto', 'none', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}.",
        param="tool_choice",
    )


def _parse_tools(tools: Any) -> tuple[FunctionTool, ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array of tools.", param="tools")
    return tuple(_parse_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools))


def _parse_tool(tool: Any, where: str) -> FunctionTool:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise InvalidRequest(
            f'\'{where}\' must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}.',
            param=where,
        )
    description = function.get("description")
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict) or not isinstance(description, str | None):
        raise InvalidRequest(f"'{where}.function' has a malformed description or parameters.", param=where)
    return FunctionTool(function["name"], description, json.dumps(parameters))


def _parse_message(message: Any, where: str) -> ChatMessage:
    if not isinstance(message, dict):
        raise InvalidRequest(f"'{where}' must be an object with 'role' and 'content'.", param=where)
    role = message.get("role")
    if role not in CHAT_ROLES:
        allowed = ", ".join(sorted(CHAT_ROLES))
        raise InvalidRequest(f"'{where}.role' must be one of {allowed}; got {role!r}.", param=f"{where}.role")
    tool_call_id = message.get("tool_call_id") if role == "tool" else None
    if tool_call_id is not None and not isinstance(tool_call_id, str):
        raise InvalidRequest(f"'{where}.tool_call_id' must be a string.", param=f"{where}.tool_call_id")
    return ChatMessage(
        role=role,
        content=_message_text(message.get("content"), f"{where}.content"),
        tool_calls=_parse_message_tool_calls(message.get("tool_calls"), f"{where}.tool_calls"),
        tool_call_id=tool_call_id,
    )


def _parse_message_tool_calls(calls: Any, where: str) -> tuple[ToolCall, ...]:
    if calls is None:
        return ()
    if not isinstance(calls, list):
        raise InvalidRequest(f"'{where}' must be an array of tool calls.", param=where)
    parsed = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(
                f"'{where}[{i}]' must have a 'function' with a 'name'.", param=f"{where}[{i}]"
            )
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        parsed.append(ToolCall(str(call.get("id", f"call_{i}")), function["name"], arguments))
    return tuple(parsed)


def _message_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}' must be a string or an array of content parts.", param=where)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f'\'{where}[{i}]\' must be a text part {{"type": "text", "text": ...}}: '
                "this server accepts text content only.",
                param=f"{where}[{i}]",
            )
        texts.append(part["text"])
    return "".join(texts)


def _parse_prompt(prompt: Any) -> str | tuple[int, ...]:
    # A batch of one prompt is accepted as that prompt; larger batches need n prompts' worth of choices.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return tuple(prompt)
    raise InvalidRequest(
        "'prompt' must be a string or a non-empty array of token ids (one prompt per request).",
        param="prompt",
    )


def parse_stop_strings(stop: Any, name: str = "stop") -> tuple[str, ...]:
    """A stop string or a list of them (empty ones dropped); ``name`` is the field they came from."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(s for s in stop if s)
    raise InvalidRequest(f"'{name}' must be a string or an array of strings.", param=name)


def _parse_include_usage(stream_options: Any) -> bool:
    if stream_options is None:
        return False
    if not isinstance(stream_options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    include = stream_options.get("include_usage", False)
    if not isinstance(include, bool):
        raise InvalidRequest(
            "'stream_options.include_usage' must be a boolean.", param="stream_options.include_usage"
        )
    return include


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Fields:
    """Typed reads of top-level fields; JSON null counts as absent, as in OpenAI's API."""

    def __init__(self, data: dict[str, Any]):
        self._data = data

    def get(self, name: str) -> Any:
        return self._data.get(name)

    def require(self, name: str) -> Any:
        if self._data.get(name) is None:
            raise InvalidRequest(
                f"Missing required parameter: '{name}'.", param=name, code="missing_required"
            )
        return self._data[name]

    def optional_str(self, name: str) -> str | None:
        value = self._data.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"'{name}' must be a string.", param=name)
        return value

    def optional_bool(self, name: str) -> bool | None:
        value = self._data.get(name)
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest(f"'{name}' must be a boolean.", param=name)
        return value

    def optional_int(self, name: str, minimum: int | None = None) -> int | None:
        value = self._data.get(name)
        if value is None:
            return None
        if not _is_int(value):
            raise InvalidRequest(f"'{name}' must be an integer.", param=name)
        if minimum is not None and value < minimum:
            raise InvalidRequest(f"'{name}' must be at least {minimum}; got {value}.", param=name)
        return value

    def optional_number(
        self, name: str, *, low: float, high: float, default: float, low_open: bool = False
    ) -> float:
        value = self._data.get(name)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise InvalidRequest(f"'{name}' must be a number.", param=name)
        if value > high or value < low or (low_open and value == low):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise InvalidRequest(f"'{name}' must be in {interval}; got {value}.", param=name)
        return float(value)
