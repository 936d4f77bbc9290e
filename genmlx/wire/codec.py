"""One codec for every wire type: frozen dataclasses to JSON-ready values and back.

Field names are camelCase on the wire (``model_path`` ↔ ``modelPath``), like the manifest. Decoding
checks every value against its field's type hint — ``int`` (never a bool), ``float``, ``str``,
``bool``, ``Literal``, ``X | None``, ``tuple[X, ...]``, nested dataclasses — and against the bounds a
field declares with ``bounded(...)``; a missing field takes its default or is an error. Every error
is a ``WireError`` whose message starts with the field's path (``launch.worldSize: 0 must be at
least 1``), so whoever sent the document learns what to fix.

A wire type subclasses ``WireType`` for ``to_json`` / ``from_json``, and may define ``check()`` for
rules that span fields; ``decode`` runs it after the fields are read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

from genmlx.core.errors import PermanentError

T = TypeVar("T")
Unknown = Literal["refuse", "ignore"]


class WireError(PermanentError):
    """A document does not match its wire type; ``path`` names the field (empty for the whole body)."""

    status = 400

    def __init__(self, path: str, problem: str):
        self.path = path
        super().__init__(f"{path}: {problem}" if path else problem)


@dataclass(frozen=True)
class Bounds:
    """What a field's value must satisfy beyond its type: a range, or a pattern (``rule`` says it in
    words, for the error)."""

    minimum: int | None = None
    maximum: int | None = None
    pattern: re.Pattern[str] | None = None
    rule: str = ""
    non_empty: bool = False

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str):
            if self.non_empty and not value:
                return "required, a non-empty string"
            if self.pattern is not None and not self.pattern.fullmatch(value):
                return f"{value!r} {self.rule}"
        elif isinstance(value, int | float):
            too_low = self.minimum is not None and value < self.minimum
            too_high = self.maximum is not None and value > self.maximum
            if too_low or too_high:
                upper = f" and at most {self.maximum}" if self.maximum is not None else ""
                return f"{value} must be at least {self.minimum}{upper}"
        return None


def bounded(default: Any = dataclasses.MISSING, **bounds: Any) -> Any:
    """A dataclass field with ``Bounds`` (``minimum``, ``maximum``, ``pattern`` + ``rule``,
    ``non_empty``) that ``decode`` enforces on its value, or on each item of a tuple."""
    return dataclasses.field(default=default, metadata={"bounds": Bounds(**bounds)})


# Parts of a field name written in capitals on the wire, as the manifest writes sizes (``maxGB``).
ACRONYMS = {"gb": "GB"}


def camel(name: str) -> str:
    """``model_path`` → ``modelPath``, ``disk_cache_gb`` → ``diskCacheGB``."""
    first, *rest = name.split("_")
    return first + "".join(ACRONYMS.get(part, part.capitalize()) for part in rest)


def snake(key: str) -> str:
    """``modelPath`` → ``model_path``, ``diskCacheGB`` → ``disk_cache_gb``: ``camel`` undone."""
    for part, written in ACRONYMS.items():
        key = key.replace(written, "_" + part)
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in key)


def encode(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses become objects with camelCase keys, tuples lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {camel(f.name): encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [encode(item) for item in value]
    if isinstance(value, dict):
        return {key: encode(item) for key, item in value.items()}
    return value


def decode(cls: type[T], data: Any, *, unknown: Unknown = "refuse", path: str = "") -> T:
    """The ``cls`` that ``data`` describes, checked field by field; ``WireError`` naming the first
    field at fault. ``unknown="ignore"`` reads reports from newer peers that carry more fields."""
    if not isinstance(data, dict):
        raise WireError(path, "expected a JSON object" if path else "body: expected a JSON object")
    names = {camel(f.name): f for f in init_fields(cls)}
    extra = sorted(set(data) - set(names))
    if extra and unknown == "refuse":
        raise WireError(_join(path, extra[0]), "unknown field")
    values = {}
    hints = field_hints(cls)
    for key, f in names.items():
        where = _join(path, key)
        if key not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise WireError(where, "required")
            continue
        values[f.name] = _decode_value(hints[f.name], data[key], where, unknown, f.metadata.get("bounds"))
    instance = cls(**values)
    check = getattr(instance, "check", None)
    if check is not None:
        check()
    return instance


def decode_json(cls: type[T], body: bytes, *, error: Callable[[str], Exception] | None = None) -> T:
    """``decode`` a request body (JSON bytes); ``error`` turns the ``WireError`` message into the
    caller's own exception type."""
    try:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WireError("body", f"not valid JSON ({e})") from None
        except RecursionError:
            raise WireError("body", "JSON nested too deeply") from None
        return decode(cls, data)
    except WireError as e:
        if error is None:
            raise
        raise error(str(e)) from None


class WireType:
    """Mixin for wire dataclasses: ``to_json`` and ``from_json`` through this codec. Reports read with
    ``from_json`` ignore fields they do not know (a newer peer's); requests use ``decode``."""

    def to_json(self) -> dict[str, Any]:
        return encode(self)

    @classmethod
    def from_json(cls: type[T], data: dict[str, Any]) -> T:
        return decode(cls, data, unknown="ignore")


@functools.cache
def init_fields(cls: type) -> tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(cls) if f.init)


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _decode_value(hint: Any, value: Any, where: str, unknown: Unknown, bounds: Bounds | None) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _decode_union(hint, value, where, unknown, bounds)
    if origin is tuple:
        return _decode_tuple(hint, value, where, unknown, bounds)
    if origin is Literal:
        if value not in get_args(hint):
            raise WireError(where, f"{value!r} must be one of {', '.join(map(str, get_args(hint)))}")
        return value
    if dataclasses.is_dataclass(hint):
        return decode(hint, value, unknown=unknown, path=where)
    decoded = _decode_scalar(hint, value, where)
    problem = bounds.problem(decoded) if bounds is not None else None
    if problem:
        raise WireError(where, problem)
    return decoded


def _decode_union(hint: Any, value: Any, where: str, unknown: Unknown, bounds: Bounds | None) -> Any:
    options = [arg for arg in get_args(hint) if arg is not type(None)]
    if value is None:
        if len(options) < len(get_args(hint)):
            return None
        raise WireError(where, "required, not null")
    last: WireError | None = None
    for option in options:
        try:
            return _decode_value(option, value, where, unknown, bounds)
        except WireError as e:
            last = e
    assert last is not None
    raise last


def _decode_tuple(hint: Any, value: Any, where: str, unknown: Unknown, bounds: Bounds | None) -> tuple:
    if not isinstance(value, list | tuple):
        raise WireError(where, "expected a list")
    args = get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(
            _decode_value(args[0], item, _join(where, i), unknown, bounds) for i, item in enumerate(value)
        )
    if len(value) != len(args):
        raise WireError(where, f"expected a list of {len(args)}")
    return tuple(
        _decode_value(arg, item, _join(where, i), unknown, bounds)
        for i, (arg, item) in enumerate(zip(args, value, strict=True))
    )


SCALARS: dict[Any, tuple[type, ...]] = {str: (str,), bool: (bool,), int: (int,), float: (int, float)}
SCALAR_WORDS = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}


def _decode_scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    accepted = SCALARS.get(hint)
    if hint is int:
        value = _integral(value)
    if accepted is None:
        raise TypeError(f"{where}: the wire codec cannot decode {hint!r}")
    # bool is an int in Python but never a sensible count, port or size.
    if not isinstance(value, accepted) or (hint is not bool and isinstance(value, bool)):
        raise WireError(where, f"expected {SCALAR_WORDS[hint]}")
    return float(value) if hint is float else value


def _integral(value: Any) -> Any:
    """8.0 as 8: JSON (and JSON Schema's ``integer``) does not tell them apart."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
