"""The rank group a model should run: each rank's node, model path and HTTP port, the ring
hostfile that joins them, how they split the model, and a fingerprint of all of it.

Pure, like the planner that calls it. Ports are chosen so that a restarted master picks the same
ones (a running group keeps its ports) and so that ranks sharing one host never collide: several
agents may run on one machine (tests do), so ports are counted per host, not per node. Each rank's
ring port follows from its HTTP port (``mesh.port`` plus the HTTP port's distance from 8100), so
it is as stable and as free of collisions as the HTTP port is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from genmlx.manifest.types import DEFAULT_DISPATCHER_PORT, Manifest, ModelSpec
from genmlx.master.planning.actions import StartRankGroup
from genmlx.master.planning.mesh import MeshPlanError, observed_mesh_nodes, rank_endpoints, ring_port
from genmlx.master.planning.observed import Observed
from genmlx.master.planning.placement import Placement
from genmlx.wire.rank_launch import RankLaunch


@dataclass(frozen=True)
class GroupPlan:
    """Everything a group's launches are built from besides the manifest."""

    paths: tuple[str, ...]  # the model's directory on each node, rank order
    ports: tuple[int, ...]  # each rank's HTTP port; rank 0's serves the API
    placement: Placement
    published: tuple[float | None, ...] = ()  # when each rank's copy was put in place


def desired_group(spec: ModelSpec, manifest: Manifest, observed: Observed, plan: GroupPlan) -> StartRankGroup:
    """The rank group ``spec`` should run, fingerprinted by everything that requires a restart.
    Raises ``MeshPlanError`` when its ranks' ring ports fall outside the valid range."""
    world = len(spec.nodes)
    hostfile = ring_hostfile(spec, manifest, observed, plan.ports) if world > 1 else ()
    parallelism = plan.placement.parallelism if world > 1 else "tensor"
    serving = spec.serving.settings()
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
            ),
        )
        for rank, (node, path, port) in enumerate(zip(spec.nodes, plan.paths, plan.ports, strict=True))
    )
    return StartRankGroup(spec.name, spec_hash, launches)


def ring_hostfile(
    spec: ModelSpec, manifest: Manifest, observed: Observed, ports: tuple[int, ...]
) -> tuple[str, ...]:
    """MLX's ring hostfile: each rank's mesh address (on its link to the rank before it, which is
    the one that connects to it) and a ring port derived from its HTTP port."""
    ranks = rank_endpoints(observed_mesh_nodes(spec.nodes, observed.nodes))
    ring_ports = [ring_port(manifest.mesh.port, port) for port in ports]
    if not all(0 < port < 65536 for port in ring_ports):
        raise MeshPlanError(
            f"{spec.name}'s ranks would listen on ring ports {ring_ports} (mesh.port {manifest.mesh.port} "
            f"plus each HTTP port's distance from {DEFAULT_DISPATCHER_PORT}): lower mesh.port or serving.port"
        )
    return tuple(f"{rank.address}:{port}" for rank, port in zip(ranks, ring_ports, strict=True))


def assign_ports(desired: Manifest, observed: Observed) -> dict[str, tuple[int, ...]]:
    """Each rank's HTTP port, by model: rank 0's explicit ``serving.port``, else the port its running
    rank already has, else the first port from 8100 free on that rank's host."""
    ports = _Ports(observed)
    ranks = [(spec, rank, node) for spec in desired.models for rank, node in enumerate(spec.nodes)]
    for spec, rank, node in ranks:
        if rank == 0 and spec.serving.port is not None:
            ports.claim(spec.name, rank, node, spec.serving.port)
    for spec, rank, node in ranks:
        current = current_port(observed, spec.name, node, rank)
        if current is not None and ports.free(spec.name, rank, node, current):
            ports.claim(spec.name, rank, node, current)
    for spec, rank, node in ranks:
        if (spec.name, rank) not in ports.chosen:
            port = next(
                p for p in range(DEFAULT_DISPATCHER_PORT, 65536) if ports.free(spec.name, rank, node, p)
            )
            ports.claim(spec.name, rank, node, port)
    return {
        spec.name: tuple(ports.chosen[(spec.name, r)] for r in range(len(spec.nodes)))
        for spec in desired.models
    }


class _Ports:
    """The ports chosen so far, and which (host, port) pairs they and other models' ranks hold."""

    def __init__(self, observed: Observed):
        self._observed = observed
        self.chosen: dict[tuple[str, int], int] = {}
        self._taken: set[tuple[str, int]] = set()

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
        self._taken.add((host_of(self._observed, node), port))


def host_of(observed: Observed, node: str) -> str:
    """The machine a node's agent runs on (its address's host), or the node's name while unknown."""
    observed_node = observed.nodes.get(node)
    return observed_node.host if observed_node and observed_node.address else f"node:{node}"


def current_port(observed: Observed, model: str, node: str, rank: int) -> int | None:
    observed_node = observed.nodes.get(node)
    for info in observed_node.ranks if observed_node else ():
        if info.launch.model == model and info.launch.rank == rank:
            return info.launch.port
    return None


def ports_used_by_others(observed: Observed, host: str, model: str) -> set[int]:
    """HTTP ports of other models' ranks running on ``host``, whichever node's agent runs them."""
    return {
        info.launch.port
        for node in observed.nodes.values()
        if node.address and node.host == host
        for info in node.ranks
        if info.launch.model != model
    }
