"""Builders for the planner's inputs: manifests and model specs (desired), and what agents report
(observed). Every argument has the default most tests want, so a test names only what it is about.

Imported as ``from builders import ...``, like ``conftest``'s helpers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from genmlx.manifest.types import Manifest, Master, Mesh, ModelSpec, Node, Serving, Source, StoragePath
from genmlx.master.planning.observed import (
    EndpointHealth,
    NodeReachability,
    Observed,
    ObservedNode,
    RolloutRecord,
)
from genmlx.wire.agent_state import (
    AgentState,
    ModelShape,
    NodeFacts,
    RankInfo,
    StorageReport,
    StoredModel,
    Transfer,
)
from genmlx.wire.rank_launch import RankLaunch

NOW = 1_000_000.0
STORE = "/models"
GIB = 1 << 30
TB = 1 << 40
NODE_HOSTS = {name: f"10.0.0.{i}" for i, name in enumerate("abcdefgh", 1)}  # as manifest() declares them


# ----------------------------------------------------------------------------------------------
# Desired


def model(
    name: str = "m",
    nodes: Sequence[str] = ("a",),
    source: str = "hf",
    revision: str = "main",
    prune: bool = False,
    **serving,
) -> ModelSpec:
    """A model spec. ``source`` is a URL, or ``hf`` for ``hf://org/<name>`` and ``file`` for
    ``file:///models/<name>``; ``serving`` are ``Serving``'s fields (``port=9000``, ``max_batch=4``)."""
    url = {"hf": f"hf://org/{name}", "file": f"file://{STORE}/{name}"}.get(source, source)
    scheme, location = url.split("://", 1)
    return ModelSpec(
        name, Source(scheme, location), tuple(nodes), revision, serving=Serving(**serving), prune=prune
    )


def declared_node(
    name: str,
    address: str | None = None,
    storage: Iterable[str | StoragePath] = (STORE,),
    prune: bool = False,
) -> Node:
    """A node of the manifest; a storage path given as a string has no ``maxGB``."""
    paths = tuple(p if isinstance(p, StoragePath) else StoragePath(p) for p in storage)
    return Node(name, address, paths, prune=prune)


def manifest(
    *models: ModelSpec,
    nodes: Sequence[str | Node] = ("a", "b"),
    storage: Iterable[str | StoragePath] = (STORE,),
    prune: Iterable[str] = (),
    mesh: Mesh | None = None,
) -> Manifest:
    """A cluster "desk" mastered on its first node. Nodes given by name are declared at
    ``10.0.0.<i>:6790`` (i from 1) with ``storage``, pruning where named in ``prune``."""
    pruned = set(prune)
    declared = tuple(
        n if isinstance(n, Node) else declared_node(n, f"10.0.0.{i}:6790", tuple(storage), prune=n in pruned)
        for i, n in enumerate(nodes, 1)
    )
    return Manifest("desk", Master(declared[0].name), declared, models, mesh=mesh or Mesh())


# ----------------------------------------------------------------------------------------------
# Observed


def facts(memory_gib: int = 64, name: str = "mac") -> NodeFacts:
    """A Mac's facts, three quarters of its memory available."""
    return NodeFacts(name, "Darwin 24.1.0", "arm64", 10, memory_gib * GIB, memory_gib * GIB * 3 // 4)


def stored(
    name: str = "m",
    path: str | None = None,
    size: int = 1 << 20,
    complete: bool = True,
    source: str | None = None,
    revision: str | None = None,
    commit: str | None = None,
    shape: ModelShape | None = None,
    published_at: float | None = None,
) -> StoredModel:
    """A model directory an agent reports, at ``/models/<name>`` unless ``path`` says otherwise."""
    return StoredModel(
        name,
        path or f"{STORE}/{name}",
        size,
        complete,
        source,
        revision,
        commit,
        shape=shape,
        published_at=published_at,
    )


def storage(
    path: str = STORE,
    models: Iterable[StoredModel | str] = (),
    partials: Iterable[StoredModel] = (),
    total: int = TB,
    free: int = TB // 2,
    exists: bool = True,
) -> StorageReport:
    """A storage path as its agent reports it; a model given by name is ``stored(name)`` there."""
    copies = tuple(m if isinstance(m, StoredModel) else stored(m, f"{path}/{m}") for m in models)
    return StorageReport(path, exists, total, free, copies, tuple(partials))


def launch(
    model: str = "m",
    path: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    port: int = 8100,
    spec_hash: str = "hash",
    hostfile: tuple[str, ...] = (),
) -> RankLaunch:
    return RankLaunch(model, path or f"{STORE}/{model}", rank, world_size, port, spec_hash, hostfile)


def rank(
    launched: RankLaunch | None = None,
    state: str = "running",
    phase: str = "ready",
    restarts: int = 0,
    exit_code: int | None = None,
    started_at: float = NOW - 10,
    pid: int = 42,
) -> RankInfo:
    """A rank an agent supervises, started as ``launched`` (``launch()`` unless given)."""
    return RankInfo(launched or launch(), pid, state, started_at, exit_code, phase, restarts)


def node(
    name: str = "a",
    host: str | None = None,
    reachability: NodeReachability = "ready",
    detail: str = "",
    stored: Iterable[StoredModel | str] = (),
    partials: Iterable[StoredModel] = (),
    reports: Iterable[StorageReport] | None = None,
    ranks: Iterable[RankInfo] = (),
    transfers: Iterable[Transfer] = (),
    memory_gib: int = 64,
) -> ObservedNode:
    """A node as a pass observes it, its agent at ``host:6790`` (nodes a, b, c, ... at 10.0.0.1, .2,
    .3, ... unless ``host`` says otherwise, as ``manifest`` declares them). Its storage is one path
    at ``/models`` holding ``stored`` and ``partials`` unless ``reports`` lists the storage reports;
    a node not ready carries no state, as ``observe`` builds it."""
    host = host or NODE_HOSTS.get(name, "10.0.0.1")
    found = tuple(reports) if reports is not None else (storage(STORE, stored, partials),)
    state = AgentState(name, "0.1.0", facts(memory_gib), found, tuple(ranks), tuple(transfers))
    return ObservedNode(
        name, f"{host}:6790", reachability, detail, state if reachability == "ready" else None
    )


def observed(
    *nodes: ObservedNode,
    ready: Iterable[str] = (),
    endpoints: dict[str, EndpointHealth] | None = None,
    rollouts: dict[str, RolloutRecord] | None = None,
    now: float = NOW,
) -> Observed:
    """A pass's observations; each model in ``ready`` answers its health check and canary."""
    health = {m: EndpointHealth("http://10.0.0.1:8100/v1", "ready") for m in ready}
    return Observed(now, {n.name: n for n in nodes}, {**health, **(endpoints or {})}, rollouts or {})
