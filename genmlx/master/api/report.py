"""The status document: what ``GET /api/v1/status`` returns and ``genmlx status`` prints, built as
the typed ``genmlx.wire.status.ClusterStatus``."""

from __future__ import annotations

from dataclasses import replace

from genmlx.manifest.types import ModelSpec
from genmlx.master.planning.presence import find_copy
from genmlx.master.planning.status import iso_time
from genmlx.master.runtime.applied import AppliedManifest
from genmlx.master.runtime.loop import RejectedManifest, Snapshot
from genmlx.master.runtime.rotation import Rotation
from genmlx.wire.status import (
    ClusterStatus,
    ConditionReport,
    ImpostorReport,
    LastPass,
    ModelBatching,
    ModelCopy,
    ModelPromptCache,
    ModelRank,
    ModelStatus,
    NodeStatus,
    TokenRotationReport,
)

NO_MANIFEST = ConditionReport(
    "Ready", "False", "NoManifest", "no manifest applied yet: run `genmlx apply -f cluster.yaml`"
)
FIRST_PASS = ConditionReport("Ready", "Unknown", "FirstPass", "observing the cluster")


def status_document(
    applied: AppliedManifest | None, snapshot: Snapshot | None, rejected: RejectedManifest | None = None
) -> ClusterStatus:
    document = base_document(applied, snapshot)
    if rejected is None:
        return replace(document, last_attempted_revision=document.last_applied_revision)
    # The invalid manifest is the cluster's Stalled condition while it stands.
    others = tuple(c for c in document.conditions if c.type != "Stalled")
    return replace(
        document,
        last_attempted_revision=rejected.revision,
        conditions=(*others, rejected_condition(applied, rejected)),
    )


def rejected_condition(applied: AppliedManifest | None, rejected: RejectedManifest) -> ConditionReport:
    """Stalled: the newest manifest is invalid, and what keeps serving meanwhile."""
    count = len(rejected.issues)
    keeps = f"generation {applied.generation} keeps serving" if applied else "nothing was ever applied"
    message = f"{rejected.filename}: {count} error(s), first: {rejected.issues[0]}; {keeps}"
    at = iso_time(rejected.at)
    return ConditionReport("Stalled", "True", "InvalidManifest", message, at, rejected.issues)


def base_document(applied: AppliedManifest | None, snapshot: Snapshot | None) -> ClusterStatus:
    if applied is None:
        return ClusterStatus(generation=0, observed_generation=0, conditions=(NO_MANIFEST,))
    document = ClusterStatus(
        name=applied.manifest.name,
        generation=applied.generation,
        observed_generation=snapshot.generation if snapshot else 0,
        conditions=(FIRST_PASS,),
        last_applied_revision=applied.revision,
        manifest_file=applied.filename,
        applied_at=iso_time(applied.applied_at),
    )
    if snapshot is None:
        return document
    return replace(
        document,
        conditions=tuple(c.report() for c in (snapshot.cluster, *snapshot.cluster_phases)),
        nodes=tuple(node_document(snapshot, node.name) for node in applied.manifest.nodes),
        models=tuple(model_document(applied, snapshot, spec.name) for spec in applied.manifest.models),
        unmanaged_agents=tuple(agent.report() for agent in snapshot.unmanaged_agents),
        impostors=tuple(ImpostorReport(i.name, i.address, i.detail) for i in snapshot.observed.impostors),
        token_rotation=rotation_report(snapshot.rotation),
        links=snapshot.links,
        pending_actions=tuple(a.describe() for a in snapshot.planned),
        last_pass=LastPass(iso_time(snapshot.observed.now), round(snapshot.duration_s, 3), snapshot.errors),
    )


def rotation_report(rotation: Rotation | None) -> TokenRotationReport | None:
    if rotation is None:
        return None
    until = iso_time(rotation.previous_until)
    return TokenRotationReport(until, rotation.nodes_on_previous, rotation.manual)


def node_document(snapshot: Snapshot, name: str) -> NodeStatus:
    observed = snapshot.observed.nodes.get(name)
    state = observed.state if observed else None
    conditions = tuple(c.report() for c in (snapshot.nodes[name], *snapshot.node_phases.get(name, ())))
    if state is None:
        return NodeStatus(name, conditions, address=observed.address if observed else None)
    return NodeStatus(
        name,
        conditions,
        observed.address,
        facts=state.facts,
        storage=state.storage,
        ranks=state.ranks,
        transfers=state.transfers,
    )


def model_document(applied: AppliedManifest, snapshot: Snapshot, name: str) -> ModelStatus:
    spec = applied.manifest.model(name)
    assessment = next(a for a in snapshot.assessments if a.model == name)
    health = snapshot.observed.endpoints.get(name)
    conditions = (snapshot.models[name], *snapshot.model_phases.get(name, ()))
    return ModelStatus(
        name=name,
        source=str(spec.source),
        revision=spec.revision,
        nodes=spec.nodes,
        parallelism=spec.parallelism,
        phase=assessment.phase,
        conditions=tuple(c.report() for c in conditions),
        endpoint=health.url if health else None,
        ranks=tuple(ModelRank(**vars(info), node=node) for node, info in assessment.ranks),
        copies=model_copies(spec, snapshot),
        prompt_caches=model_prompt_caches(spec, snapshot),
        prompt_cache=next((info.prompt_cache for _, info in assessment.ranks if info.launch.rank == 0), ()),
        batching=ModelBatching(b.max_batch, b.max_queue, b.reason) if (b := assessment.batching) else None,
    )


def model_prompt_caches(spec: ModelSpec, snapshot: Snapshot) -> tuple[ModelPromptCache, ...]:
    """The model's prompt cache on each of its nodes' disks, where the agent reports one."""
    found = []
    for name in spec.nodes:
        node = snapshot.observed.nodes.get(name)
        for cache in node.state.prompt_caches if node and node.state else ():
            if cache.model == spec.name:
                found.append(ModelPromptCache(name, cache.bytes, cache.blocks))
    return tuple(found)


def model_copies(spec: ModelSpec, snapshot: Snapshot) -> tuple[ModelCopy, ...]:
    """Where complete copies of the model lie, with the commit each one holds."""
    return tuple(
        ModelCopy(name, copy.path, copy.size_bytes, copy.commit)
        for name, node in sorted(snapshot.observed.nodes.items())
        if node.reachability == "ready" and (copy := find_copy(node, spec))
    )
