"""The manifest's JSON Schema: where it lives, and the defaults it declares.

``schemas/cluster.schema.json`` is the one definition of the manifest's structure and defaults. Wheels
carry a copy inside the package (pyproject's force-include); editable installs read the repo's file.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator


def schema_path() -> Path:
    """The schema file: the packaged copy when installed from a wheel, else the repository's."""
    packaged = Path(__file__).with_name("cluster.schema.json")
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "schemas" / "cluster.schema.json"


@cache
def load_schema() -> dict[str, Any]:
    """The parsed schema, checked against the 2020-12 meta-schema once per process."""
    schema = json.loads(schema_path().read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return schema


def manifest_validator() -> Draft202012Validator:
    """A validator for whole manifests."""
    return Draft202012Validator(load_schema())


def with_defaults(data: Any) -> Any:
    """A copy of ``data`` with the schema's defaults filled in wherever a key is absent.

    Safe on invalid data: it descends only where the value's shape matches the schema, so it can run
    before semantic checks even when the schema has already failed.
    """
    schema = load_schema()
    return _fill(schema, copy.deepcopy(data), schema)


def _fill(node_schema: dict[str, Any], value: Any, root: dict[str, Any]) -> Any:
    node_schema = _resolved(node_schema, root)
    if isinstance(value, dict):
        for key, property_schema in node_schema.get("properties", {}).items():
            property_schema = _resolved(property_schema, root)
            if key not in value and "default" in property_schema:
                value[key] = copy.deepcopy(property_schema["default"])
            if key in value:
                value[key] = _fill(property_schema, value[key], root)
    elif isinstance(value, list) and "items" in node_schema:
        return [_fill(node_schema["items"], item, root) for item in value]
    return value


def _resolved(node_schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """A schema with its local ``$ref`` merged in; keywords beside the ``$ref`` win (2020-12 semantics
    would apply both; for defaults and descriptions the nearer one is the one meant)."""
    reference = node_schema.get("$ref")
    if not reference:
        return node_schema
    target: Any = root
    for part in reference.removeprefix("#/").split("/"):
        target = target[part]
    merged = {**_resolved(target, root), **node_schema}
    del merged["$ref"]
    return merged
