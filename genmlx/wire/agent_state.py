"""What an agent reports and what it is asked to run: the agent's wire format, shared by the
agent (which produces it) and the reconciler (which consumes it).

Each type converts to and from plain JSON dicts with camelCase keys, so the HTTP API reads the
same as the manifest. Nothing here does I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

RankState = Literal["running", "exited"]
RankPhase = Literal["starting", "loading", "ready", "exited"]
TransferKind = Literal["download", "sync"]
TransferState = Literal["running", "failed", "done"]

# A model's name becomes part of a log file name and of URLs: keep it to one safe path segment.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


InterfaceKind = Literal["thunderbolt", "ethernet", "wifi", "loopback", "other"]


@dataclass(frozen=True)
class NetworkInterface:
    name: str  # "en0", "bridge0", "eth0"
    kind: InterfaceKind
    addresses: tuple[str, ...] = ()  # IPv4 and IPv6 addresses, without prefix length
    # Whether something is at the other end of the cable: for a Thunderbolt port on macOS, another
    # computer (a drive or a dock does not count); on Linux, the carrier. None where the OS does not tell.
    linked: bool | None = None
    # Thunderbolt ports on macOS only. A cable joins the port whose ``peer_domain`` is the other's
    # ``domain`` (system_profiler's Thunderbolt domain UUIDs); ``rdma_device`` is the device jaccl
    # reaches that peer through ("rdma_en2"), set where RDMA is enabled and the port is active.
    domain: str | None = None
    peer_domain: str | None = None
    rdma_device: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "addresses": list(self.addresses),
            "linked": self.linked,
            "domain": self.domain,
            "peerDomain": self.peer_domain,
            "rdmaDevice": self.rdma_device,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NetworkInterface:
        return cls(
            name=d["name"],
            kind=d["kind"],
            addresses=tuple(d.get("addresses") or ()),
            linked=d.get("linked"),
            domain=d.get("domain"),
            peer_domain=d.get("peerDomain"),
            rdma_device=d.get("rdmaDevice"),
        )


@dataclass(frozen=True)
class NodeFacts:
    hostname: str
    os: str  # "Darwin 24.1.0", "Linux 6.1.0-18-amd64"
    arch: str  # "arm64", "x86_64"
    cpu_count: int
    memory_total: int  # bytes
    memory_available: int  # bytes
    os_version: str = ""  # "macOS 15.1", "Debian GNU/Linux 12 (bookworm)"
    chip: str = ""  # "Apple M2 Ultra", "AMD EPYC 7B13"
    gpu: str = ""  # "Metal" where MLX can use the GPU, "" where it runs on the CPU
    interfaces: tuple[NetworkInterface, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "os": self.os,
            "arch": self.arch,
            "cpuCount": self.cpu_count,
            "memoryTotal": self.memory_total,
            "memoryAvailable": self.memory_available,
            "osVersion": self.os_version,
            "chip": self.chip,
            "gpu": self.gpu,
            "interfaces": [i.to_json() for i in self.interfaces],
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
            os_version=d.get("osVersion", ""),
            chip=d.get("chip", ""),
            gpu=d.get("gpu", ""),
            interfaces=tuple(NetworkInterface.from_json(i) for i in d.get("interfaces") or ()),
        )


@dataclass(frozen=True)
class ModelShape:
    """What placement needs to know about a stored model, read from its config.json and weights.

    ``weight_bytes`` is the safetensors index's ``metadata.total_size`` where there is an index, else
    the size of the ``*.safetensors`` files. The KV cache holds ``kv_dtype_bytes`` per value: the
    model's float dtype, 2 for quantized models (they keep a float16 cache).
    """

    weight_bytes: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    kv_dtype_bytes: int = 2
    max_position_embeddings: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "weightBytes": self.weight_bytes,
            "numLayers": self.num_layers,
            "numAttentionHeads": self.num_attention_heads,
            "numKeyValueHeads": self.num_key_value_heads,
            "headDim": self.head_dim,
            "kvDtypeBytes": self.kv_dtype_bytes,
            "maxPositionEmbeddings": self.max_position_embeddings,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelShape:
        return cls(
            weight_bytes=d["weightBytes"],
            num_layers=d["numLayers"],
            num_attention_heads=d["numAttentionHeads"],
            num_key_value_heads=d["numKeyValueHeads"],
            head_dim=d["headDim"],
            kv_dtype_bytes=d.get("kvDtypeBytes", 2),
            max_position_embeddings=d.get("maxPositionEmbeddings"),
        )


@dataclass(frozen=True)
class StoredModel:
    """A model directory found in a storage path.

    ``complete`` means every file its metadata lists is present with the recorded size (sha256 is
    checked when the directory is published and when a file is served or synced, and re-checked
    by the agent's scrub). A directory without metadata (a model put there by hand) is complete
    when it has config.json and weights. ``problem`` says why an incomplete one is not complete.
    """

    name: str  # the directory's name
    path: str  # absolute path on the node
    size_bytes: int
    complete: bool
    source: str | None = None  # from the metadata: "hf://org/repo", "file:///path"
    revision: str | None = None  # the revision asked for ("main", a tag, a commit)
    commit: str | None = None  # the commit it resolved to, where the source has commits
    shape: ModelShape | None = None  # complete models whose config.json could be read
    problem: str | None = None  # "model.safetensors: sha256 does not match", "...: missing"
    # When this copy was put in place (its metadata written): a copy replaced under the same path
    # (re-synced after damage) has a new one, so ranks loaded from the old copy are restarted.
    published_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "sizeBytes": self.size_bytes,
            "complete": self.complete,
            "source": self.source,
            "revision": self.revision,
            "commit": self.commit,
            "shape": self.shape.to_json() if self.shape is not None else None,
            "problem": self.problem,
            "publishedAt": self.published_at,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StoredModel:
        return cls(
            name=d["name"],
            path=d["path"],
            size_bytes=d["sizeBytes"],
            complete=d["complete"],
            source=d.get("source"),
            revision=d.get("revision"),
            commit=d.get("commit"),
            shape=ModelShape.from_json(d["shape"]) if d.get("shape") is not None else None,
            problem=d.get("problem"),
            published_at=d.get("publishedAt"),
        )


@dataclass(frozen=True)
class StorageReport:
    path: str  # expanded absolute path
    exists: bool
    total_bytes: int
    free_bytes: int
    models: tuple[StoredModel, ...] = ()
    partials: tuple[StoredModel, ...] = ()  # transfers in progress or interrupted; never complete

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "exists": self.exists,
            "totalBytes": self.total_bytes,
            "freeBytes": self.free_bytes,
            "models": [m.to_json() for m in self.models],
            "partials": [m.to_json() for m in self.partials],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StorageReport:
        return cls(
            path=d["path"],
            exists=d["exists"],
            total_bytes=d["totalBytes"],
            free_bytes=d["freeBytes"],
            models=tuple(StoredModel.from_json(m) for m in d["models"]),
            partials=tuple(StoredModel.from_json(m) for m in d.get("partials") or ()),
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
    parallelism: str = "tensor"  # how a group of ranks splits the model: "tensor" or "pipeline"
    layer_split: tuple[int, ...] | None = None  # pipeline only: layers per rank (None: even)

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
            "parallelism": self.parallelism,
            "layerSplit": list(self.layer_split) if self.layer_split is not None else None,
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
            parallelism=d.get("parallelism", "tensor"),
            layer_split=tuple(d["layerSplit"]) if d.get("layerSplit") is not None else None,
        )


@dataclass(frozen=True)
class RankInfo:
    """A rank the agent started, alive or exited."""

    launch: RankLaunch
    pid: int
    state: RankState
    started_at: float  # unix time
    exit_code: int | None = None
    phase: RankPhase = "starting"  # finer than state while running: what its /health says
    restarts: int = 0  # earlier starts of the same model and rank on this agent

    def to_json(self) -> dict[str, Any]:
        return {
            "launch": self.launch.to_json(),
            "pid": self.pid,
            "state": self.state,
            "startedAt": self.started_at,
            "exitCode": self.exit_code,
            "phase": self.phase,
            "restarts": self.restarts,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RankInfo:
        return cls(
            launch=RankLaunch.from_json(d["launch"]),
            pid=d["pid"],
            state=d["state"],
            started_at=d["startedAt"],
            exit_code=d.get("exitCode"),
            phase=d.get("phase", "starting"),
            restarts=d.get("restarts", 0),
        )


@dataclass(frozen=True)
class FetchRequest:
    """Ask an agent to make a model present in one of its storage paths (``POST /api/v1/models``).

    With ``peer`` set the agent copies the model from that agent, and ``source``/``revision``, when
    given, say what the copy must hold; without it, the agent fetches ``source`` itself (downloads
    an ``hf://`` repo, adopts a ``file://`` directory in place). The transfer runs in the
    background; its progress shows in ``AgentState``.
    """

    model: str  # the directory name it gets: the manifest's model name
    storage_path: str  # one of the agent's storage paths, as the agent reports it
    source: str | None = None
    revision: str = "main"
    peer: str | None = None  # "host:port" of the agent that has it
    peer_model: str | None = None  # its directory name there (default: ``model``)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "storagePath": self.storage_path,
            "source": self.source,
            "revision": self.revision,
            "peer": self.peer,
            "peerModel": self.peer_model,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FetchRequest:
        return cls(
            model=d["model"],
            storage_path=d["storagePath"],
            source=d.get("source"),
            revision=d.get("revision") or "main",
            peer=d.get("peer"),
            peer_model=d.get("peerModel"),
        )


@dataclass(frozen=True)
class Transfer:
    """A download or sync the agent runs or ran, as reported in ``AgentState``."""

    model: str
    kind: TransferKind
    origin: str  # "hf://org/repo@main" or "peer 10.0.0.2:6790/model"
    storage_path: str
    state: TransferState
    bytes_done: int = 0
    bytes_total: int | None = None  # None until known
    error: str | None = None
    permanent: bool = False  # a failure that retrying cannot fix (not found, gated, no room)
    started_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "kind": self.kind,
            "origin": self.origin,
            "storagePath": self.storage_path,
            "state": self.state,
            "bytesDone": self.bytes_done,
            "bytesTotal": self.bytes_total,
            "error": self.error,
            "permanent": self.permanent,
            "startedAt": self.started_at,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Transfer:
        return cls(
            model=d["model"],
            kind=d["kind"],
            origin=d["origin"],
            storage_path=d["storagePath"],
            state=d["state"],
            bytes_done=d.get("bytesDone", 0),
            bytes_total=d.get("bytesTotal"),
            error=d.get("error"),
            permanent=d.get("permanent", False),
            started_at=d.get("startedAt", 0.0),
        )


@dataclass(frozen=True)
class AgentState:
    """The whole report of ``GET /api/v1/state``."""

    name: str
    version: str
    facts: NodeFacts
    storage: tuple[StorageReport, ...] = ()
    ranks: tuple[RankInfo, ...] = field(default_factory=tuple)
    transfers: tuple[Transfer, ...] = ()
    node_id: str = ""  # stable across restarts, kept in GENMLX_HOME

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "nodeId": self.node_id,
            "facts": self.facts.to_json(),
            "storage": [s.to_json() for s in self.storage],
            "ranks": [r.to_json() for r in self.ranks],
            "transfers": [t.to_json() for t in self.transfers],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AgentState:
        return cls(
            name=d["name"],
            version=d["version"],
            facts=NodeFacts.from_json(d["facts"]),
            storage=tuple(StorageReport.from_json(s) for s in d["storage"]),
            ranks=tuple(RankInfo.from_json(r) for r in d["ranks"]),
            transfers=tuple(Transfer.from_json(t) for t in d.get("transfers") or ()),
            node_id=d.get("nodeId", ""),
        )


def rank_key(model: str, rank: int) -> str:
    """The id of a rank on its agent, used in URLs: ``<model>.<rank>``."""
    return f"{model}.{rank}"
