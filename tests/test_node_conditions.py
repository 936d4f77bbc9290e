"""Reconciling, Stalled and Degraded for each node and for the cluster: observed state and model
assessments in, exact conditions out."""

from __future__ import annotations

import pytest

from genmlx.manifest.types import Manifest, Master, ModelSpec, Node, Source, StoragePath
from genmlx.master.planning.observed import Observed, ObservedNode
from genmlx.master.planning.plan import ModelAssessment
from genmlx.master.planning.status import Condition, cluster_phase_conditions, node_phase_conditions
from genmlx.wire.agent_state import AgentState, NodeFacts, RankInfo, StorageReport, StoredModel, Transfer
from genmlx.wire.rank_launch import RankLaunch

NOW = 1_000_000.0
STORE = "/models"
TB = 1 << 40
FACTS = NodeFacts("mac", "Darwin 24.1.0", "arm64", 10, 64 << 30, 48 << 30)
CALM = {
    "Reconciling": ("False", "Settled"),
    "Stalled": ("False", "NotStalled"),
    "Degraded": ("False", "Healthy"),
}


def manifest(placed=("a",), max_gb=None, storage=(STORE,)) -> Manifest:
    paths = tuple(StoragePath(p, max_gb) for p in storage)
    nodes = (Node("a", "10.0.0.1:6790", paths), Node("b", "10.0.0.2:6790", (StoragePath(STORE),)))
    models = (ModelSpec("m", Source("hf", "org/m"), tuple(placed)),) if placed else ()
    return Manifest("desk", Master("a"), nodes, models)


def rank(state="running", phase="ready", restarts=0, exit_code=None) -> RankInfo:
    launch = RankLaunch("m", f"{STORE}/m", 0, 1, 8100, "hash")
    return RankInfo(launch, 42, state, NOW - 5, exit_code, phase, restarts)


def node(
    name="a", reachability="ready", ranks=(), transfers=(), storage=None, detail="", used=0
) -> ObservedNode:
    models = (StoredModel("m", f"{STORE}/m", used, True, "hf://org/m"),) if used else ()
    reports = storage if storage is not None else (StorageReport(STORE, True, TB, TB // 2, models),)
    state = AgentState(name, "0.1.0", FACTS, reports, tuple(ranks), tuple(transfers))
    return ObservedNode(
        name, "10.0.0.1:6790", reachability, detail, state if reachability == "ready" else None
    )


def observed(*nodes: ObservedNode) -> Observed:
    return Observed(NOW, {n.name: n for n in nodes})


def conditions_of(
    desired: Manifest, seen: Observed, assessments=(), name="a"
) -> dict[str, tuple[str, str, str]]:
    found = node_phase_conditions(desired, seen, list(assessments))[name]
    return {c.type: (c.status, c.reason, c.message) for c in found}


def calm_but(**changed: tuple[str, str, str]) -> dict[str, tuple[str, ...]]:
    """The calm conditions, with the given ones replaced."""
    return {t: changed.get(t, (*pair, "")) for t, pair in CALM.items()}


DOWNLOAD = Transfer("m", "download", "hf://org/m@main", STORE, "running", 250_000_000, 1_000_000_000)
GONE = Transfer(
    "m", "download", "hf://org/gone@main", STORE, "failed", error="404: no such repo", permanent=True
)
FLAKY = Transfer("m", "sync", "peer b", STORE, "failed", error="connection reset", permanent=False)
BACKOFF = ModelAssessment(
    "m",
    "Backoff",
    "RankExited",
    "rank 0 on a exited with code 1; restarting in 8s",
    ranks=(("a", rank("exited")),),
)
SERVING = ModelAssessment("m", "Ready", "Serving", "serving at http://10.0.0.1:8100/v1")
CASES = {
    "a quiet ready node: all calm": (manifest(), observed(node()), (), calm_but()),
    "a download into it: Reconciling with its progress": (
        manifest(),
        observed(node(transfers=[DOWNLOAD])),
        (),
        calm_but(
            Reconciling=("True", "Downloading", "downloading to a from hf://org/m@main: 25% of 1.00 GB")
        ),
    ),
    "a rank loading: Reconciling": (
        manifest(),
        observed(node(ranks=[rank(phase="loading")])),
        (),
        calm_but(Reconciling=("True", "RankStarting", "rank 0 of m is loading")),
    ),
    "a rank its agent last saw loading, of a model the master found serving: calm": (
        manifest(),
        observed(node(ranks=[rank(phase="loading")])),
        (SERVING,),
        calm_but(),
    ),
    "unauthorized: Stalled with the agent's word": (
        manifest(),
        observed(
            node(reachability="unauthorized", detail="agent at 10.0.0.1:6790 refused the cluster token")
        ),
        (),
        calm_but(Stalled=("True", "Unauthorized", "agent at 10.0.0.1:6790 refused the cluster token")),
    ),
    "a permanent transfer failure: Stalled": (
        manifest(),
        observed(node(transfers=[GONE])),
        (),
        calm_but(Stalled=("True", "TransferFailed", "download of m to a failed: 404: no such repo")),
    ),
    "a temporary transfer failure: neither Stalled nor Degraded (it is retried)": (
        manifest(),
        observed(node(transfers=[FLAKY])),
        (),
        calm_but(),
    ),
    "a storage path the agent reports missing: Stalled": (
        manifest(),
        observed(node(storage=(StorageReport(STORE, False, 0, 0),))),
        (),
        calm_but(Stalled=("True", "StoragePathMissing", "storage path /models does not exist on a")),
    ),
    "a declared storage path the agent does not have: Stalled": (
        manifest(storage=(STORE, "/Volumes/T9/models")),
        observed(node()),
        (),
        calm_but(
            Stalled=(
                "True",
                "StoragePathMissing",
                "storage path /Volumes/T9/models is not one of the agent's (--storage) on a",
            )
        ),
    ),
    "unreachable with a model placed on it: Degraded": (
        manifest(),
        observed(node(reachability="unreachable", detail="connection refused")),
        (),
        calm_but(Degraded=("True", "AgentUnreachable", "connection refused; models placed on it: m")),
    ),
    "unreachable with nothing placed on it: calm": (
        manifest(placed=()),
        observed(node(reachability="unreachable", detail="connection refused")),
        (),
        calm_but(),
    ),
    "a model backing off after rank failures on it: Degraded": (
        manifest(),
        observed(node(ranks=[rank("exited", exit_code=1)])),
        (BACKOFF,),
        calm_but(Degraded=("True", "RankBackoff", BACKOFF.message)),
    ),
    "a rank that exited for the first time: not yet Degraded": (
        manifest(),
        observed(node(ranks=[rank("exited", exit_code=1)])),
        (),
        calm_but(),
    ),
    "a rank that exited after restarts: Degraded": (
        manifest(),
        observed(node(ranks=[rank("exited", restarts=2, exit_code=-9)])),
        (),
        calm_but(Degraded=("True", "RankExited", "rank 0 of m exited with code -9 after 2 restart(s)")),
    ),
    "the disk nearly full: Degraded": (
        manifest(),
        observed(node(storage=(StorageReport(STORE, True, 1000, 30),))),
        (),
        calm_but(Degraded=("True", "StorageNearlyFull", "storage path /models on a has 3% left")),
    ),
    "the manifest's maxGB nearly used: Degraded": (
        manifest(max_gb=10),
        observed(node(used=9_800_000_000)),
        (),
        calm_but(Degraded=("True", "StorageNearlyFull", "storage path /models on a has 2% left")),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_node_conditions(case):
    desired, seen, assessments, expected = CASES[case]
    assert conditions_of(desired, seen, assessments) == expected


def test_a_node_not_observed_is_unknown_on_every_condition():
    found = conditions_of(manifest(), observed(node("b")), name="a")
    assert {t: c[:2] for t, c in found.items()} == {t: ("Unknown", "NotObserved") for t in CALM}


def test_every_finding_shows_in_the_message_and_the_first_gives_the_reason():
    seen = observed(node(transfers=[GONE], storage=(StorageReport(STORE, False, 0, 0),)))
    status, reason, message = conditions_of(manifest(), seen)["Stalled"]
    assert (status, reason) == ("True", "TransferFailed")
    assert message.endswith("; storage path /models does not exist on a")


def condition(type_: str, status: str, reason: str, message: str = "") -> Condition:
    return Condition(type_, status, reason, message, NOW)


def calm(*skip: str) -> tuple[Condition, ...]:
    return tuple(condition(t, *CALM[t]) for t in CALM if t not in skip)


def test_the_cluster_is_calm_when_every_node_and_model_is():
    found = cluster_phase_conditions({"a": calm(), "b": calm()}, {"m": calm()}, NOW)
    assert found == calm()


def test_the_cluster_takes_the_first_culprit_and_counts_the_rest():
    nodes = {
        "a": calm(),
        "b": (*calm("Degraded"), condition("Degraded", "True", "StorageNearlyFull", "3% left")),
    }
    models = {"m": (*calm("Degraded"), condition("Degraded", "True", "RankExited", "rank 0 exited"))}
    found = {c.type: c for c in cluster_phase_conditions(nodes, models, NOW)}
    assert found["Degraded"] == condition(
        "Degraded", "True", "StorageNearlyFull", "node b: 3% left (and 1 more)"
    )
    assert found["Stalled"] == condition("Stalled", "False", "NotStalled")
    stalled_model = {"m": (*calm("Stalled"), condition("Stalled", "True", "TransferFailed", "no such repo"))}
    found = {c.type: c for c in cluster_phase_conditions({"a": calm()}, stalled_model, NOW)}
    assert found["Stalled"] == condition("Stalled", "True", "TransferFailed", "model m: no such repo")
