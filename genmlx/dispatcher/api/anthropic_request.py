"""Anthropic Messages API request bodies in, the conversation and options every endpoint shares out.

A system prompt (text or text blocks), turns of text, ``tool_use`` and ``tool_result`` blocks become
``ChatMessage`` turns the chat template renders; ``system`` turns inside ``messages`` stay where they
were sent (``chat.fold_system_turns`` places them for the template). ``max_tokens`` is required, as in
Anthropic's API, except when counting tokens. Anything this server cannot honour (images, documents,
forced tool choices) is a 400 that says so.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from genmlx.core.errors import InvalidRequest
from genmlx.dispatcher.api.chat import ChatMessage, FunctionTool, ToolCall
from genmlx.dispatcher.api.request_parsing import GenerationOptions, json_object, parse_stop_strings
from genmlx.dispatcher.api.structured import ForcedTools
from genmlx.dispatcher.engine.events import Sampling


@dataclass(frozen=True)
class MessagesRequest:
    """A parsed ``POST /v1/messages`` body."""

    messages: tuple[ChatMessage, ...]
    options: GenerationOptions
    tools: tuple[FunctionTool, ...] = ()
    thinking: bool = False  # whether the client asked for thinking blocks


@dataclass(frozen=True)
class TokenCountRequest:
    """A parsed ``POST /v1/messages/count_tokens`` body: the prompt of a messages request."""

    model: str | None
    messages: tuple[ChatMessage, ...]
    tools: tuple[FunctionTool, ...] = ()


def parse_messages_request(body: bytes) -> MessagesRequest:
    """Parse and validate an Anthropic Messages request body."""
    data = json_object(body)
    max_tokens = data.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidRequest("max_tokens: a positive integer is required.", param="max_tokens")
    turns, tools = _conversation(data)
    options = dataclasses.replace(
        _options(data, max_tokens), forced_tools=_forced_tools(data.get("tool_choice"))
    )
    return MessagesRequest(messages=turns, options=options, tools=tools, thinking=_thinking(data))


def parse_count_tokens_request(body: bytes) -> TokenCountRequest:
    """Parse and validate a token count body: a messages request's fields less ``max_tokens``."""
    data = json_object(body)
    turns, tools = _conversation(data)
    _thinking(data)  # refused as a real request would refuse it
    return TokenCountRequest(model=_model(data), messages=turns, tools=tools)


def _conversation(data: dict[str, Any]) -> tuple[tuple[ChatMessage, ...], tuple[FunctionTool, ...]]:
    """The turns (system prompt first) and the tools on offer."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: a non-empty array is required.", param="messages")
    turns = [*_system_turns(data.get("system"))]
    for i, message in enumerate(messages):
        turns += _turns(message, f"messages.{i}")
    tool_choice = _tool_choice(data.get("tool_choice"))
    tools = _tools(data.get("tools")) if tool_choice != "none" else ()
    return tuple(turns), tools


def _model(data: dict[str, Any]) -> str | None:
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model: must be a string.", param="model")
    return model


def _options(data: dict[str, Any], max_tokens: int) -> GenerationOptions:
    return GenerationOptions(
        model=_model(data),
        max_tokens=max_tokens,
        sampling=Sampling(
            temperature=_number(data, "temperature", 0.0, 1.0, 1.0),
            top_p=_number(data, "top_p", 0.0, 1.0, 1.0) or 1.0,
            top_k=int(_number(data, "top_k", 0, 1_000_000, 0)),
        ),
        stop=parse_stop_strings(data.get("stop_sequences"), "stop_sequences"),
        stream=data.get("stream") is True,
        include_usage=False,  # Anthropic's stream always carries usage, in its own events
    )


def _number(data: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"{name}: must be a number in [{low:g}, {high:g}].", param=name)
    return float(value)


def _thinking(data: dict[str, Any]) -> bool:
    thinking = data.get("thinking")
    if thinking is None:
        return False
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled", "adaptive"):
        raise InvalidRequest("thinking: must be {'type': 'enabled' | 'disabled', ...}.", param="thinking")
    return thinking["type"] != "disabled"


def _system_turns(system: Any) -> list[ChatMessage]:
    if system is None or system == "" or system == []:
        return []
    return [ChatMessage("system", _text_of(system, "system"))]


def _turns(message: Any, where: str) -> list[ChatMessage]:
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
        raise InvalidRequest(
            f"{where}: must be an object with role 'user', 'assistant' or 'system'.", param=where
        )
    if message["role"] == "system":  # Anthropic takes them anywhere in the conversation
        text = _text_of(message.get("content"), f"{where}.content")
        return [ChatMessage("system", text)] if text else []
    content = message.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(blocks, list):
        raise InvalidRequest(f"{where}.content: must be a string or an array of blocks.", param=where)
    if message["role"] == "assistant":
        return [_assistant_turn(blocks, where)]
    return _user_turns(blocks, where)


def _assistant_turn(blocks: list, where: str) -> ChatMessage:
    texts, calls = [], []
    for i, block in enumerate(blocks):
        kind = _block_type(block, f"{where}.content.{i}")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input", {}), ensure_ascii=False)
            calls.append(ToolCall(str(block.get("id", "")), str(block.get("name", "")), arguments))
        elif kind not in ("thinking", "redacted_thinking"):  # earlier thinking is not replayed
            raise _unsupported_block(kind, f"{where}.content.{i}")
    return ChatMessage("assistant", "".join(texts), tool_calls=tuple(calls))


def _user_turns(blocks: list, where: str) -> list[ChatMessage]:
    results, texts = [], []
    for i, block in enumerate(blocks):
        kind = _block_type(block, f"{where}.content.{i}")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_result":
            text = _text_of(block.get("content") or "", f"{where}.content.{i}.content")
            results.append(ChatMessage("tool", text, tool_call_id=str(block.get("tool_use_id", ""))))
        else:
            raise _unsupported_block(kind, f"{where}.content.{i}")
    return results + ([ChatMessage("user", "".join(texts))] if texts else [])


def _block_type(block: Any, where: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise InvalidRequest(f"{where}: must be a content block with a 'type'.", param=where)
    return block["type"]


def _unsupported_block(kind: str, where: str) -> InvalidRequest:
    return InvalidRequest(
        f"{where}: content blocks of type '{kind}' are not supported by this server.", param=where
    )


def _text_of(content: Any, where: str) -> str:
    """A string, or text blocks joined (tool results and system prompts take either)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        return "".join(str(b.get("text", "")) for b in content)
    raise InvalidRequest(f"{where}: must be a string or an array of text blocks.", param=where)


def _tool_choice(choice: Any) -> str:
    """``none`` (tools are not offered) or ``auto``; ``any`` and ``tool`` force a call (``_forced_tools``)."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    if choice is None or kind in ("auto", "any", "tool"):
        return "auto"
    if kind == "none":
        return "none"
    raise InvalidRequest(
        "tool_choice: must be an object with type 'auto', 'any', 'tool' or 'none'.", param="tool_choice"
    )


def _forced_tools(choice: Any) -> ForcedTools | None:
    """Anthropic's ``any`` (some tool) and ``tool`` (that one), which must be called."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("any", "tool"):
        return None
    parallel = choice.get("disable_parallel_tool_use") is not True
    if kind == "any":
        return ForcedTools(None, parallel, "tool_choice")
    if not isinstance(choice.get("name"), str):
        raise InvalidRequest("tool_choice.name: the tool to call is required.", param="tool_choice.name")
    return ForcedTools((choice["name"],), False, "tool_choice")


def _tools(tools: Any) -> tuple[FunctionTool, ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise InvalidRequest("tools: must be an array.", param="tools")
    parsed = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"tools.{i}: must be an object with a 'name'.", param=f"tools.{i}")
        if tool.get("type") not in (None, "custom"):
            raise InvalidRequest(
                f"tools.{i}: server tools of type '{tool['type']}' are not supported here.",
                param=f"tools.{i}",
            )
        schema = tool.get("input_schema") or {"type": "object", "properties": {}}
        parsed.append(FunctionTool(tool["name"], tool.get("description"), json.dumps(schema)))
    return tuple(parsed)
