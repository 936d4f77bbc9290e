"""A wire dataclass as a command line and back, from the same field list as its JSON form.

``to_argv(value)`` writes ``--kebab-name value`` for every field that is not ``None`` (tuples joined
with commas; the fields of a nested dataclass flattened into the same flags). ``from_argv(cls, argv)``
builds an ``argparse`` parser from those fields (a field's ``flag`` and ``help`` come from
``arg(...)``), turns each string into its type and hands the result to ``codec.decode``, so a
command line is checked by exactly the rules that check the JSON form; a problem exits with
argparse's usage message naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from typing import Any, Literal, TypeVar, get_args, get_origin

from genmlx.wire.codec import Bounds, WireError, camel, decode, field_hints, init_fields, snake

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag: the field it fills (its wire path, ``serving.maxBatch``) and its type."""

    flag: str
    path: tuple[str, ...]
    hint: Any
    field: dataclasses.Field


def arg(default: Any = dataclasses.MISSING, *, flag: str | None = None, help: str = "", **bounds: Any) -> Any:
    """A dataclass field with its command-line ``flag`` (default: ``--`` + the name in kebab case),
    its ``help`` text and any ``codec.bounded`` bounds."""
    metadata: dict[str, Any] = {"flag": flag, "help": help}
    if bounds:
        metadata["bounds"] = Bounds(**bounds)
    return dataclasses.field(default=default, metadata=metadata)


def flags_of(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[Flag]:
    """The flags of ``cls``, nested dataclasses flattened, in field order."""
    hints = field_hints(cls)
    for f in init_fields(cls):
        hint = hints[f.name]
        path = (*prefix, camel(f.name))
        if dataclasses.is_dataclass(hint):
            yield from flags_of(hint, path)
        else:
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            yield Flag(flag, path, hint, f)


def to_argv(value: Any) -> list[str]:
    """``value``'s fields as flags; ``None`` fields are left out (they take their default)."""
    argv: list[str] = []
    for flag in flags_of(type(value)):
        item = value
        for key in flag.path:
            item = getattr(item, snake(key))
        if item is None:
            continue
        text = ",".join(str(v) for v in item) if isinstance(item, tuple) else str(item)
        argv += [flag.flag, text]
    return argv


def from_argv(cls: type[T], argv: list[str], parser: argparse.ArgumentParser) -> T:
    """Parse ``argv`` into ``cls`` with ``parser`` (which brings the program's name and description);
    exits with a usage message on bad input."""
    flags = list(flags_of(cls))
    for flag in flags:
        _add_argument(parser, flag)
    namespace = vars(parser.parse_args(argv))
    data: dict[str, Any] = {}
    for flag in flags:
        text = namespace[_dest(flag)]
        if text is None:
            continue
        try:
            value = _from_text(flag.hint, text)
        except ValueError:
            parser.error(f"{flag.flag}: {text!r} is not {_word(flag.hint)}")
        _put(data, flag.path, value)
    try:
        return decode(cls, data)
    except WireError as e:
        parser.error(_in_flags(str(e), flags))


def _add_argument(parser: argparse.ArgumentParser, flag: Flag) -> None:
    f = flag.field
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = None if required or f.default is dataclasses.MISSING else f.default
    help_text = f.metadata.get("help", "")
    if default is not None:
        help_text += f" (default {default})"
    choices = _choices(flag.hint)
    parser.add_argument(
        flag.flag, dest=_dest(flag), required=required, default=None, choices=choices, help=help_text.strip()
    )


def _dest(flag: Flag) -> str:
    return "_".join(flag.path)


def _choices(hint: Any) -> tuple[str, ...] | None:
    inner = _without_none(hint)
    return tuple(get_args(inner)) if get_origin(inner) is Literal else None


def _without_none(hint: Any) -> Any:
    args = [a for a in get_args(hint) if a is not type(None)]
    if len(args) == 1 and len(args) < len(get_args(hint)):
        return args[0]
    return hint


def _from_text(hint: Any, text: str) -> Any:
    hint = _without_none(hint)
    if get_origin(hint) is tuple:
        return [_from_text(get_args(hint)[0], part) for part in text.split(",")]
    if hint is int:
        return int(text)
    if hint is float:
        return float(text)
    return text


def _word(hint: Any) -> str:
    hint = _without_none(hint)
    if get_origin(hint) is tuple:
        return "a list of " + _word(get_args(hint)[0]) + "s separated by commas"
    return {int: "an integer", float: "a number"}.get(hint, "valid")


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = value


def _in_flags(message: str, flags: list[Flag]) -> str:
    """A codec message about ``serving.maxBatch`` speaks of ``--max-batch`` instead."""
    for flag in flags:
        path = ".".join(flag.path)
        if message.startswith(path + ":"):
            return flag.flag + message[len(path) :]
    return message
