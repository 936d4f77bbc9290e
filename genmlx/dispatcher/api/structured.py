"""Structured outputs: OpenAI's ``response_format`` (chat) and ``text.format`` (Responses) turned
into the grammar the engine constrains a request's output with (``engine.constraints``).

``json_object`` is any JSON object; ``json_schema`` a document that validates against the given
schema, ``strict`` or not (output is always held to the schema). A schema the grammar engine cannot
compile is a 400 naming the construct, checked once the model's tokenizer is at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from genmlx.core.errors import InvalidRequest
from genmlx.dispatcher.engine.constraints import ANY_JSON_OBJECT, constraints_for, json_schema_grammar


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
    """Chat completions' ``response_format``."""
    param = "response_format"
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return OutputConstraint(json_schema_grammar(ANY_JSON_OBJECT), param)
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return _schema_constraint(schema, f"{param}.json_schema.schema")
    raise InvalidRequest(f"{param}: 'type' must be 'text', 'json_object' or 'json_schema'.", param=param)


def text_format_constraint(value: Any) -> OutputConstraint | None:
    """The Responses API's ``text.format``."""
    param = "text.format"
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return OutputConstraint(json_schema_grammar(ANY_JSON_OBJECT), param)
    if kind == "json_schema":
        return _schema_constraint(value.get("schema"), f"{param}.schema")
    raise InvalidRequest(f"{param}: 'type' must be 'text', 'json_object' or 'json_schema'.", param=param)


def _schema_constraint(schema: Any, param: str) -> OutputConstraint:
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param}: a JSON schema object is required.", param=param)
    return OutputConstraint(json_schema_grammar(schema), param)
