"""The planner: ``plan(desired, observed) -> list[Action]``, a pure function.

No I/O, no clock, no globals: time and the master's rollout memory arrive inside ``Observed``.
``assess_model`` says where one model stands and what would move it forward; ``plan`` collects
those steps and adds the stops for ranks nothing wants any more. Status is derived from the
same assessments, so what the page says and what the master does never disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from genmlx.manifest.types import Manifest, ModelSpec
from genmlx.master.planning.actions import Action, StartRankGroup, StopRankGroup
from genmlx.master.planning.batching import Batching, batching_for
from genmlx.master.planning.groups import (
    GroupPlan,
    RankPorts,
    assign_rank_ports,
    desired_group,
    group_backend,
)
from genmlx.master.planning.mesh import MeshPlanError
from genmlx.master.planning.observed import Observed, ObservedNode
from genmlx.master.planning.placement import NodeCapacity, Placement, PlacementRefused, place
from genmlx.master.planning.presence import Presence, assess_presence
from genmlx.master.planning.prune import prune_actions
from genmlx.wire.agent_state import NodeFacts, RankInfo

BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 60.0
# A group that has not served (health and canary) this long after its start is restarted: loading
# reads the weights from local disk, which takes minutes for the largest models, not a quarter hour.
LOAD_DEADLINE_S = 900.0

Phase = Literal["Ready", "Progressing", "Waiting", "Blocked", "Backoff"]


@dataclass(frozen=True)
class ModelAssessment:
    """Where one model stands, why, and the actions that move it forward."""

    model: str
    phase: Phase
    reason: str  # CamelCase, as in a Kubernetes condition
    message: str
    actions: tuple[Action, ...] = ()
    desired: StartRankGroup | None = None
    ranks: tuple[tuple[str, RankInfo], ...] = ()  # observed (node, rank) of this model
    # (reason, message) of a Degraded condition besides Backoff's: ring after a faster backend failed
    degraded: tuple[str, str] | None = None
    batching: Batching | None = None  # the batch and queue placement gave it, once placed


def plan(desired: Manifest | None, observed: Observed) -> list[Action]:
    """Every action that moves the cluster towards ``desired``; empty when it has converged."""
    if desired is None:
        return []  # a master that has no manifest yet leaves a running cluster alone
    return actions_for(desired, observed, assess_models(desired, observed))


def actions_for(desired: Manifest, observed: Observed, assessments: list[ModelAssessment]) -> list[Action]:
    """The plan, from assessments already made (the loop also derives status from them)."""
    moves = [action for assessment in assessments for action in assessment.actions]
    return moves + stop_unwanted_ranks(desired, observed) + prune_actions(desired, observed)


def assess_models(desired: Manifest, observed: Observed) -> list[ModelAssessment]:
    ports = assign_rank_ports(desired, observed)
    return [assess_model(spec, desired, observed, ports[spec.name]) for spec in desired.models]


def assess_model(
    spec: ModelSpec, manifest: Manifest, observed: Observed, ports: RankPorts
) -> ModelAssessment:
    """Where ``spec`` stands given what was observed, and what to do about it."""
    ranks = observed_ranks(observed, spec.name, spec.nodes)

    def verdict(phase: Phase, reason: str, message: str, **rest) -> ModelAssessment:
        return ModelAssessment(spec.name, phase, reason, message, ranks=ranks, **rest)

    for name in spec.nodes:
        node = observed.nodes.get(name)
        if node is None or node.reachability != "ready":
            detail = node.detail if node else "no agent observed"
            return verdict("Waiting", "NodeNotReady", f"node {name} is not ready: {detail}")
    presence = assess_presence(spec, manifest, observed)
    if presence.reason:
        phase: Phase = "Blocked" if presence.blocked else "Progressing"
        return verdict(phase, presence.reason, presence.message, actions=presence.fetches)
    try:
        placement, batching = placement_of(spec, observed, presence, shared_nodes(spec, manifest))
    except PlacementRefused as e:
        return verdict("Blocked", e.reason, e.message)
    copies = [presence.copies[name] for name in spec.nodes]
    published = tuple(c.published_at for c in copies)
    paths = tuple(c.path for c in copies)
    group = GroupPlan(paths, ports.http, placement, published, ports.ring, manifest.mesh.backend, batching)
    try:
        backend = group_backend(spec, observed, group) if len(spec.nodes) > 1 else None
        desired = desired_group(spec, observed, group, backend)
    except MeshPlanError as e:
        return verdict("Blocked", e.reason, str(e), actions=stop_broken_group(spec, ranks, e.reason))
    assessment = assess_rollout(spec, desired, ranks, observed, verdict)
    degraded = backend.fallback if backend is not None else None
    return dataclasses.replace(assessment, degraded=degraded, batching=batching)


def stop_broken_group(spec: ModelSpec, ranks, reason: str) -> tuple[Action, ...]:
    """A stop for the ranks of a group held back while one of its ranks has exited (a failed start
    on jaccl, say): the rest cannot serve, and would wait on their peers. A group that runs is left
    alone, so a fact read badly once does not take a serving model down."""
    if not any(info.state == "exited" for _, info in ranks):
        return ()
    stopped = tuple((node, info.launch.rank) for node, info in ranks)
    return (StopRankGroup(spec.name, stopped, f"a rank exited and the model is held back ({reason})"),)


def placement_of(
    spec: ModelSpec, observed: Observed, presence: Presence, shared: frozenset[str] = frozenset()
) -> tuple[Placement, Batching | None]:
    """How the model's nodes split it, checked against their memory, and the batch they hold
    (None where no node could read the model's shape), ``shared`` naming its nodes that serve other
    models too; ``PlacementRefused`` when it cannot be placed as asked (a permanent problem until
    the manifest or the nodes change)."""
    shapes = [copy.shape for name in spec.nodes if (copy := presence.copies[name]).shape is not None]
    if not shapes:
        if len(spec.nodes) == 1:
            return Placement(
                "single", None, "one node (its config.json could not be read to check memory)"
            ), None
        raise PlacementRefused(
            "UnknownShape",
            f"cannot split {spec.name} across {len(spec.nodes)} nodes: no node could read its config.json",
        )
    nodes = [node_capacity(name, observed.nodes[name].state.facts) for name in spec.nodes]
    placement = place(spec, nodes, shapes[0], spec.serving.context_length)
    return placement, batching_for(spec, placement, nodes, shapes[0], spec.serving.context_length, shared)


def shared_nodes(spec: ModelSpec, manifest: Manifest) -> frozenset[str]:
    """The nodes of ``spec`` that the manifest has serve other models too."""
    others = {node for model in manifest.models if model.name != spec.name for node in model.nodes}
    return frozenset(others.intersection(spec.nodes))


def node_capacity(name: str, facts: NodeFacts) -> NodeCapacity:
    """The memory placement counts on a node: its GPU's where MLX runs on CUDA, else its RAM."""
    return NodeCapacity(name, facts.model_memory, gpu=facts.models_on_gpu)


def assess_rollout(spec, desired: StartRankGroup, ranks, observed: Observed, verdict) -> ModelAssessment:
    """Compare the group that should run with the ranks that do."""
    if not ranks:
        return verdict(
            "Progressing", "Starting", f"starting {spec.name}", actions=(desired,), desired=desired
        )
    stop = StopRankGroup(spec.name, tuple((node, info.launch.rank) for node, info in ranks), "")
    exited = [(node, info) for node, info in ranks if info.state == "exited"]
    if exited:
        node, info = exited[0]
        what = f"rank {info.launch.rank} on {node} exited with code {info.exit_code}"
        return restart_failed_group(spec, desired, stop, observed, verdict, "RankExited", what)
    if group_signature(ranks) != group_signature_of(desired):
        restart = (replace_reason(stop, "its spec changed"), desired)
        return verdict(
            "Progressing",
            "SpecChanged",
            f"restarting {spec.name}: its spec changed",
            actions=restart,
            desired=desired,
        )
    health = observed.endpoints.get(spec.name)
    if health is not None and health.state == "hung":
        return restart_failed_group(spec, desired, stop, observed, verdict, "RankHung", health.detail)
    if health is not None and health.state == "ready":
        return verdict("Ready", "Serving", f"serving at {health.url}", desired=desired)
    detail = health.detail if health else "rank 0 not checked yet"
    if any(info.launch.rank == 0 and info.phase == "ready" for _, info in ranks):
        # It loaded (its agent saw it answer): whether it still serves is the canary's to judge.
        return verdict("Progressing", "NotAnswering", f"{spec.name} loaded; {detail}", desired=desired)
    started = max(info.started_at for _, info in ranks)  # the agents' record: survives a master restart
    if observed.now - started > LOAD_DEADLINE_S:
        what = f"not serving {LOAD_DEADLINE_S / 60:.0f} minutes after its start ({detail})"
        return restart_failed_group(spec, desired, stop, observed, verdict, "LoadDeadlineExceeded", what)
    return verdict("Progressing", "Loading", f"{spec.name} is starting: {detail}", desired=desired)


def restart_failed_group(spec, desired, stop, observed: Observed, verdict, reason: str, what: str):
    """Restart a group that failed (a rank exited, or hung), after a capped backoff when it keeps
    failing: the model is in ``Backoff`` meanwhile, which status shows as Degraded."""
    wait = backoff_remaining(spec.name, observed)
    if wait > 0:
        return verdict("Backoff", reason, f"{what}; restarting in {wait:.0f}s", desired=desired)
    restart = (replace_reason(stop, f"{what}; restarting the group"), desired)
    return verdict("Progressing", reason, f"{what}; restarting", actions=restart, desired=desired)


def replace_reason(stop: StopRankGroup, reason: str) -> StopRankGroup:
    return StopRankGroup(stop.model, stop.ranks, reason)


def stop_unwanted_ranks(desired: Manifest, observed: Observed) -> list[Action]:
    """Stops for ranks of models that left the manifest or left a node."""
    placed = {spec.name: set(spec.nodes) for spec in desired.models}
    unwanted: dict[str, list[tuple[str, int]]] = {}
    for node in reachable_nodes(observed):
        for info in node.ranks:
            if node.name not in placed.get(info.launch.model, ()):
                unwanted.setdefault(info.launch.model, []).append((node.name, info.launch.rank))
    return [
        StopRankGroup(
            model,
            tuple(ranks),
            "no longer in the manifest" if model not in placed else "no longer placed on this node",
        )
        for model, ranks in unwanted.items()
    ]


def group_signature(ranks: Iterable[tuple[str, RankInfo]]) -> frozenset[tuple[str, int, str]]:
    return frozenset((node, info.launch.rank, info.launch.spec_hash) for node, info in ranks)


def group_signature_of(group: StartRankGroup) -> frozenset[tuple[str, int, str]]:
    return frozenset((node, launch.rank, group.spec_hash) for node, launch in group.launches)


def backoff_remaining(model: str, observed: Observed) -> float:
    """Seconds to wait before restarting a failed group: doubling per attempt, capped."""
    record = observed.rollouts.get(model)
    if record is None or record.attempts == 0:
        return 0.0
    delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (record.attempts - 1))
    return max(0.0, record.last_start + delay - observed.now)


def observed_ranks(
    observed: Observed, model: str, nodes: tuple[str, ...]
) -> tuple[tuple[str, RankInfo], ...]:
    """The ranks of ``model`` on the reachable nodes it is placed on, in rank order."""
    return tuple(
        (node.name, info)
        for node in reachable_nodes(observed)
        if node.name in nodes
        for info in sorted(node.ranks, key=lambda i: i.launch.rank)
        if info.launch.model == model
    )


def reachable_nodes(observed: Observed) -> list[ObservedNode]:
    return [n for _, n in sorted(observed.nodes.items()) if n.reachability == "ready"]
