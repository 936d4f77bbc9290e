"""Valid manifest data (schema defaults already filled in) → the frozen dataclasses of ``types``.

Only data that passed every check reaches here, so lookups are direct: a KeyError would be a bug in
the schema, not in the user's file.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from genmlx.manifest.types import (
    ApiKey,
    Auth,
    Manifest,
    Master,
    Mesh,
    ModelSpec,
    Node,
    Serving,
    Source,
    StoragePath,
    Tls,
)
from genmlx.wire.codec import decode


def build_manifest(data: dict[str, Any]) -> Manifest:
    """The manifest as dataclasses, with ``nodes: "*"`` expanded in declaration order."""
    spec = data["spec"]
    nodes = tuple(build_node(node) for node in spec["nodes"])
    every_node = tuple(node.name for node in nodes)
    return Manifest(
        name=data["metadata"]["name"],
        master=build_master(spec["master"]),
        nodes=nodes,
        models=tuple(build_model(model, every_node) for model in spec["models"]),
        auth=Auth(
            token_file=spec["auth"].get("tokenFile"),
            api_keys=tuple(build_api_key(key) for key in spec["auth"]["apiKeys"]),
        ),
        mesh=Mesh(
            topology=spec["mesh"]["topology"], backend=spec["mesh"]["backend"], port=int(spec["mesh"]["port"])
        ),
    )


def build_master(master: dict[str, Any]) -> Master:
    tls = master.get("tls")
    return Master(
        node=master["node"],
        port=int(master["port"]),
        tls=Tls(cert_file=tls["certFile"], key_file=tls["keyFile"]) if tls else None,
    )


def build_api_key(key: dict[str, Any]) -> ApiKey:
    models = key.get("models")
    expires = key.get("expires")
    return ApiKey(
        name=key["name"],
        sha256=key["sha256"],
        models=tuple(models) if models is not None else None,
        expires=parse_expiry(expires) if expires is not None else None,
        requests_per_minute=key.get("requestsPerMinute"),
        metrics=key.get("metrics", False),
    )


def parse_expiry(text: str) -> float:
    """``2027-01-31`` (its start, UTC) or an RFC 3339 date-time (UTC when it names no offset), as
    unix time; ``ValueError`` for anything else."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


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
