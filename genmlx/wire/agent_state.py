"""What an agent reports and what it is asked to run: the agent's wire format, shared by the
agent (which produces it) and the reconciler (which consumes it).

Each type converts to and from plain JSON dicts with camelCase keys through ``genmlx.wire.codec``,
so the HTTP API reads the same as the manifest. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from genmlx.wire.codec import WireType, bounded
from genmlx.wire.rank_launch import MODEL_NAME, MODEL_NAME_RULE, RankLaunch

RankState = Literal["running", "exited"]
RankPhase = Literal["starting", "loading", "ready", "exited"]
TransferKind = Literal["download", "sync"]
TransferState = Literal["running", "failed", "done"]


# The file an agent writes beside a verified model copy: every file's size and SHA-256, the commit.
MODEL_RECORD_NAME = ".genmlx-model.json"

InterfaceKind = Literal["thunderbolt", "ethernet", "wifi", "loopback", "other"]


@dataclass(frozen=True)
class NetworkInterface(WireType):
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
    link_gbps: float | None = None  # a Thunderbolt port's link speed as system_profiler rates it


@dataclass(frozen=True)
class GpuDevice(WireType):
    """An NVIDIA GPU as NVML names it."""

    name: str  # "NVIDIA H200"
    memory_bytes: int
    driver: str = ""  # the driver's version, "580.159.03"


@dataclass(frozen=True)
class NodeFacts(WireType):
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
    mlx_version: str = ""  # the installed mlx package's: every rank of a jaccl group must match
    # NVIDIA GPUs, in CUDA's order: where MLX runs on CUDA (``gpu``), placement counts the first
    # one's memory (MLX's device) instead of the machine's.
    gpus: tuple[GpuDevice, ...] = ()

    @property
    def models_on_gpu(self) -> bool:
        """Whether a model's weights and KV cache live in a GPU's own memory (MLX on CUDA), not in
        the machine's (unified, on a Mac)."""
        return self.gpu == "CUDA" and bool(self.gpus)

    @property
    def model_memory(self) -> int:
        return self.gpus[0].memory_bytes if self.models_on_gpu else self.memory_total


@dataclass(frozen=True)
class ModelShape(WireType):
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


@dataclass(frozen=True)
class StoredModel(WireType):
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


@dataclass(frozen=True)
class StorageReport(WireType):
    path: str  # expanded absolute path
    exists: bool
    total_bytes: int
    free_bytes: int
    models: tuple[StoredModel, ...] = ()
    partials: tuple[StoredModel, ...] = ()  # transfers in progress or interrupted; never complete


@dataclass(frozen=True)
class PromptCacheTier(WireType):
    """One tier of a serving model's prompt cache, as its rank 0 counts it (``GET
    /api/v1/prompt-cache`` of the rank): what the tier holds now, and since the rank started, how
    many prompts were looked up and how many of them (with how many tokens) this tier supplied."""

    tier: Literal["memory", "disk"]
    entries: int  # memory: sequences; disk: block and snapshot files of this rank
    bytes: int
    lookups: int
    hits: int
    hit_tokens: int
    kind: str | None = None  # the disk tier's: "blocks" or "snapshots" (whole states)

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None


@dataclass(frozen=True)
class RankInfo(WireType):
    """A rank the agent started, alive or exited."""

    launch: RankLaunch
    pid: int
    state: RankState
    started_at: float  # unix time
    exit_code: int | None = None
    phase: RankPhase = "starting"  # finer than state while running: what its /health says
    restarts: int = 0  # earlier starts of the same model and rank on this agent
    # Why a jaccl rank could not join its group (its exit and log read by the agent); None otherwise.
    backend_failure: str | None = None
    prompt_cache: tuple[PromptCacheTier, ...] = ()  # rank 0's, as its last health check read it


@dataclass(frozen=True)
class FetchRequest(WireType):
    """Ask an agent to make a model present in one of its storage paths (``POST /api/v1/models``).

    With ``peer`` set the agent copies the model from that agent, and ``source``/``revision``, when
    given, say what the copy must hold; without it, the agent fetches ``source`` itself (downloads
    an ``hf://`` repo, adopts a ``file://`` directory in place). The transfer runs in the
    background; its progress shows in ``AgentState``.
    """

    # the directory name it gets: the manifest's model name
    model: str = bounded(pattern=MODEL_NAME, rule=MODEL_NAME_RULE)
    storage_path: str = bounded(non_empty=True)  # one of the agent's storage paths, as the agent reports it
    source: str | None = bounded(None, non_empty=True)
    revision: str = bounded("main", non_empty=True)
    peer: str | None = bounded(None, non_empty=True)  # "host:port" of the agent that has it
    # its directory name there (default: ``model``)
    peer_model: str | None = bounded(None, pattern=MODEL_NAME, rule=MODEL_NAME_RULE)


@dataclass(frozen=True)
class Transfer(WireType):
    """A download or sync the agent runs or ran, as reported in ``AgentState``."""

    model: str
    kind: TransferKind
    origin: str  # "hf://org/repo@main" or "peer 10.0.0.2:6790/model"
    storage_path: str
    state: TransferState
    bytes_done: int = 0
    bytes_total: int | None = None  # None until known
    error: str | None = None
    permanent: bool = False  # a failure that retrying cannot fix (not found, gated, corrupt at the peer)
    started_at: float = 0.0


@dataclass(frozen=True)
class PromptCacheReport(WireType):
    """A model's prompt cache on an agent's disk (``GENMLX_HOME/kv-cache/MODEL``)."""

    model: str
    bytes: int
    blocks: int  # block and snapshot files, every namespace (weights, rank) together


@dataclass(frozen=True)
class AgentState(WireType):
    """The whole report of ``GET /api/v1/state``."""

    name: str
    version: str
    facts: NodeFacts
    storage: tuple[StorageReport, ...] = ()
    ranks: tuple[RankInfo, ...] = field(default_factory=tuple)
    transfers: tuple[Transfer, ...] = ()
    node_id: str = ""  # stable across restarts, kept in GENMLX_HOME
    key_id: str = ""  # the public id of the signing key of the token it holds (``core.signing``)
    prompt_caches: tuple[PromptCacheReport, ...] = ()
