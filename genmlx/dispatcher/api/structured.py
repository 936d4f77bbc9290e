"""Structured outputs: OpenAI's ``response_format`` (chat) and ``text.format`` (Responses), and forced
tool choices (OpenAI's ``required`` or a named function, Anthropic's ``any`` or ``tool``), turned
into the grammar the engine constrains a request's output with (``engine.constraints``).

A forced tool call is written in the model's own tool-call markup, so the reply parser reads it as
any other call: for models whose calls are JSON between markers (mlx-lm's ``json_tools`` parser:
Hermes, Qwen and the like) the grammar is the start marker, ``{"name": ..., "arguments": ...}``
valid against the chosen tool's parameters, and the end marker; other formats are a 400.

``json_object`` is any JSON object; ``json_schema`` a document that validates against the given
schema, ``strict`` or not (output is always held to the schema). A schema the grammar engine cannot
compile is a 400 naming the construct, checked once the model's tokenizer is at hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from genmlx.core.errors import InvalidRequest
from genmlx.dispatcher.api.chat import FunctionTool
from genmlx.dispatcher.engine.constraints import (
    ANY_JSON_OBJECT,
    constraints_for,
    json_schema_grammar,
    lark_grammar,
)


@dataclass(frozen=True)
class OutputConstraint:
    """The grammar a request's output must follow, and the request field that asked for it."""

    grammar: str
    param: str

    def check(self, tokenizer: Any) -> None:
        """A 400 when the model's grammar engine cannot use it."""
        problem = constraints_for(tokenizer).problem(self.grammar)
        if problem:
            raise InvalidRequest(f"{self.param}: the schema cannot be used: {problem}", param=self.param)


def response_format_constraint(value: Any) -> OutputConstraint | None:
    """Chat completions' ``response_format``: the schema sits in its ``json_schema`` object."""
    spec = value.get("json_schema") if isinstance(value, dict) else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return _format_constraint(value, "response_format", schema, "json_schema.schema")


def text_format_constraint(value: Any) -> OutputConstraint | None:
    """The Responses API's ``text.format``: the schema sits in the format itself."""
    schema = value.get("schema") if isinstance(value, dict) else None
    return _format_constraint(value, "text.format", schema, "schema")


def _format_constraint(value: Any, param: str, schema: Any, schema_at: str) -> OutputConstraint | None:
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return OutputConstraint(json_schema_grammar(ANY_JSON_OBJECT), param)
    if kind == "json_schema":
        return _schema_constraint(schema, f"{param}.{schema_at}")
    raise InvalidRequest(f"{param}: 'type' must be 'text', 'json_object' or 'json_schema'.", param=param)


def _schema_constraint(schema: Any, param: str) -> OutputConstraint:
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param}: a JSON schema object is required.", param=param)
    return OutputConstraint(json_schema_grammar(schema), param)


JSON_TOOL_PARSER = "mlx_lm.tool_parsers.json_tools"


@dataclass(frozen=True)
class ForcedTools:
    """A request that must call a tool: one of ``names`` (None: any tool on offer), and more than
    one call in a row when ``parallel``."""

    names: tuple[str, ...] | None
    parallel: bool
    param: str

    def constraint(self, tokenizer: Any, tools: tuple[FunctionTool, ...]) -> OutputConstraint:
        """The grammar of such calls in ``tokenizer``'s model's markup, or a 400 saying why not."""
        parser = getattr(tokenizer.tool_parser, "__module__", None) if tokenizer.has_tool_calling else None
        if parser != JSON_TOOL_PARSER:
            raise InvalidRequest(
                f"{self.param}: this model's tool calls are not JSON between markers ({parser or 'none'}), "
                "so this server cannot force one; use 'auto'.",
                param=self.param,
            )
        offered = [tool for tool in tools if self.names is None or tool.name in self.names]
        if not offered:
            raise InvalidRequest(f"{self.param}: names no tool on offer in 'tools'.", param=self.param)
        calls = [_call_schema(tool) for tool in offered]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        start = _marker(tokenizer, tokenizer.tool_call_start)
        end = _marker(tokenizer, tokenizer.tool_call_end)
        # The model's own layout inside its calls (whitespace as it likes): it was trained on it.
        call = f"{start} %json {json.dumps(schema)} {end}"
        rules = f"start: call{'+' if self.parallel else ''}\ncall: {call}\n"
        return OutputConstraint(lark_grammar(rules), self.param)


def _call_schema(tool: FunctionTool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": json.loads(tool.parameters)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _marker(tokenizer: Any, text: str) -> str:
    """A marker in the grammar: its special token where it is one, else its text."""
    ids = tokenizer._tokenizer.encode(text, add_special_tokens=False)
    return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(text)
