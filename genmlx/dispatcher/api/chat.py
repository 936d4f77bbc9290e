"""A conversation as both APIs describe it (OpenAI's chat and Anthropic's messages), in one shape the
chat template renders: turns with text, the tool calls an assistant made, and the tools on offer."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal

ToolChoice = Literal["auto", "none"]


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant made; ``arguments`` is a JSON object's text."""

    id: str
    name: str
    arguments: str

    def template_json(self) -> dict:
        """The call as chat templates expect it (arguments as an object where they parse)."""
        try:
            arguments: Any = json.loads(self.arguments)
        except ValueError:
            arguments = self.arguments
        function = {"name": self.name, "arguments": arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call; ``parameters`` is its JSON Schema's text (kept as text so the
    dataclass stays hashable and immutable)."""

    name: str
    description: str | None = None
    parameters: str = '{"type": "object", "properties": {}}'

    def template_json(self) -> dict:
        """The tool in OpenAI's shape, which chat templates (and their ``tools`` loops) expect."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = json.loads(self.parameters)
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn with its text content (content parts already joined), the calls an assistant
    turn made, and for a ``tool`` turn the call it answers."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def template_json(self) -> dict:
        """The turn as chat templates expect it."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.template_json() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def fold_system_turns(messages: tuple[ChatMessage, ...], *, anywhere: bool) -> tuple[ChatMessage, ...]:
    """System turns placed where a chat template can render them.

    The system turns that open the conversation become one. A later one stays in place where the
    template takes system turns ``anywhere``; otherwise its text opens the next user turn, or, with
    no user turn after it, joins the opening system turn."""
    opening = [m.content for m in _leading_system(messages)]
    rest: list[ChatMessage] = []
    pending: list[str] = []  # system texts waiting for the next user turn
    for message in messages[len(opening) :]:
        if message.role == "system" and not anywhere:
            pending.append(message.content)
            continue
        if message.role == "user" and pending:
            message = replace(message, content="\n\n".join([*pending, message.content]))
            pending = []
        rest.append(message)
    opening += pending
    system = [ChatMessage("system", "\n\n".join(opening))] if opening else []
    return (*system, *rest)


def _leading_system(messages: tuple[ChatMessage, ...]) -> list[ChatMessage]:
    leading = []
    for message in messages:
        if message.role != "system":
            break
        leading.append(message)
    return leading
