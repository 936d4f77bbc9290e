"""The planner: ``plan(desired, observed) -> list[Action]``, a pure function.

No I/O, no clock, no globals: time and the master's rollout memory arrive inside ``Observed``.
``assess_model`` says where one model stands and what would move it forward; ``plan`` collects
those steps and adds the stops for ranks nothing wants any more. Status is derived from the
same assessments, so what the page says and what the master does never disagree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from genmlx.manifest.types import DEFAULT_DISPATCHER_PORT, Manifest, ModelSpec
from genmlx.node_state import RankInfo, RankLaunch
from genmlx.reconciler.actions import Action, StartRankGroup, StopRankGroup
from genmlx.reconciler.observed import Observed, ObservedNode
from genmlx.reconciler.presence import assess_presence

BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 60.0

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


def plan(desired: Manifest | None, observed: Observed) -> list[Action]:
    """Every action that moves the cluster towards ``desired``; empty when it has converged."""
    if desired is None:
        return []  # a master that has no manifest yet leaves a running cluster alone
    return actions_for(desired, observed, assess_models(desired, observed))


def actions_for(desired: Manifest, observed: Observed, assessments: list[ModelAssessment]) -> list[Action]:
    """The plan, from assessments already made (the loop also derives status from them)."""
    moves = [action for assessment in assessments for action in assessment.actions]
    return moves + stop_unwanted_ranks(desired, observed)


def assess_models(desired: Manifest, observed: Observed) -> list[ModelAssessment]:
    ports = assign_ports(desired, observed)
    return [assess_model(spec, desired, observed, ports[spec.name]) for spec in desired.models]


def assess_model(spec: ModelSpec, manifest: Manifest, observed: Observed, port: int) -> ModelAssessment:
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
    if len(spec.nodes) > 1:
        return verdict(
            "Blocked",
            "MultiNodeNotSupported",
            f"{spec.name} is on all {len(spec.nodes)} of its nodes, but serving one model across nodes "
            "needs multi-rank dispatchers, which this version lacks: place it on one node",
        )
    paths = [presence.copies[name].path for name in spec.nodes]
    desired = desired_group(spec, paths, port)
    return assess_rollout(spec, desired, ranks, observed, verdict)


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
        wait = backoff_remaining(spec.name, observed)
        if wait > 0:
            return verdict("Backoff", "RankExited", f"{what}; restarting in {wait:.0f}s", desired=desired)
        restart = (replace_reason(stop, f"{what}; restarting the group"), desired)
        return verdict("Progressing", "RankExited", f"{what}; restarting", actions=restart, desired=desired)
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
    if health is not None and health.state == "ready":
        return verdict("Ready", "Serving", f"serving at {health.url}", desired=desired)
    detail = health.detail if health else "rank 0 not checked yet"
    return verdict("Progressing", "Loading", f"{spec.name} is starting: {detail}", desired=desired)


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


def desired_group(spec: ModelSpec, paths: list[str], port: int) -> StartRankGroup:
    """The rank group ``spec`` should run, fingerprinted by everything that requires a restart."""
    world = len(spec.nodes)
    fields = {
        "model": spec.name,
        "source": str(spec.source),
        "revision": spec.revision,
        "nodes": list(spec.nodes),
        "paths": paths,
        "port": port,
        "serving": [spec.serving.max_batch, spec.serving.max_queue, spec.serving.context_length],
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
                max_batch=spec.serving.max_batch,
                max_queue=spec.serving.max_queue,
                context_length=spec.serving.context_length,
            ),
        )
        for rank, (node, path) in enumerate(zip(spec.nodes, paths, strict=True))
    )
    return StartRankGroup(spec.name, spec_hash, launches)


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


def assign_ports(desired: Manifest, observed: Observed) -> dict[str, int]:
    """Rank 0's HTTP port for each model: its explicit port, else the one its running group
    already uses, else the first free port from 8100 on its node. Deterministic, so a restarted
    master picks the same ports and restarts nothing."""
    ports: dict[str, int] = {}
    taken: set[tuple[str, int]] = set()
    for spec in desired.models:
        if spec.serving.port is not None:
            ports[spec.name] = spec.serving.port
            taken.add((spec.nodes[0], spec.serving.port))
    for spec in desired.models:
        current = current_rank0_port(observed, spec)
        if spec.name not in ports and current is not None and (spec.nodes[0], current) not in taken:
            ports[spec.name] = current
            taken.add((spec.nodes[0], current))
    for spec in desired.models:
        if spec.name not in ports:
            node = spec.nodes[0]
            used = taken | {(node, p) for p in ports_used_by_others(observed, node, spec.name)}
            port = next(p for p in range(DEFAULT_DISPATCHER_PORT, 65536) if (node, p) not in used)
            ports[spec.name] = port
            taken.add((node, port))
    return ports


def current_rank0_port(observed: Observed, spec: ModelSpec) -> int | None:
    node = observed.nodes.get(spec.nodes[0])
    for info in node.ranks if node else ():
        if info.launch.model == spec.name and info.launch.rank == 0:
            return info.launch.port
    return None


def ports_used_by_others(observed: Observed, node_name: str, model: str) -> set[int]:
    node = observed.nodes.get(node_name)
    return {info.launch.port for info in (node.ranks if node else ()) if info.launch.model != model}


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
