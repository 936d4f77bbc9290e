"""Status: Kubernetes-style conditions for the cluster, each node and each model: Ready, and beside
it Reconciling (working towards the manifest), Stalled (cannot progress until someone acts) and
Degraded (failing or at risk while it works).

Derived from the same assessments the planner acts on. ``lastTransitionTime`` moves only when a
condition's status changes, so it says how long things have been as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from genmlx.manifest.types import Manifest, Node
from genmlx.master.planning.observed import Observed, ObservedNode
from genmlx.master.planning.plan import ModelAssessment
from genmlx.master.planning.presence import max_bytes, same_path, transfer_progress, transfer_reason
from genmlx.wire.agent_state import StorageReport
from genmlx.wire.status import ConditionReport

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str
    last_transition_time: float

    def report(self) -> ConditionReport:
        """As the status document carries it."""
        return ConditionReport(
            self.type, self.status, self.reason, self.message, iso_time(self.last_transition_time)
        )


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
    reasons = {"unauthorized": "Unauthorized", "clock-skew": "ClockSkew"}
    return Condition("Ready", "False", reasons.get(node.reachability, "AgentUnreachable"), node.detail, now)


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
        elif type_ == "Degraded" and assessment.degraded is not None:
            conditions.append(Condition(type_, "True", *assessment.degraded, now))
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


# ----- Reconciling, Stalled and Degraded for each node, and for the cluster -----

STORAGE_NEARLY_FULL = 0.05  # Degraded when less than this share of a storage path is left
CALM_REASONS = {"Reconciling": "Settled", "Stalled": "NotStalled", "Degraded": "Healthy"}
Finding = tuple[str, str]  # (reason, message) that makes a condition True


def node_phase_conditions(
    manifest: Manifest, observed: Observed, assessments: list[ModelAssessment]
) -> dict[str, tuple[Condition, ...]]:
    """Reconciling, Stalled and Degraded for every declared node (beside its Ready)."""
    return {
        spec.name: node_phases(spec, manifest, observed.nodes.get(spec.name), assessments, observed.now)
        for spec in manifest.nodes
    }


def node_phases(
    spec: Node, manifest: Manifest, node: ObservedNode | None, assessments: list[ModelAssessment], now: float
) -> tuple[Condition, ...]:
    if node is None:
        message = f"node {spec.name} has not been observed yet"
        return tuple(Condition(t, "Unknown", "NotObserved", message, now) for t in CALM_REASONS)
    serving = {a.model for a in assessments if a.phase == "Ready"}
    findings = {
        "Reconciling": node_reconciling(node, serving),
        "Stalled": node_stalled(spec, node),
        "Degraded": node_degraded(manifest, node, assessments),
    }
    return tuple(finding_condition(type_, found, now) for type_, found in findings.items())


def finding_condition(type_: str, findings: list[Finding], now: float) -> Condition:
    """True with the first finding's reason, and every finding in the message; else False."""
    if not findings:
        return Condition(type_, "False", CALM_REASONS[type_], "", now)
    return Condition(type_, "True", findings[0][0], "; ".join(message for _, message in findings), now)


def node_reconciling(node: ObservedNode, serving: set[str]) -> list[Finding]:
    """Transfers into the node, and ranks on it still starting or loading. A rank of a model the
    master found serving is not: its own check of rank 0 is fresher than the agent's poll, and
    the ranks of a group serve together."""
    state = node.state
    findings = [
        (transfer_reason(t), transfer_progress(node.name, t))
        for t in (state.transfers if state else ())
        if t.state == "running"
    ]
    for info in node.ranks:
        starting = info.state == "running" and info.phase in ("starting", "loading")
        if starting and info.launch.model not in serving:
            findings.append(
                ("RankStarting", f"rank {info.launch.rank} of {info.launch.model} is {info.phase}")
            )
    return findings


def node_stalled(spec: Node, node: ObservedNode) -> list[Finding]:
    """What keeps the node from progressing until someone acts: the token, a transfer that
    cannot succeed, a storage path that is not there."""
    if node.reachability == "unauthorized":
        return [("Unauthorized", node.detail or f"the agent at {node.address} refused the cluster token")]
    if node.reachability == "clock-skew":
        return [("ClockSkew", node.detail)]
    state = node.state
    findings = [
        ("TransferFailed", f"{t.kind} of {t.model} to {node.name} failed: {t.error}")
        for t in (state.transfers if state else ())
        if t.state == "failed" and t.permanent
    ]
    reported = state.storage if state else ()
    for report in reported:
        if not report.exists:
            findings.append(
                ("StoragePathMissing", f"storage path {report.path} does not exist on {node.name}")
            )
    if state is not None:
        for declared in spec.storage:
            if not any(same_path(r.path, declared.path) for r in reported):
                message = f"storage path {declared.path} is not one of the agent's (--storage) on {node.name}"
                findings.append(("StoragePathMissing", message))
    return findings


def node_degraded(
    manifest: Manifest, node: ObservedNode, assessments: list[ModelAssessment]
) -> list[Finding]:
    """Ranks on the node failing again and again, the node gone while models need it, or a
    storage path nearly full."""
    placed = [m.name for m in manifest.models if node.name in m.nodes]
    if node.reachability == "unreachable" and placed:
        return [("AgentUnreachable", f"{node.detail}; models placed on it: {', '.join(placed)}")]
    findings = [
        ("RankBackoff", a.message)
        for a in assessments
        if a.phase == "Backoff" and any(name == node.name for name, _ in a.ranks)
    ]
    for info in node.ranks:
        if info.state == "exited" and info.restarts > 0:
            what = f"rank {info.launch.rank} of {info.launch.model} exited with code {info.exit_code}"
            findings.append(("RankExited", f"{what} after {info.restarts} restart(s)"))
    for report in node.state.storage if node.state else ():
        if (finding := storage_nearly_full(node.name, report, manifest.node(node.name))) is not None:
            findings.append(finding)
    return findings


def storage_nearly_full(node: str, report: StorageReport, declared: Node) -> Finding | None:
    """Less than 5% free on the disk, or of the manifest's ``maxGB`` for that path."""
    if not report.exists or report.total_bytes <= 0:
        return None
    left = report.free_bytes / report.total_bytes
    limit = max_bytes(report, declared.storage)
    if limit:
        used = sum(m.size_bytes for m in report.models)
        left = min(left, (limit - used) / limit)
    if left >= STORAGE_NEARLY_FULL:
        return None
    return ("StorageNearlyFull", f"storage path {report.path} on {node} has {max(left, 0):.0%} left")


def cluster_phase_conditions(
    nodes: dict[str, tuple[Condition, ...]], models: dict[str, tuple[Condition, ...]], now: float
) -> tuple[Condition, ...]:
    """The cluster is Reconciling, Stalled or Degraded when any node or model is; the reason and
    message are those of the first one, named."""
    conditions = []
    for type_, calm in CALM_REASONS.items():
        culprits = [
            (kind, name, c)
            for kind, group in (("node", nodes), ("model", models))
            for name, conditions_of in group.items()
            for c in conditions_of
            if c.type == type_ and c.status == "True"
        ]
        if culprits:
            kind, name, first = culprits[0]
            more = f" (and {len(culprits) - 1} more)" if len(culprits) > 1 else ""
            conditions.append(
                Condition(type_, "True", first.reason, f"{kind} {name}: {first.message}{more}", now)
            )
        else:
            conditions.append(Condition(type_, "False", calm, "", now))
    return tuple(conditions)
