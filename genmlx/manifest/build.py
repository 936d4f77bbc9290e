"""Valid manifest data (schema defaults already filled in) → the frozen dataclasses of ``types``.

Only data that passed every check reaches here, so lookups are direct: a KeyError would be a bug in
the schema, not in the user's file.
"""

from __future__ import annotations

from typing import Any

from genmlx.manifest.types import (
    Auth,
    Manifest,
    Master,
    Mesh,
    ModelSpec,
    Node,
    Serving,
    Source,
    StoragePath,
)
from genmlx.wire.codec import decode


def build_manifest(data: dict[str, Any]) -> Manifest:
    """The manifest as dataclasses, with ``nodes: "*"`` expanded in declaration order."""
    spec = data["spec"]
    nodes = tuple(build_node(node) for node in spec["nodes"])
    every_node = tuple(node.name for node in nodes)
    return Manifest(
        name=data["metadata"]["name"],
        master=Master(node=spec["master"]["node"], port=int(spec["master"]["port"])),
        nodes=nodes,
        models=tuple(build_model(model, every_node) for model in spec["models"]),
        auth=Auth(token_file=spec["auth"].get("tokenFile")),
        mesh=Mesh(
            topology=spec["mesh"]["topology"], backend=spec["mesh"]["backend"], port=int(spec["mesh"]["port"])
        ),
    )


def build_node(node: dict[str, Any]) -> Node:
    storage = tuple(
        StoragePath(path=entry["path"], max_gb=float(entry["maxGB"]) if "maxGB" in entry else None)
        for entry in node["storage"]
    )
    return Node(name=node["name"], address=node.get("address"), storage=storage, prune=node["prune"])


def build_model(model: dict[str, Any], every_node: tuple[str, ...]) -> ModelSpec:
    return ModelSpec(
        name=model["name"],
        source=parse_source(model["source"]),
        nodes=every_node if model["nodes"] == "*" else tuple(model["nodes"]),
        revision=model["revision"],
        parallelism=model["parallelism"],
        serving=decode(Serving, model["serving"]),
        prune=model["prune"],
    )


def parse_source(text: str) -> Source:
    """``hf://org/repo`` → Source("hf", "org/repo"); ``file:///abs`` → Source("file", "/abs")."""
    scheme, location = text.split("://", 1)
    if scheme not in ("hf", "file"):
        raise ValueError(f"unsupported source scheme {scheme!r} in {text!r}")
    return Source(scheme=scheme, location=location)

