"""Status: Kubernetes-style conditions for the cluster, each node and each model.

Derived from the same assessments the planner acts on. ``lastTransitionTime`` moves only when a
condition's status changes, so it says how long things have been as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from genmlx.manifest.types import Manifest
from genmlx.reconciler.observed import Observed, ObservedNode
from genmlx.reconciler.plan import ModelAssessment

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str
    last_transition_time: float

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": iso_time(self.last_transition_time),
        }


def iso_time(t: float) -> str:
    import datetime

    return (
        datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def carry_transition(new: Condition, previous: Condition | None) -> Condition:
    """Keep the previous transition time while the status stays the same."""
    if previous is not None and previous.status == new.status:
        return replace(new, last_transition_time=previous.last_transition_time)
    return new


def carry_all(new: tuple[Condition, ...], previous: tuple[Condition, ...]) -> tuple[Condition, ...]:
    """``carry_transition`` for each condition, matched by type."""
    by_type = {c.type: c for c in previous}
    return tuple(carry_transition(c, by_type.get(c.type)) for c in new)


def node_ready(node: ObservedNode | None, name: str, now: float) -> Condition:
    if node is None:
        return Condition("Ready", "Unknown", "NotObserved", f"node {name} has not been observed yet", now)
    if node.reachability == "ready":
        return Condition("Ready", "True", "AgentReady", f"agent at {node.address} answers", now)
    reason = "Unauthorized" if node.reachability == "unauthorized" else "AgentUnreachable"
    return Condition("Ready", "False", reason, node.detail, now)


def model_ready(assessment: ModelAssessment, now: float) -> Condition:
    status: ConditionStatus = "True" if assessment.phase == "Ready" else "False"
    return Condition("Ready", status, assessment.reason, assessment.message, now)


# Which phases make each of the other conditions True, and the reason they give when False.
PHASE_CONDITIONS = (
    ("Reconciling", ("Progressing", "Waiting"), "Settled"),  # working towards the manifest
    ("Stalled", ("Blocked",), "NotStalled"),  # cannot progress until the manifest or cluster changes
    ("Degraded", ("Backoff",), "Healthy"),  # failing and backing off between attempts
)


def model_phase_conditions(assessment: ModelAssessment, now: float) -> tuple[Condition, ...]:
    """Reconciling, Stalled and Degraded beside Ready, as Kubernetes (kstatus) reads them."""
    conditions = []
    for type_, phases, calm in PHASE_CONDITIONS:
        if assessment.phase in phases:
            conditions.append(Condition(type_, "True", assessment.reason, assessment.message, now))
        else:
            conditions.append(Condition(type_, "False", calm, "", now))
    return tuple(conditions)


def cluster_ready(
    manifest: Manifest, nodes: dict[str, Condition], models: dict[str, Condition], now: float
) -> Condition:
    """Ready when every node and every model is; otherwise the message names the first thing wrong."""
    for name, condition in nodes.items():
        if condition.status != "True":
            return Condition("Ready", "False", "NodeNotReady", f"node {name}: {condition.message}", now)
    for name, condition in models.items():
        if condition.status != "True":
            return Condition("Ready", "False", "ModelNotReady", f"model {name}: {condition.message}", now)
    what = f"{len(manifest.nodes)} node(s), {len(manifest.models)} model(s) ready"
    return Condition("Ready", "True", "AllReady", what, now)


def node_conditions(manifest: Manifest, observed: Observed) -> dict[str, Condition]:
    return {n.name: node_ready(observed.nodes.get(n.name), n.name, observed.now) for n in manifest.nodes}
