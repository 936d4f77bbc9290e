"""What an agent reports and what it is asked to run: the agent's wire format, shared by the
agent (which produces it) and the reconciler (which consumes it).

Each type converts to and from plain JSON dicts with camelCase keys, so the HTTP API reads the
same as the manifest. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

RankState = Literal["running", "exited"]


@dataclass(frozen=True)
class NodeFacts:
    hostname: str
    os: str  # "Darwin 24.1.0", "Linux 6.1.0-18-amd64"
    arch: str  # "arm64", "x86_64"
    cpu_count: int
    memory_total: int  # bytes
    memory_available: int  # bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "os": self.os,
            "arch": self.arch,
            "cpuCount": self.cpu_count,
            "memoryTotal": self.memory_total,
            "memoryAvailable": self.memory_available,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeFacts:
        return cls(
            hostname=d["hostname"],
            os=d["os"],
            arch=d["arch"],
            cpu_count=d["cpuCount"],
            memory_total=d["memoryTotal"],
            memory_available=d["memoryAvailable"],
        )


@dataclass(frozen=True)
class StoredModel:
    """A model directory found in a storage path."""

    name: str  # the directory's name
    path: str  # absolute path on the node
    size_bytes: int
    complete: bool  # has config.json and at least one *.safetensors file

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "sizeBytes": self.size_bytes, "complete": self.complete}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StoredModel:
        return cls(name=d["name"], path=d["path"], size_bytes=d["sizeBytes"], complete=d["complete"])


@dataclass(frozen=True)
class StorageReport:
    path: str  # expanded absolute path
    exists: bool
    total_bytes: int
    free_bytes: int
    models: tuple[StoredModel, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "exists": self.exists,
            "totalBytes": self.total_bytes,
            "freeBytes": self.free_bytes,
            "models": [m.to_json() for m in self.models],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StorageReport:
        return cls(
            path=d["path"],
            exists=d["exists"],
            total_bytes=d["totalBytes"],
            free_bytes=d["freeBytes"],
            models=tuple(StoredModel.from_json(m) for m in d["models"]),
        )


@dataclass(frozen=True)
class RankLaunch:
    """Everything an agent needs to start one dispatcher rank."""

    model: str  # the served id
    model_path: str  # absolute path inside one of the agent's storage paths
    rank: int
    world_size: int
    port: int  # rank 0's HTTP port (other ranks keep it for the record)
    spec_hash: str  # the master's fingerprint of the group's desired spec
    hostfile: tuple[str, ...] = ()  # "ip:port" per rank, for MLX's ring backend
    max_batch: int = 8
    max_queue: int = 64
    context_length: int | None = None

    @property
    def key(self) -> str:
        return rank_key(self.model, self.rank)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "modelPath": self.model_path,
            "rank": self.rank,
            "worldSize": self.world_size,
            "port": self.port,
            "specHash": self.spec_hash,
            "hostfile": list(self.hostfile),
            "maxBatch": self.max_batch,
            "maxQueue": self.max_queue,
            "contextLength": self.context_length,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RankLaunch:
        return cls(
            model=d["model"],
            model_path=d["modelPath"],
            rank=d["rank"],
            world_size=d["worldSize"],
            port=d["port"],
            spec_hash=d["specHash"],
            hostfile=tuple(d.get("hostfile") or ()),
            max_batch=d.get("maxBatch", 8),
            max_queue=d.get("maxQueue", 64),
            context_length=d.get("contextLength"),
        )


@dataclass(frozen=True)
class RankInfo:
    """A rank the agent started, alive or exited."""

    launch: RankLaunch
    pid: int
    state: RankState
    started_at: float  # unix time
    exit_code: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "launch": self.launch.to_json(),
            "pid": self.pid,
            "state": self.state,
            "startedAt": self.started_at,
            "exitCode": self.exit_code,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RankInfo:
        return cls(
            launch=RankLaunch.from_json(d["launch"]),
            pid=d["pid"],
            state=d["state"],
            started_at=d["startedAt"],
            exit_code=d.get("exitCode"),
        )


@dataclass(frozen=True)
class AgentState:
    """The whole report of ``GET /api/v1/state``."""

    name: str
    version: str
    facts: NodeFacts
    storage: tuple[StorageReport, ...] = ()
    ranks: tuple[RankInfo, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "facts": self.facts.to_json(),
            "storage": [s.to_json() for s in self.storage],
            "ranks": [r.to_json() for r in self.ranks],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AgentState:
        return cls(
            name=d["name"],
            version=d["version"],
            facts=NodeFacts.from_json(d["facts"]),
            storage=tuple(StorageReport.from_json(s) for s in d["storage"]),
            ranks=tuple(RankInfo.from_json(r) for r in d["ranks"]),
        )


def rank_key(model: str, rank: int) -> str:
    """The id of a rank on its agent, used in URLs: ``<model>.<rank>``."""
    return f"{model}.{rank}"
