"""Which of MLX's distributed backends the ranks of a multi-node model start on, why, and how it is
wired. Pure: node facts and the master's memory of failed starts in, frozen choices out.

- **jaccl** (RDMA over Thunderbolt, macOS 26.2+): MLX reads ``MLX_IBV_DEVICES``, a JSON matrix
  whose row i names, for each rank j, the RDMA device on rank i's node whose cable reaches rank
  j's (null on the diagonal and where no cable runs), and ``MLX_JACCL_COORDINATOR``, rank 0's
  ``"ip:port"``. jaccl needs an active RDMA device at both ends of a cable between every pair of
  ranks; ``jaccl-ring`` (``MLX_JACCL_RING``) only between each rank and the next, around the ring.
  Every node must run the same MLX.
- **nccl** (CUDA GPUs, Linux): MLX reads ``NCCL_HOST_IP`` and ``NCCL_PORT`` (rank 0's) and
  ``MLX_WORLD_SIZE``. Every node must report a CUDA GPU and run the same MLX.
- **ring** (TCP): always possible (``mesh`` wires it).

``mesh.backend: auto`` starts the fastest the facts allow: jaccl (or jaccl-ring), else nccl, else
ring. A start that failed on that backend (a rank that could not join, read from its exit and log by
its agent, or an agent that refused the start after its own checks) comes back as a
``BackendFailure`` carrying the fingerprint of the facts it was planned from: while those facts
stand, ``auto`` runs ring, with the failure as the reason it fell back (the model is Degraded), and
an explicit ``jaccl`` or ``nccl`` is held back (Stalled). New facts, or the manifest applied again,
try the faster backend once more.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from genmlx.manifest.types import Backend
from genmlx.master.planning.mesh import (
    MeshNode,
    MeshPlanError,
    RankEndpoint,
    cabled_pairs,
    cables_between,
    rank_endpoints,
    ring_hostfile,
    thunderbolt_interfaces,
)
from genmlx.master.planning.observed import BackendFailure

MeshBackend = Literal["ring", "jaccl", "jaccl-ring", "nccl"]
LinksDown = Mapping[tuple[str, str], str]  # (node, node), names in order -> why its last check failed
# The Degraded/Stalled reason of a model whose faster backend failed, by that backend.
UNAVAILABLE_REASONS = {"jaccl": "RDMAUnavailable", "jaccl-ring": "RDMAUnavailable", "nccl": "NCCLUnavailable"}


class BackendUnavailable(MeshPlanError):
    """``mesh.backend: jaccl`` (or ``nccl``) where the nodes cannot run it, or where it failed."""

    reason = "RDMAUnavailable"

    def __init__(self, message: str, reason: str = "RDMAUnavailable"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class JacclConfig:
    """What MLX's jaccl backend reads: the RDMA device matrix and the coordinator."""

    devices: tuple[tuple[str | None, ...], ...]  # devices[i][j]: rank i's device towards rank j
    coordinator: str  # "ip:port" of rank 0

    def devices_json(self) -> str:
        """The contents of the file ``MLX_IBV_DEVICES`` names."""
        return json.dumps([list(row) for row in self.devices])


@dataclass(frozen=True)
class JacclPlan:
    """Whether jaccl would be possible for a group of ranks, why, and how it would be wired."""

    possible: bool
    reason: str
    config: JacclConfig | None = None  # where possible
    mode: MeshBackend | None = None  # jaccl (every pair linked) or jaccl-ring (neighbours only)


@dataclass(frozen=True)
class NcclPlan:
    """Whether nccl would be possible for a group of ranks, why, and rank 0's "ip:port"."""

    possible: bool
    reason: str
    coordinator: str | None = None

    @property
    def mode(self) -> MeshBackend:
        return "nccl"


@dataclass(frozen=True)
class BackendChoice:
    """The backend GenMLX starts a model's ranks on, and why; None where it starts none."""

    backend: MeshBackend | None
    reason: str
    # Where auto runs ring because the faster backend failed to start: (reason, message) of the
    # model's Degraded condition.
    fallback: tuple[str, str] | None = None
    jaccl: JacclConfig | None = None
    nccl_coordinator: str | None = None

    def launch_fields(self) -> dict[str, str]:
        """The ``RankLaunch`` fields of this backend (none for ring, whose wiring is the hostfile)."""
        if self.backend in ("jaccl", "jaccl-ring") and self.jaccl is not None:
            devices, coordinator = self.jaccl.devices_json(), self.jaccl.coordinator
            return {"backend": self.backend, "rdma_devices": devices, "coordinator": coordinator}
        if self.backend == "nccl" and self.nccl_coordinator is not None:
            return {"backend": "nccl", "coordinator": self.nccl_coordinator}
        return {}


@dataclass(frozen=True)
class ModelMesh:
    """How the ranks of one multi-node model are wired."""

    model: str
    choice: BackendChoice
    ranks: tuple[RankEndpoint, ...]
    hostfile: tuple[str, ...]  # the ring backend's, "ip:port" per rank (RankLaunch.hostfile)
    jaccl: JacclPlan
    nccl: NcclPlan


# ----------------------------------------------------------------------------------------------
# jaccl


def rdma_device(node: MeshNode, peer: MeshNode) -> str | None:
    """The RDMA device on ``node`` whose cable reaches ``peer``, where both ends have one active."""
    cables = cables_between(node, peer)
    return next(
        (mine.rdma_device for mine, theirs in cables if mine.rdma_device and theirs.rdma_device), None
    )


def rdma_matrix(nodes: Sequence[MeshNode]) -> tuple[tuple[str | None, ...], ...]:
    """``MLX_IBV_DEVICES``: row i names rank i's device towards each rank j; None on the diagonal
    and where there is no RDMA link."""
    return tuple(
        tuple(None if i == j else rdma_device(a, b) for j, b in enumerate(nodes)) for i, a in enumerate(nodes)
    )


def missing_rdma_pairs(
    nodes: Sequence[MeshNode], pairs: Sequence[tuple[int, int]] | None = None
) -> list[tuple[str, str]]:
    """The pairs of ranks (every pair, or those given) without an RDMA link both ways."""
    matrix = rdma_matrix(nodes)
    every_pair = [(i, j) for i in range(len(nodes)) for j in range(i + 1, len(nodes))]
    return [
        (nodes[i].name, nodes[j].name)
        for i, j in (pairs if pairs is not None else every_pair)
        if matrix[i][j] is None or matrix[j][i] is None
    ]


def plan_jaccl(
    nodes: Sequence[MeshNode], coordinator_port: int, links_down: LinksDown | None = None
) -> JacclPlan:
    """Whether the RDMA links allow jaccl (every pair of ranks, rank r on ``nodes[r]``) or
    jaccl-ring (each rank and the next), and the config with its coordinator on
    ``coordinator_port``. A cable whose last check found it down (``links_down``) is no link."""
    unknown = [n.name for n in nodes if n.facts is None]
    if unknown:
        return JacclPlan(False, f"RDMA links unknown: no facts from {', '.join(unknown)}")
    config = JacclConfig(rdma_matrix(nodes), f"{nodes[0].agent_host}:{coordinator_port}")
    missing = missing_rdma_pairs(nodes)
    missing_around = missing_rdma_pairs(nodes, cabled_pairs(len(nodes), "ring"))  # each and the next
    if missing_around:
        return JacclPlan(False, f"no RDMA link between {', '.join(f'{a}-{b}' for a, b in missing_around)}")
    if differing := mlx_versions_differ(nodes):
        return JacclPlan(False, differing)
    if down := cables_down(nodes, config.devices, links_down or {}):
        return JacclPlan(False, down)
    if not missing:
        return JacclPlan(True, "every pair of ranks has an active RDMA device at both ends", config, "jaccl")
    reason = (
        "each rank and the next have an active RDMA device at both ends (a ring of RDMA links; "
        f"none between {', '.join(f'{a}-{b}' for a, b in missing)})"
    )
    return JacclPlan(True, reason, config, "jaccl-ring")


def cables_down(
    nodes: Sequence[MeshNode], matrix: tuple[tuple[str | None, ...], ...], links_down: LinksDown
) -> str | None:
    """Why a cable jaccl would use is down, from its last check; None where none is."""
    for i, j in itertools.combinations(range(len(nodes)), 2):
        pair = link_key(nodes[i].name, nodes[j].name)
        if matrix[i][j] and matrix[j][i] and pair in links_down:
            return f"the Thunderbolt link between {pair[0]} and {pair[1]} is down ({links_down[pair]})"
    return None


def link_key(a: str, b: str) -> tuple[str, str]:
    """How ``LinksDown`` names the cable between two nodes: their names in order."""
    return (a, b) if a <= b else (b, a)


def jaccl_config(nodes: Sequence[MeshNode], coordinator_port: int) -> JacclConfig:
    """The device matrix of a full mesh of RDMA links and the coordinator (rank 0's agent host, on
    ``coordinator_port``). Raises ``MeshPlanError`` if any pair of ranks lacks an RDMA link."""
    missing = missing_rdma_pairs(nodes)
    if missing:
        raise MeshPlanError(f"no RDMA link between {', '.join(f'{a}-{b}' for a, b in missing)}")
    return JacclConfig(rdma_matrix(nodes), f"{nodes[0].agent_host}:{coordinator_port}")


def mlx_versions_differ(nodes: Sequence[MeshNode]) -> str | None:
    """Why the nodes' MLX versions rule out a shared RDMA or NCCL group, or None where they match
    (an agent too old to report its version is taken at its word: MLX itself will say)."""
    versions = {n.name: n.facts.mlx_version for n in nodes if n.facts is not None and n.facts.mlx_version}
    if len(set(versions.values())) <= 1:
        return None
    found = ", ".join(f"{version} on {name}" for name, version in versions.items())
    return f"the nodes run different MLX versions ({found})"


# ----------------------------------------------------------------------------------------------
# nccl


def plan_nccl(nodes: Sequence[MeshNode], coordinator_port: int) -> NcclPlan:
    """Whether every node has a CUDA GPU MLX can use (so nccl is possible), with rank 0's address."""
    without = [n.name for n in nodes if n.facts is None or n.facts.gpu != "CUDA"]
    if without:
        return NcclPlan(False, f"no CUDA GPU on {', '.join(without)}")
    if differing := mlx_versions_differ(nodes):
        return NcclPlan(False, differing)
    coordinator = f"{nodes[0].agent_host}:{coordinator_port}"
    return NcclPlan(True, "every node has a CUDA GPU", coordinator)


# ----------------------------------------------------------------------------------------------
# The choice


def choose_backend(
    requested: Backend, jaccl: JacclPlan, nccl: NcclPlan | None = None, failure: BackendFailure | None = None
) -> BackendChoice:
    """The backend GenMLX starts the ranks on, and why: none where an explicitly asked for backend
    cannot be had or failed (the master holds the model back). ``failure`` is a failed start of
    the same nodes with the same facts, which the caller has already matched."""
    nccl = nccl or NcclPlan(False, "no CUDA GPU")
    if requested == "ring":
        return BackendChoice("ring", "mesh.backend is ring")
    if requested in ("jaccl", "nccl"):
        plan = jaccl if requested == "jaccl" else nccl
        if not plan.possible:
            return BackendChoice(None, f"mesh.backend is {requested}, but {plan.reason}")
        if failure is not None:
            return BackendChoice(None, f"mesh.backend is {requested}, but {failure.describe()}")
        return with_wiring(BackendChoice(plan.mode, f"mesh.backend is {requested}, and {plan.reason}"), plan)
    faster = jaccl if jaccl.possible else nccl if nccl.possible else None
    if faster is None:
        return BackendChoice("ring", f"{jaccl.reason}; {nccl.reason}")
    if failure is not None:
        message = (
            f"{failure.describe()}; running on ring until the nodes' facts change or the manifest is "
            "applied again"
        )
        return BackendChoice("ring", message, (UNAVAILABLE_REASONS[failure.backend], message))
    return with_wiring(BackendChoice(faster.mode, f"{faster.reason}, so auto starts {faster.mode}"), faster)


def with_wiring(choice: BackendChoice, plan: JacclPlan | NcclPlan) -> BackendChoice:
    if isinstance(plan, JacclPlan):
        return BackendChoice(choice.backend, choice.reason, jaccl=plan.config)
    return BackendChoice(choice.backend, choice.reason, nccl_coordinator=plan.coordinator)


def backend_fingerprint(nodes: Sequence[MeshNode]) -> str:
    """A digest of every fact a faster backend's start depends on: each node's MLX version, GPU
    and Thunderbolt ports (addresses, cables, RDMA devices). A failed start is retried once it
    changes."""
    facts = [
        [
            node.name,
            node.facts.mlx_version,
            node.facts.gpu,
            [
                [i.name, list(i.addresses), i.linked, i.domain, i.peer_domain, i.rdma_device]
                for i in thunderbolt_interfaces(node.facts)
            ],
        ]
        if node.facts is not None
        else [node.name, None]
        for node in nodes
    ]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def standing_failure(failure: BackendFailure | None, nodes: Sequence[MeshNode]) -> BackendFailure | None:
    """``failure`` while the facts it was planned from still stand; None once they changed."""
    if failure is None or failure.fingerprint != backend_fingerprint(nodes):
        return None
    return failure


# ----------------------------------------------------------------------------------------------
# One model


def plan_model_mesh(
    model: str,
    requested: Backend,
    nodes: Sequence[MeshNode],
    ring_ports: Sequence[int],
    failure: BackendFailure | None = None,
    links_down: LinksDown | None = None,
) -> ModelMesh:
    """Backend, rank addresses, ring hostfile and jaccl and nccl outlook of ``model``, whose rank r
    runs on ``nodes[r]`` with ring port ``ring_ports[r]`` (rank 0's is also the jaccl coordinator's
    and nccl's port, as their ranks do not use the ring's). Raises ``MeshPlanError`` for a port
    outside 1-65535."""
    outside = [(r, port) for r, port in enumerate(ring_ports) if not 1 <= port <= 65535]
    if outside:
        rank, port = outside[0]
        raise MeshPlanError(
            f"rank {rank}'s ring port would be {port}, outside 1-65535 (each rank takes the first "
            "port from mesh.port free on its host): lower mesh.port"
        )
    ranks = rank_endpoints(nodes)
    jaccl, nccl = plan_jaccl(nodes, ring_ports[0], links_down), plan_nccl(nodes, ring_ports[0])
    choice = choose_backend(requested, jaccl, nccl, standing_failure(failure, nodes))
    return ModelMesh(model, choice, ranks, ring_hostfile(ranks, ring_ports), jaccl, nccl)
