"""The rank group a model should run: each rank's node, model path, HTTP port and ring port, the
ring hostfile that joins them, how they split the model, and a fingerprint of all of it.

Pure, like the planner that calls it. Ports are chosen so that a restarted master picks the same
ones (a running group keeps its ports) and so that ranks sharing one host never collide: several
agents may run on one machine (tests do), so ports are counted per host, not per node. HTTP ports
start at the model's ``serving.port`` (8100 without one) and ring ports at ``mesh.port``; each rank
takes the first port from there that no other rank on its host uses, HTTP or ring.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from genmlx.manifest.types import DEFAULT_DISPATCHER_PORT, Backend, Manifest, ModelSpec
from genmlx.master.planning.actions import StartRankGroup
from genmlx.master.planning.backends import (
    UNAVAILABLE_REASONS,
    BackendChoice,
    BackendUnavailable,
    choose_backend,
    plan_jaccl,
    plan_nccl,
    standing_failure,
)
from genmlx.master.planning.batching import Batching
from genmlx.master.planning.mesh import MeshPlanError, observed_mesh_nodes, rank_endpoints
from genmlx.master.planning.observed import Observed
from genmlx.master.planning.placement import Placement
from genmlx.wire.rank_launch import RankLaunch
from genmlx.wire.serving import ServingSettings

LAST_PORT = 65535


@dataclass(frozen=True)
class GroupPlan:
    """Everything a group's launches are built from besides the manifest."""

    paths: tuple[str, ...]  # the model's directory on each node, rank order
    ports: tuple[int, ...]  # each rank's HTTP port; rank 0's serves the API
    placement: Placement
    published: tuple[float | None, ...] = ()  # when each rank's copy was put in place
    ring_ports: tuple[int, ...] = ()  # each rank's ring port; none for a one-rank group
    backend: Backend = "auto"  # the manifest's mesh.backend
    batching: Batching | None = None  # None: placement could not read the model's shape


def desired_group(
    spec: ModelSpec, observed: Observed, plan: GroupPlan, backend: BackendChoice | None = None
) -> StartRankGroup:
    """The rank group ``spec`` should run on ``backend`` (``group_backend``'s choice; ring where
    None), fingerprinted by everything that requires a restart. Raises ``MeshPlanError`` when its
    ranks' ports fall outside the valid range."""
    world = len(spec.nodes)
    check_port_range(spec.name, "HTTP", plan.ports, "serving.port")
    hostfile = ring_hostfile(spec, observed, plan.ring_ports) if world > 1 else ()
    wiring = backend.launch_fields() if world > 1 and backend is not None else {}
    parallelism = plan.placement.parallelism if world > 1 else "tensor"
    serving = with_batching(spec.serving.settings(), plan.batching)
    fields = {
        "model": spec.name,
        "source": str(spec.source),
        "revision": spec.revision,
        "nodes": list(spec.nodes),
        "paths": list(plan.paths),
        "published": list(plan.published),  # a copy replaced in place (re-synced) restarts the group
        "ports": list(plan.ports),
        "hostfile": list(hostfile),
        "placement": [parallelism, plan.placement.layer_split],
        "serving": serving.to_json(),
        **({"backend": wiring} if wiring else {}),  # a ring group's fingerprint stays as it was
        # A GPU node that comes to serve another model too takes back the memory this group's
        # ranks may hold in copies (and gives it back when it no longer does): they restart.
        **({"sharedGpuNodes": list(shared)} if (shared := shared_gpu_nodes(plan.batching)) else {}),
    }
    spec_hash = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    launches = tuple(
        (
            node,
            RankLaunch(
                model=spec.name,
                model_path=path,
                rank=rank,
                world_size=world,
                port=port,
                spec_hash=spec_hash,
                hostfile=hostfile,
                serving=serving,
                parallelism=parallelism,
                layer_split=plan.placement.layer_split if parallelism == "pipeline" else None,
                spare_bytes=spare_of(plan.batching, rank),
                **wiring,
            ),
        )
        for rank, (node, path, port) in enumerate(zip(spec.nodes, plan.paths, plan.ports, strict=True))
    )
    return StartRankGroup(spec.name, spec_hash, launches)


def with_batching(serving: ServingSettings, batching: Batching | None) -> ServingSettings:
    """``serving`` with the batch and queue ``batching`` chose; as it is where there is none (no
    node could read the model's shape): its ranks then take a hand-started rank's 8 and 64."""
    if batching is None:
        return serving
    return dataclasses.replace(serving, max_batch=batching.max_batch, max_queue=batching.max_queue)


def shared_gpu_nodes(batching: Batching | None) -> tuple[str, ...]:
    return batching.shared_gpu_nodes if batching is not None else ()


def spare_of(batching: Batching | None, rank: int) -> int | None:
    """The spare memory ``batching`` found on the node of ``rank`` (None where it found none). Not
    part of a group's fingerprint: a rank uses it only when it loads, and it follows the nodes'
    facts, so a changed figure waits for the next restart rather than forcing one."""
    if batching is None or rank >= len(batching.spare_bytes):
        return None
    return batching.spare_bytes[rank]


def group_backend(spec: ModelSpec, observed: Observed, plan: GroupPlan) -> BackendChoice:
    """The backend a multi-node group starts on, from its nodes' facts and the master's memory of
    a failed start. Raises ``BackendUnavailable`` where ``mesh.backend`` asks for one that cannot
    be had or failed."""
    nodes = observed_mesh_nodes(spec.nodes, observed.nodes)
    port = plan.ring_ports[0]
    failure = standing_failure(observed.backend_failures.get(spec.name), nodes)
    jaccl = plan_jaccl(nodes, port, observed.links_down)
    choice = choose_backend(plan.backend, jaccl, plan_nccl(nodes, port), failure)
    if choice.backend is None:
        reason = UNAVAILABLE_REASONS[failure.backend if failure else plan.backend]
        raise BackendUnavailable(f"{spec.name}: {choice.reason}", reason)
    return choice


def ring_hostfile(spec: ModelSpec, observed: Observed, ring_ports: tuple[int, ...]) -> tuple[str, ...]:
    """MLX's ring hostfile: each rank's mesh address (on its link to the rank before it, which is
    the one that connects to it) and its ring port. Raises ``MeshPlanError`` for a port outside
    1-65535."""
    check_port_range(spec.name, "ring", ring_ports, "mesh.port")
    ranks = rank_endpoints(observed_mesh_nodes(spec.nodes, observed.nodes))
    return tuple(f"{rank.address}:{port}" for rank, port in zip(ranks, ring_ports, strict=True))


def check_port_range(model: str, kind: str, ports: Sequence[int], setting: str) -> None:
    if not all(0 < port <= LAST_PORT for port in ports):
        raise MeshPlanError(
            f"{model}'s ranks would listen on {kind} ports {list(ports)}, past {LAST_PORT}: "
            f"lower {setting} (each rank takes the first port from it free on its host)"
        )


@dataclass(frozen=True)
class RankPorts:
    """One model's ports, rank order."""

    http: tuple[int, ...]
    ring: tuple[int, ...] = ()  # none for a one-rank model


def assign_rank_ports(desired: Manifest, observed: Observed) -> dict[str, RankPorts]:
    """Every rank's HTTP and ring port, by model: HTTP ports first, so ring ports avoid them."""
    http = assign_ports(desired, observed)
    ring = assign_ring_ports(desired, observed, http)
    return {spec.name: RankPorts(http[spec.name], ring[spec.name]) for spec in desired.models}


def assign_ports(desired: Manifest, observed: Observed) -> dict[str, tuple[int, ...]]:
    """Each rank's HTTP port, by model. A model's ports start at its ``serving.port`` (8100
    without one): rank 0 gets an explicit ``serving.port`` as it is; any other rank keeps the port
    it runs on where that is still free and not below the start, else takes the first port from
    the start that no other rank on its host uses."""
    ports = _Ports(observed)
    for spec in desired.models:
        if spec.serving.port is not None:
            ports.claim(spec.name, 0, spec.nodes[0], spec.serving.port)
    first = {spec.name: spec.serving.port or DEFAULT_DISPATCHER_PORT for spec in desired.models}
    return ports.fill(desired.models, first, current_port)


def assign_ring_ports(
    desired: Manifest, observed: Observed, http_ports: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """Each rank's ring port, by model (none for a one-rank model), chosen as HTTP ports are: a
    running rank keeps the ring port of its launch's hostfile where that is still free and not
    below ``mesh.port``, else takes the first port from ``mesh.port`` that no other rank on its
    host uses, HTTP (``http_ports``, as ``assign_ports`` chose them) or ring."""
    ports = _Ports(observed)
    for spec in desired.models:
        for node, port in zip(spec.nodes, http_ports[spec.name], strict=True):
            ports.hold(node, port)
    grouped = [spec for spec in desired.models if len(spec.nodes) > 1]
    assigned = ports.fill(grouped, {spec.name: desired.mesh.port for spec in grouped}, current_ring_port)
    return {spec.name: assigned.get(spec.name, ()) for spec in desired.models}


CurrentPort = Callable[[Observed, str, str, int], int | None]


class _Ports:
    """The ports chosen so far, and which (host, port) pairs they and other models' ranks hold."""

    def __init__(self, observed: Observed):
        self._observed = observed
        self.chosen: dict[tuple[str, int], int] = {}
        self._taken: set[tuple[str, int]] = set()

    def fill(
        self, models: Sequence[ModelSpec], first: dict[str, int], current_of: CurrentPort
    ) -> dict[str, tuple[int, ...]]:
        """A port for every rank of ``models`` not chosen yet: first the ports running ranks keep
        (so a running group never moves for a newcomer), then the first free from ``first``."""
        ranks = [(spec.name, rank, node) for spec in models for rank, node in enumerate(spec.nodes)]
        for model, rank, node in ranks:
            current = current_of(self._observed, model, node, rank)
            if current is not None and current >= first[model] and self.free(model, rank, node, current):
                self.claim(model, rank, node, current)
        for model, rank, node in ranks:
            if (model, rank) not in self.chosen:
                port = next(p for p in itertools.count(first[model]) if self.free(model, rank, node, p))
                self.claim(model, rank, node, port)
        return {
            spec.name: tuple(self.chosen[(spec.name, r)] for r in range(len(spec.nodes))) for spec in models
        }

    def free(self, model: str, rank: int, node: str, port: int) -> bool:
        host = host_of(self._observed, node)
        unchosen = (model, rank) not in self.chosen
        return (
            unchosen
            and (host, port) not in self._taken
            and port not in ports_used_by_others(self._observed, host, model)
        )

    def claim(self, model: str, rank: int, node: str, port: int) -> None:
        self.chosen[(model, rank)] = port
        self.hold(node, port)

    def hold(self, node: str, port: int) -> None:
        """Mark ``port`` taken on ``node``'s host without choosing it for a rank."""
        self._taken.add((host_of(self._observed, node), port))


def host_of(observed: Observed, node: str) -> str:
    """The machine a node's agent runs on (its address's host), or the node's name while unknown."""
    observed_node = observed.nodes.get(node)
    return observed_node.host if observed_node and observed_node.address else f"node:{node}"


def current_launch(observed: Observed, model: str, node: str, rank: int) -> RankLaunch | None:
    observed_node = observed.nodes.get(node)
    for info in observed_node.ranks if observed_node else ():
        if info.launch.model == model and info.launch.rank == rank:
            return info.launch
    return None


def current_port(observed: Observed, model: str, node: str, rank: int) -> int | None:
    launch = current_launch(observed, model, node, rank)
    return launch.port if launch else None


def current_ring_port(observed: Observed, model: str, node: str, rank: int) -> int | None:
    launch = current_launch(observed, model, node, rank)
    return ring_port_of(launch) if launch else None


def ring_port_of(launch: RankLaunch) -> int | None:
    """The ring port a running rank listens on: its own entry in its launch's hostfile."""
    if launch.rank >= len(launch.hostfile):
        return None
    return int(launch.hostfile[launch.rank].rsplit(":", 1)[1])


def ports_used_by_others(observed: Observed, host: str, model: str) -> set[int]:
    """HTTP and ring ports of other models' ranks running on ``host``, whichever node's agent runs
    them."""
    return {
        port
        for node in observed.nodes.values()
        if node.address and node.host == host
        for info in node.ranks
        if info.launch.model != model
        for port in (info.launch.port, ring_port_of(info.launch))
        if port is not None
    }
