"""Our OpenAI API's JSON checked against OpenAI's published OpenAPI spec (a trimmed copy in
``tests/data/openapi/``, which names its source commit and version), strictly: the document
validates as JSON Schema 2020-12 and carries no field the schema does not name (the spec leaves
objects open, so a misspelt field would otherwise pass).

The spec is OpenAPI 3.1 but still marks some schemas with 3.0's ``nullable: true``; those are read
as "this schema, or null", as OpenAPI 3.0 meant it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).parent / "data" / "openapi" / "openai-openapi.json"
BASE = "urn:openai-openapi"


def _read_nullable(schema: Any) -> Any:
    """``schema`` with each ``nullable: true`` rewritten as an ``anyOf`` with null, and every
    ``$ref`` made absolute so that a branch can be checked on its own."""
    if isinstance(schema, list):
        return [_read_nullable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _read_nullable(v) for k, v in schema.items()}
    if isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#"):
        schema["$ref"] = BASE + schema["$ref"]
    if schema.pop("nullable", False):
        return {"anyOf": [schema, {"type": "null"}]}
    return schema


def _completion_chunk(schemas: dict) -> dict:
    """``CompletionStreamChunk``: the spec gives a completion stream's chunks the whole response's
    schema, whose ``finish_reason`` is a string; OpenAI streams it as null until the last chunk, as
    the spec's chat chunks declare. Only that is relaxed."""
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    choice = chunk["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    return chunk


SPEC = json.loads(SPEC_PATH.read_text())
_SCHEMAS = _read_nullable(SPEC["components"]["schemas"])
_DOCUMENT = {"components": {"schemas": {**_SCHEMAS, "CompletionStreamChunk": _completion_chunk(_SCHEMAS)}}}
_REGISTRY = Registry().with_resource(BASE, Resource.from_contents(_DOCUMENT, DRAFT202012))


def schema(name: str) -> dict:
    """The spec's component schema ``name``, as published (``nullable`` kept)."""
    return SPEC["components"]["schemas"][name]


def validate(name: str, document: Any, extensions: frozenset[str] = frozenset()) -> None:
    """Assert that ``document`` is a valid ``name`` (a component schema) with no field the spec
    does not name, except ``extensions``: fields we add on purpose, allowed in any object."""
    ref = {"$ref": f"{BASE}#/components/schemas/{name}"}
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in _validator(ref).iter_errors(document)
    ]
    assert not errors, f"not a valid {name}:\n" + "\n".join(errors) + f"\n{json.dumps(document)[:2000]}"
    unknown = list(_unknown_fields(ref, document, name, extensions))
    assert not unknown, f"fields {name} does not define: {unknown}\n{json.dumps(document)[:2000]}"


def _validator(schema: dict) -> Draft202012Validator:
    return Draft202012Validator(schema, registry=_REGISTRY)


def _applying(schema: Any, instance: Any) -> Iterator[dict]:
    """The schemas that describe ``instance`` under ``schema``: references followed, every
    ``allOf`` part, and the ``anyOf``/``oneOf`` branches that it matches."""
    if not isinstance(schema, dict):
        return
    if "$ref" in schema:
        yield from _applying(_REGISTRY.resolver().lookup(schema["$ref"]).contents, instance)
    yield schema
    for part in schema.get("allOf", []):
        yield from _applying(part, instance)
    for branch in schema.get("anyOf", []) + schema.get("oneOf", []):
        if _validator(branch).is_valid(instance):
            yield from _applying(branch, instance)


def _unknown_fields(schema: dict, instance: Any, where: str, extensions: frozenset[str]) -> Iterator[str]:
    applying = list(_applying(schema, instance))
    if isinstance(instance, list):
        items = [s["items"] for s in applying if isinstance(s.get("items"), dict)]
        for i, item in enumerate(instance):
            for item_schema in items:
                yield from _unknown_fields(item_schema, item, f"{where}[{i}]", extensions)
    if not isinstance(instance, dict):
        return
    if any(s.get("additionalProperties") not in (None, False) for s in applying):
        return  # a map, or an object the spec leaves open on purpose
    for key, value in instance.items():
        properties = [s["properties"][key] for s in applying if key in s.get("properties", {})]
        if not properties and key not in extensions:
            yield f"{where}.{key}"
        for property_schema in properties:
            yield from _unknown_fields(property_schema, value, f"{where}.{key}", extensions)
