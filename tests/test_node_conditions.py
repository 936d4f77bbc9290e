"""Reconciling, Stalled and Degraded for each node and for the cluster: observed state and model
assessments in, exact conditions out."""

from __future__ import annotations

import pytest
from builders import NOW, STORE, manifest, model, node, observed, rank, storage, stored

from genmlx.manifest.types import Manifest, StoragePath
from genmlx.master.planning.observed import Observed
from genmlx.master.planning.plan import ModelAssessment
from genmlx.master.planning.status import Condition, cluster_phase_conditions, node_phase_conditions
from genmlx.wire.agent_state import Transfer

CALM = {
    "Reconciling": ("False", "Settled"),
    "Stalled": ("False", "NotStalled"),
    "Degraded": ("False", "Healthy"),
}
PLACED = model("m", ("a",))


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
    ranks=(("a", rank(state="exited")),),
)
SERVING = ModelAssessment("m", "Ready", "Serving", "serving at http://10.0.0.1:8100/v1")
CASES = {
    "a quiet ready node: all calm": (manifest(PLACED), observed(node()), (), calm_but()),
    "a download into it: Reconciling with its progress": (
        manifest(PLACED),
        observed(node(transfers=[DOWNLOAD])),
        (),
        calm_but(
            Reconciling=("True", "Downloading", "downloading to a from hf://org/m@main: 25% of 1.00 GB")
        ),
    ),
    "a rank loading: Reconciling": (
        manifest(PLACED),
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
        manifest(PLACED),
        observed(
            node(reachability="unauthorized", detail="agent at 10.0.0.1:6790 refused the cluster token")
        ),
        (),
        calm_but(Stalled=("True", "Unauthorized", "agent at 10.0.0.1:6790 refused the cluster token")),
    ),
    "a permanent transfer failure: Stalled": (
        manifest(PLACED),
        observed(node(transfers=[GONE])),
        (),
        calm_but(Stalled=("True", "TransferFailed", "download of m to a failed: 404: no such repo")),
    ),
    "a temporary transfer failure: neither Stalled nor Degraded (it is retried)": (
        manifest(PLACED),
        observed(node(transfers=[FLAKY])),
        (),
        calm_but(),
    ),
    "a storage path the agent reports missing: Stalled": (
        manifest(PLACED),
        observed(node(reports=[storage(exists=False, total=0, free=0)])),
        (),
        calm_but(Stalled=("True", "StoragePathMissing", "storage path /models does not exist on a")),
    ),
    "a declared storage path the agent does not have: Stalled": (
        manifest(PLACED, storage=(STORE, "/Volumes/T9/models")),
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
        manifest(PLACED),
        observed(node(reachability="unreachable", detail="connection refused")),
        (),
        calm_but(Degraded=("True", "AgentUnreachable", "connection refused; models placed on it: m")),
    ),
    "unreachable with nothing placed on it: calm": (
        manifest(),
        observed(node(reachability="unreachable", detail="connection refused")),
        (),
        calm_but(),
    ),
    "a model backing off after rank failures on it: Degraded": (
        manifest(PLACED),
        observed(node(ranks=[rank(state="exited", exit_code=1)])),
        (BACKOFF,),
        calm_but(Degraded=("True", "RankBackoff", BACKOFF.message)),
    ),
    "a rank that exited for the first time: not yet Degraded": (
        manifest(PLACED),
        observed(node(ranks=[rank(state="exited", exit_code=1)])),
        (),
        calm_but(),
    ),
    "a rank that exited after restarts: Degraded": (
        manifest(PLACED),
        observed(node(ranks=[rank(state="exited", restarts=2, exit_code=-9)])),
        (),
        calm_but(Degraded=("True", "RankExited", "rank 0 of m exited with code -9 after 2 restart(s)")),
    ),
    "the disk nearly full: Degraded": (
        manifest(PLACED),
        observed(node(reports=[storage(total=1000, free=30)])),
        (),
        calm_but(Degraded=("True", "StorageNearlyFull", "storage path /models on a has 3% left")),
    ),
    "the manifest's maxGB nearly used: Degraded": (
        manifest(PLACED, storage=[StoragePath(STORE, 10)]),
        observed(node(stored=[stored(size=9_800_000_000, source="hf://org/m")])),
        (),
        calm_but(Degraded=("True", "StorageNearlyFull", "storage path /models on a has 2% left")),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_node_conditions(case):
    desired, seen, assessments, expected = CASES[case]
    assert conditions_of(desired, seen, assessments) == expected


def test_a_node_not_observed_is_unknown_on_every_condition():
    found = conditions_of(manifest(PLACED), observed(node("b")), name="a")
    assert {t: c[:2] for t, c in found.items()} == {t: ("Unknown", "NotObserved") for t in CALM}


def test_every_finding_shows_in_the_message_and_the_first_gives_the_reason():
    seen = observed(node(transfers=[GONE], reports=[storage(exists=False, total=0, free=0)]))
    status, reason, message = conditions_of(manifest(PLACED), seen)["Stalled"]
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
