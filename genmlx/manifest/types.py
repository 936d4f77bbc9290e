"""The manifest as frozen dataclasses: what the loader returns and all later code reads.

Field names follow Python style; the YAML keys they come from are camelCase (``maxGB`` →
``max_gb``). Defaults here are the documented defaults of ``schemas/cluster.schema.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Literal

from genmlx.wire.serving import ServingSettings

DEFAULT_MASTER_PORT = 6789
DEFAULT_AGENT_PORT = 6790
DEFAULT_DISPATCHER_PORT = 8100
DEFAULT_RING_PORT = 32323
# The schema's rule for every name (nodes, models, keys: ``$defs.name``), for what names things
# outside a manifest (a node that joins, a key being made).
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")

Topology = Literal["full-mesh", "ring"]
Backend = Literal["auto", "jaccl", "nccl", "ring"]
Parallelism = Literal["auto", "tensor", "pipeline"]


@dataclass(frozen=True)
class Source:
    """Where a model comes from: ``hf://org/repo`` or ``file:///abs/path``."""

    scheme: Literal["hf", "file"]
    location: str  # "org/repo" for hf, an absolute (or ~) path for file

    def __str__(self) -> str:
        return f"{self.scheme}://{self.location}"


@dataclass(frozen=True)
class StoragePath:
    path: str  # absolute or starting with "~", expanded on the node that owns it
    max_gb: float | None = None


@dataclass(frozen=True)
class Node:
    name: str
    address: str | None = None  # "host:port" of the agent where discovery cannot reach it
    storage: tuple[StoragePath, ...] = ()
    prune: bool = False  # delete files of models no longer placed on this node


@dataclass(frozen=True)
class Tls:
    """The master's certificate and key, files on its node ("~" is that node's home)."""

    cert_file: str
    key_file: str


@dataclass(frozen=True)
class Master:
    node: str
    port: int = DEFAULT_MASTER_PORT
    tls: Tls | None = None  # None: plain HTTP

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


@dataclass(frozen=True)
class ApiKey:
    """A client's key to the models, by its SHA-256 (the key itself is never in the manifest)."""

    name: str
    sha256: str
    models: tuple[str, ...] | None = None  # None: every model
    expires: float | None = None  # unix time; None: never
    requests_per_minute: int | None = None
    metrics: bool = False  # may read the master's /metrics (a Prometheus server's key)

    def reaches(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class Auth:
    token_file: str | None = None  # None: $GENMLX_HOME/token
    api_keys: tuple[ApiKey, ...] = ()


@dataclass(frozen=True)
class Mesh:
    topology: Topology = "full-mesh"
    backend: Backend = "auto"
    port: int = DEFAULT_RING_PORT  # where ring ports start: each rank the first free from it on its host


@dataclass(frozen=True)
class Serving(ServingSettings):
    """``spec.models[].serving``: the settings every rank is started with, and where rank 0 listens."""

    port: int | None = None  # rank 0's HTTP port, where its other ranks' start; None: from 8100

    def settings(self) -> ServingSettings:
        """The part each rank is launched with."""
        return ServingSettings(**{f.name: getattr(self, f.name) for f in fields(ServingSettings)})


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the id clients send as "model"
    source: Source
    nodes: tuple[str, ...]  # "*" is expanded by the loader to every declared node
    revision: str = "main"
    parallelism: Parallelism = "auto"
    serving: Serving = field(default_factory=Serving)
    prune: bool = False


@dataclass(frozen=True)
class Manifest:
    name: str
    master: Master
    nodes: tuple[Node, ...]
    models: tuple[ModelSpec, ...] = ()
    auth: Auth = field(default_factory=Auth)
    mesh: Mesh = field(default_factory=Mesh)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)
