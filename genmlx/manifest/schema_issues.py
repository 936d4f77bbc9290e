"""JSON Schema errors turned into issues a person can act on, placed where the YAML says it.

jsonschema's own messages repeat whole instances ("{...} is not valid under any of the given schemas");
here each keyword gets a sentence about the one value at fault, and unknown keys point at the key
itself with a did-you-mean when a declared key is close.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any

from jsonschema.exceptions import ValidationError, best_match

from genmlx.core.errors import ManifestIssue
from genmlx.manifest.positions import Positions, YamlPath, format_path
from genmlx.manifest.schema import manifest_validator

# What one jsonschema error becomes: (YAML path, whether to point at the key, message), one or more.
Finding = tuple[YamlPath, bool, str]

_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "nothing",
}


def schema_issues(data: Any, positions: Positions, filename: str) -> list[ManifestIssue]:
    """Every schema violation in ``data``, each located at its value (or, for unknown keys, its key)."""
    issues: list[ManifestIssue] = []
    for error in manifest_validator().iter_errors(data):
        for path, at_key, message in _findings(error):
            where = positions.of_key(path) if at_key else positions.of_value(path)
            issues.append(ManifestIssue(filename, where.line, where.column, format_path(path), message))
    return list(dict.fromkeys(issues))  # `required` reports each missing key once per error: dedupe


def _findings(error: ValidationError) -> Iterator[Finding]:
    describe = _DESCRIBERS.get(str(error.validator))
    if describe is not None:
        yield from describe(error)
    else:
        yield tuple(error.absolute_path), False, _shortened(error.message)


def _path(error: ValidationError) -> YamlPath:
    return tuple(error.absolute_path)


def _describe_required(error: ValidationError) -> Iterator[Finding]:
    allowed = list(error.schema.get("properties", {}))
    # A misspelt required key is already reported as unknown, with "did you mean" naming this one.
    misspelt = {_likely_meant(key, allowed) for key in error.instance if key not in allowed}
    for key in error.validator_value:
        if key not in error.instance and key not in misspelt:
            yield _path(error), False, f"missing required key '{key}'"


def _describe_additional(error: ValidationError) -> Iterator[Finding]:
    allowed = list(error.schema.get("properties", {}))
    for key in error.instance:
        if key not in allowed:
            yield (*_path(error), key), True, f"unknown key '{key}'{_suggestion(key, allowed)}"


def _likely_meant(key: str, allowed: list[str]) -> str | None:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return close[0] if close else None


def _suggestion(key: str, allowed: list[str]) -> str:
    meant = _likely_meant(key, allowed)
    return f"; did you mean '{meant}'?" if meant else f"; expected one of: {', '.join(allowed)}"


def _describe_type(error: ValidationError) -> Iterator[Finding]:
    expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
    wanted = " or ".join(_TYPE_WORDS.get(name, name) for name in expected)
    message = f"expected {wanted}, got {_describe_value(error.instance)}"
    if "string" in expected and isinstance(error.instance, int | float):
        message += "; quote it to make it text"
    yield _path(error), False, message


def _describe_value(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    kind = {int: "integer", float: "number", str: "string"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}"


def _describe_enum(error: ValidationError) -> Iterator[Finding]:
    choices = ", ".join(str(choice) for choice in error.validator_value)
    yield _path(error), False, f"{error.instance!r} must be one of {choices}"


def _describe_const(error: ValidationError) -> Iterator[Finding]:
    yield _path(error), False, f"{error.instance!r} must be {error.validator_value!r}"


def _describe_pattern(error: ValidationError) -> Iterator[Finding]:
    rule = error.schema.get("errorMessage") or f"must match the pattern {error.validator_value}"
    yield _path(error), False, f"{error.instance!r} {rule}"


def _describe_bound(error: ValidationError) -> Iterator[Finding]:
    phrase = {"minimum": "at least", "maximum": "at most", "exclusiveMinimum": "greater than"}
    bound = phrase.get(str(error.validator), str(error.validator))
    yield _path(error), False, f"{error.instance!r} must be {bound} {error.validator_value}"


def _describe_min_items(error: ValidationError) -> Iterator[Finding]:
    count = error.validator_value
    yield _path(error), False, "must not be empty" if count == 1 else f"must have at least {count} entries"


def _describe_min_length(error: ValidationError) -> Iterator[Finding]:
    yield _path(error), False, "must not be empty"


def _describe_unique(error: ValidationError) -> Iterator[Finding]:
    # Point at the first repeat rather than at the whole list.
    for index, item in enumerate(error.instance):
        if item in error.instance[:index]:
            yield (*_path(error), index), False, f"{item!r} is listed twice"
            return


def _describe_alternatives(error: ValidationError) -> Iterator[Finding]:
    """oneOf/anyOf: report the branch that the value was evidently meant for, not the whole instance.

    An error from inside the value (a bad list item) or a constraint of a branch the value's type
    matched (an empty list) says more than "not valid under any of the given schemas"; when every
    branch failed on type alone, the schema's errorMessage names what is accepted.
    """
    specific = [e for e in error.context or () if e.validator not in ("type", "const")]
    if specific:
        yield from _findings(best_match(specific))
        return
    rule = error.schema.get("errorMessage") or "matches none of the accepted forms"
    yield _path(error), False, f"{error.instance!r} {rule}"


def _shortened(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


_DESCRIBERS: dict[str, Callable[[ValidationError], Iterator[Finding]]] = {
    "required": _describe_required,
    "additionalProperties": _describe_additional,
    "type": _describe_type,
    "enum": _describe_enum,
    "const": _describe_const,
    "pattern": _describe_pattern,
    "minimum": _describe_bound,
    "maximum": _describe_bound,
    "exclusiveMinimum": _describe_bound,
    "minItems": _describe_min_items,
    "minLength": _describe_min_length,
    "uniqueItems": _describe_unique,
    "oneOf": _describe_alternatives,
    "anyOf": _describe_alternatives,
}
