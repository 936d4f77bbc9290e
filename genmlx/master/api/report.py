"""The status document: what ``GET /api/v1/status`` returns and ``genmlx status`` prints."""

from __future__ import annotations

from typing import Any

from genmlx.manifest.types import ModelSpec
from genmlx.master.planning.presence import find_copy
from genmlx.master.planning.status import iso_time
from genmlx.master.runtime.applied import AppliedManifest
from genmlx.master.runtime.loop import RejectedManifest, Snapshot


def status_document(
    applied: AppliedManifest | None, snapshot: Snapshot | None, rejected: RejectedManifest | None = None
) -> dict[str, Any]:
    document = base_document(applied, snapshot)
    if rejected is not None:
        document["lastAttemptedRevision"] = rejected.revision.to_json() if rejected.revision else None
        # The invalid manifest is the cluster's Stalled condition while it stands.
        others = [c for c in document["conditions"] if c["type"] != "Stalled"]
        document["conditions"] = [*others, rejected_condition(applied, rejected)]
    else:
        document["lastAttemptedRevision"] = document.get("lastAppliedRevision")
    return document


def rejected_condition(applied: AppliedManifest | None, rejected: RejectedManifest) -> dict[str, Any]:
    """Stalled: the newest manifest is invalid, and what keeps serving meanwhile."""
    count = len(rejected.issues)
    keeps = f"generation {applied.generation} keeps serving" if applied else "nothing was ever applied"
    return {
        "type": "Stalled",
        "status": "True",
        "reason": "InvalidManifest",
        "message": f"{rejected.filename}: {count} error(s), first: {rejected.issues[0]}; {keeps}",
        "lastTransitionTime": iso_time(rejected.at),
        "issues": list(rejected.issues),
    }


def base_document(applied: AppliedManifest | None, snapshot: Snapshot | None) -> dict[str, Any]:
    if applied is None:
        return {
            "generation": 0,
            "observedGeneration": 0,
            "conditions": [no_manifest_condition()],
            "nodes": [],
            "models": [],
            "unmanagedAgents": [],
        }
    document: dict[str, Any] = {
        "name": applied.manifest.name,
        "generation": applied.generation,
        "observedGeneration": snapshot.generation if snapshot else 0,
        "lastAppliedRevision": applied.revision.to_json() if applied.revision else None,
        "manifestFile": applied.filename,
        "appliedAt": iso_time(applied.applied_at),
    }
    if snapshot is None:
        pending = {
            "type": "Ready",
            "status": "Unknown",
            "reason": "FirstPass",
            "message": "observing the cluster",
        }
        return {**document, "conditions": [pending], "nodes": [], "models": [], "unmanagedAgents": []}
    return {
        **document,
        "conditions": [c.to_json() for c in (snapshot.cluster, *snapshot.cluster_phases)],
        "nodes": [node_document(applied, snapshot, node.name) for node in applied.manifest.nodes],
        "models": [model_document(applied, snapshot, spec.name) for spec in applied.manifest.models],
        # Agents that announce themselves but that the manifest does not declare: never used.
        "unmanagedAgents": [agent.to_json() for agent in snapshot.unmanaged_agents],
        "pendingActions": [a.describe() for a in snapshot.planned],
        "lastPass": {
            "at": iso_time(snapshot.observed.now),
            "durationSeconds": round(snapshot.duration_s, 3),
            "errors": list(snapshot.errors),
        },
    }


def node_document(applied: AppliedManifest, snapshot: Snapshot, name: str) -> dict[str, Any]:
    observed = snapshot.observed.nodes.get(name)
    state = observed.state if observed else None
    return {
        "name": name,
        "address": observed.address if observed else None,
        "conditions": [c.to_json() for c in (snapshot.nodes[name], *snapshot.node_phases.get(name, ()))],
        "facts": state.facts.to_json() if state else None,
        "storage": [s.to_json() for s in state.storage] if state else [],
        "ranks": [r.to_json() for r in state.ranks] if state else [],
        "transfers": [t.to_json() for t in state.transfers] if state else [],
    }


def model_document(applied: AppliedManifest, snapshot: Snapshot, name: str) -> dict[str, Any]:
    spec = applied.manifest.model(name)
    assessment = next(a for a in snapshot.assessments if a.model == name)
    health = snapshot.observed.endpoints.get(name)
    return {
        "name": name,
        "source": str(spec.source),
        "revision": spec.revision,
        "nodes": list(spec.nodes),
        "parallelism": spec.parallelism,
        "phase": assessment.phase,
        "endpoint": health.url if health else None,
        "conditions": [c.to_json() for c in (snapshot.models[name], *snapshot.model_phases.get(name, ()))],
        "ranks": [{"node": node, **info.to_json()} for node, info in assessment.ranks],
        "copies": model_copies(spec, snapshot),
    }


def model_copies(spec: ModelSpec, snapshot: Snapshot) -> list[dict[str, Any]]:
    """Where complete copies of the model lie, with the commit each one holds."""
    copies = []
    for name, node in sorted(snapshot.observed.nodes.items()):
        if node.reachability == "ready" and (copy := find_copy(node, spec)):
            copies.append(
                {"node": name, "path": copy.path, "commit": copy.commit, "sizeBytes": copy.size_bytes}
            )
    return copies


def no_manifest_condition() -> dict[str, Any]:
    return {
        "type": "Ready",
        "status": "False",
        "reason": "NoManifest",
        "message": "no manifest applied yet: run `genmlx apply -f cluster.yaml`",
    }
