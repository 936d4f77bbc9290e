"""OpenAI Responses API request bodies (``POST /v1/responses``) in, the conversation and options every
endpoint shares out.

``input`` is a string (one user turn) or a list of items: messages (``user``, ``assistant``,
``system``, ``developer``; text content or ``input_text``/``output_text`` parts), ``function_call``
items (the calls an earlier turn made) and ``function_call_output`` items (their results);
``reasoning`` items from earlier turns are not replayed, as chat templates drop earlier thinking.
``instructions`` becomes the system turn. ``text.format`` and forced ``tool_choice`` constrain the
output (``structured``). Fields the spec defines that this server cannot honour (custom tools,
images, background mode) are a 400 that says so; fields that change nothing a client can see here
are accepted, and fields outside the spec (a client's own) are left alone, as OpenAI leaves them.

``previous_response_id`` continues a stored response, which only the master keeps: the master
expands ``input`` with the stored conversation and says so in ``EXPANDED_INPUT_HEADER``. A dispatcher
asked directly to continue a response it cannot see refuses, rather than answer without the
earlier turns.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from genmlx.core.errors import InvalidRequest
from genmlx.dispatcher.api.chat import ChatMessage, FunctionTool, ToolCall
from genmlx.dispatcher.api.request_parsing import Fields, GenerationOptions, json_object, required_model
from genmlx.dispatcher.api.structured import ForcedTools, text_format_constraint
from genmlx.dispatcher.engine.events import Sampling

MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "refusal")
# Fields of the spec accepted and ignored: they change nothing a client can see from this server
# (prompt caching is automatic here; no reasoning is encrypted, so none is included).
IGNORED_FIELDS = frozenset(
    {
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "service_tier",
        "include",
        "truncation",
        "stream_options",
        "max_tool_calls",
        "access_programs",
    }
)
# Tools that run on OpenAI's servers: accepted, never offered to the model (nothing here runs them).
HOSTED_TOOLS = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_2025_08_26",
        "web_search_preview_2025_03_11",
        "file_search",
        "code_interpreter",
        "image_generation",
        "computer_use_preview",
        "computer",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "tool_search",
    }
)
# Fields of the spec this server cannot honour: a 400 whenever one is set.
REFUSED_FIELDS = {
    "background": "background responses are not supported here",
    "background_options": "background responses are not supported here",
    "conversation": "stored conversations are not supported here; use previous_response_id",
    "prompt": "stored prompts are not supported here",
    "moderation": "moderation is not supported here",
    "context_management": "server-side context compaction is not supported here",
    "image": "image generation is not supported here",
}


@dataclass(frozen=True)
class ResponsesRequest:
    """A parsed ``POST /v1/responses`` body."""

    messages: tuple[ChatMessage, ...]
    options: GenerationOptions
    tools: tuple[FunctionTool, ...] = ()  # offered to the model
    namespaces: dict[str, str] = field(default_factory=dict)  # function name -> its namespace tool
    tools_given: tuple[dict[str, Any], ...] = ()  # as the request sent them, for the response
    tool_choice: Any = "auto"  # as asked: "auto", "none", "required" or a function
    parallel_tool_calls: bool = True
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    reasoning: dict[str, Any] | None = None
    text_format: dict[str, Any] = field(default_factory=lambda: {"type": "text"})  # as asked, for the reply


def parse_responses_request(body: bytes, *, expanded: bool = False) -> ResponsesRequest:
    """Parse and validate a Responses request; ``expanded`` when the master already prepended the
    conversation that ``previous_response_id`` names."""
    data = json_object(body)
    fields = Fields(data)
    _refuse_unsupported(data)
    previous = fields.optional_str("previous_response_id")
    if previous is not None and not expanded:
        raise InvalidRequest(
            "previous_response_id: responses are stored by the master; send this request through the "
            "master's /v1/responses, or send the whole conversation as input.",
            param="previous_response_id",
        )
    instructions = fields.optional_str("instructions")
    turns = [ChatMessage("system", instructions)] if instructions else []
    turns += input_turns(fields.require("input"))
    parallel = fields.optional_bool("parallel_tool_calls") is not False
    tool_choice, forced = _tool_choice(data.get("tool_choice"), parallel)
    tools, namespaces = _tools(data.get("tools"))
    return ResponsesRequest(
        messages=tuple(turns),
        options=dataclasses.replace(_options(fields), forced_tools=forced),
        tools=tools if tool_choice != "none" else (),
        namespaces=namespaces,
        tools_given=tuple(data.get("tools") or ()),
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        instructions=instructions,
        previous_response_id=previous,
        store=fields.optional_bool("store") is not False,
        metadata=data.get("metadata") if isinstance(data.get("metadata"), dict) else None,
        reasoning=data.get("reasoning") if isinstance(data.get("reasoning"), dict) else None,
        text_format=_text_format(data.get("text")),
    )


def input_turns(items: Any) -> list[ChatMessage]:
    """``input`` as chat turns: consecutive function calls join the assistant turn before them."""
    if isinstance(items, str):
        return [ChatMessage("user", items)]
    if not isinstance(items, list):
        raise InvalidRequest("input: must be a string or an array of input items.", param="input")
    turns: list[ChatMessage] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            turns.append(_message(item, where))
        elif kind == "function_call":
            _add_call(turns, _function_call(item, where))
        elif kind == "function_call_output":
            turns.append(_call_output(item, where))
        elif kind != "reasoning":  # earlier thinking is not replayed
            raise InvalidRequest(
                f"{where}: input items of type {kind!r} are not supported here.", param=where
            )
    return turns


def _message(item: dict[str, Any], where: str) -> ChatMessage:
    role = MESSAGE_ROLES.get(item.get("role"))
    if role is None:
        raise InvalidRequest(
            f"{where}.role: must be one of user, assistant, system, developer; got {item.get('role')!r}.",
            param=f"{where}.role",
        )
    return ChatMessage(role, _content_text(item.get("content"), f"{where}.content"))


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}: must be a string or an array of content parts.", param=where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text", part.get("refusal")), str):
            raise InvalidRequest(
                f"{where}[{i}]: content parts of type {kind!r} are not supported here; send text.",
                param=f"{where}[{i}]",
            )
        texts.append(part.get("text", part.get("refusal")))
    return "".join(texts)


def _function_call(item: dict[str, Any], where: str) -> ToolCall:
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
    if not all(isinstance(v, str) for v in (call_id, name, arguments)):
        raise InvalidRequest(
            f"{where}: a function_call needs string call_id, name and arguments.", param=where
        )
    return ToolCall(call_id, name, arguments)


def _add_call(turns: list[ChatMessage], call: ToolCall) -> None:
    """A call joins the assistant turn just before it, or opens one."""
    if turns and turns[-1].role == "assistant":
        last = turns[-1]
        turns[-1] = ChatMessage("assistant", last.content, tool_calls=(*last.tool_calls, call))
    else:
        turns.append(ChatMessage("assistant", "", tool_calls=(call,)))


def _call_output(item: dict[str, Any], where: str) -> ChatMessage:
    call_id = item.get("call_id")
    if not isinstance(call_id, str):
        raise InvalidRequest(f"{where}.call_id: a string is required.", param=f"{where}.call_id")
    return ChatMessage("tool", _content_text(item.get("output"), f"{where}.output"), tool_call_id=call_id)


def _text_format(text: Any) -> dict[str, Any]:
    """``text.format`` as asked (plain text when not asked)."""
    if text is not None and not isinstance(text, dict):
        raise InvalidRequest("text: must be an object.", param="text")
    text_format = (text or {}).get("format")
    return text_format if isinstance(text_format, dict) else {"type": "text"}


def _options(fields: Fields) -> GenerationOptions:
    return GenerationOptions(
        model=required_model(fields),
        max_tokens=fields.optional_int("max_output_tokens", minimum=1),
        sampling=Sampling(
            temperature=fields.optional_number("temperature", low=0.0, high=2.0, default=1.0),
            top_p=fields.optional_number("top_p", low=0.0, high=1.0, default=1.0, low_open=True),
        ),
        stop=(),
        stream=fields.optional_bool("stream") or False,
        include_usage=False,  # the Responses stream always carries usage, in response.completed
        constraint=text_format_constraint(_text_format(fields.get("text"))),
    )


def _refuse_unsupported(data: dict[str, Any]) -> None:
    """A 400 for a field of the spec set to something this server cannot do. Fields outside the
    spec (a client's own, such as Codex's ``client_metadata``) are left alone, as OpenAI does."""
    for name, why in REFUSED_FIELDS.items():
        if data.get(name) not in (None, False, [], {}):
            raise InvalidRequest(f"{name}: {why}.", param=name)
    if data.get("top_logprobs") not in (None, 0):
        raise InvalidRequest(
            "top_logprobs: log-probabilities are not supported on /v1/responses here.", param="top_logprobs"
        )


def _tool_choice(choice: Any, parallel: bool) -> tuple[Any, ForcedTools | None]:
    """The choice as asked (the response repeats it), and the call it forces, if it forces one."""
    if choice is None or choice in ("auto", "none"):
        return choice or "auto", None
    if choice == "required":
        return choice, ForcedTools(None, parallel, "tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return choice, ForcedTools((choice["name"],), False, "tool_choice")
    raise InvalidRequest(
        "tool_choice: must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}.",
        param="tool_choice",
    )


def _tools(tools: Any) -> tuple[tuple[FunctionTool, ...], dict[str, str]]:
    """The functions the model is offered, and the namespace of each that came in one. Hosted tools
    (web search, file search, code interpreter, ...) run on OpenAI's servers, not here: they are not
    offered to the model, so it never calls what nothing would run."""
    if tools is None:
        return (), {}
    if not isinstance(tools, list):
        raise InvalidRequest("tools: must be an array.", param="tools")
    functions: list[FunctionTool] = []
    namespaces: dict[str, str] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            functions.append(_function_tool(tool, where))
        elif (
            kind == "namespace" and isinstance(tool.get("tools"), list) and isinstance(tool.get("name"), str)
        ):
            for j, inner in enumerate(tool["tools"]):
                functions.append(_function_tool(inner, f"{where}.tools[{j}]"))
                namespaces[functions[-1].name] = tool["name"]
        elif kind not in HOSTED_TOOLS:
            raise InvalidRequest(
                f"{where}: tools of type {kind!r} are not supported here; send function tools.", param=where
            )
    return tuple(functions), namespaces


def _function_tool(tool: Any, where: str) -> FunctionTool:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
        raise InvalidRequest(
            f"{where}: must be {{'type': 'function', 'name': ..., 'parameters': ...}}.", param=where
        )
    parameters = tool.get("parameters") or {"type": "object", "properties": {}}
    description = tool.get("description")
    if not isinstance(parameters, dict) or not isinstance(description, str | None):
        raise InvalidRequest(f"{where}: malformed description or parameters.", param=where)
    return FunctionTool(tool["name"], description, json.dumps(parameters))
