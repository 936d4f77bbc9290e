"""Our Anthropic API's JSON checked against the ``anthropic`` package's own types, strictly: every
required field present, every tagged union resolved, and no field the schema does not know (the
package's models accept extras silently, so a misspelt field would otherwise pass)."""

from __future__ import annotations

import json
from typing import Any

import pydantic


def validated(kind: Any, document: dict) -> Any:
    """``document`` as the ``anthropic`` type ``kind`` (a model or a union), or an assertion error."""
    value = pydantic.TypeAdapter(kind).validate_python(document)
    _assert_no_extras(value, kind.__name__ if hasattr(kind, "__name__") else "document")
    return value


def _assert_no_extras(value: Any, where: str) -> None:
    if isinstance(value, pydantic.BaseModel):
        assert not value.model_extra, f"{where}: fields the schema does not know: {sorted(value.model_extra)}"
        for name in type(value).model_fields:
            _assert_no_extras(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _assert_no_extras(item, f"{where}[{i}]")


def sse_events(body: bytes) -> list[dict]:
    """The JSON events of a server-sent event stream, each checked to be named by its ``type``."""
    events = []
    for frame in body.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        if "data" in lines:
            event = json.loads(lines["data"])
            assert lines.get("event") == event["type"], frame
            events.append(event)
    return events
