"""A group that cannot start on jaccl falls back to ring, as the planner sees it: a rank whose
agent says it could not join (or an agent that refused the start) becomes a remembered failure;
with it, ``auto`` restarts the group on ring and the model serves Degraded (``RDMAUnavailable``,
with the rank's error), ``jaccl`` asked for is held back (Stalled) and its broken group stopped, and
new facts try jaccl again. The same pass after pass plans nothing new."""

from __future__ import annotations

from dataclasses import replace

from builders import NOW, manifest
from test_plan_groups import PAIR, QWEN, seen, start_of, with_rdma_cable

from genmlx.manifest.types import Mesh
from genmlx.master.planning.actions import StartRankGroup, StopRankGroup
from genmlx.master.planning.backend_failures import failure_of_refused_start, failures_in_ranks, remember
from genmlx.master.planning.observed import BackendFailure, EndpointHealth, ObservedNode
from genmlx.master.planning.plan import assess_models, plan
from genmlx.master.planning.status import model_phase_conditions
from genmlx.wire.agent_state import RankInfo

JACCL_ERROR = "RuntimeError: Cannot initialize jaccl distributed backend."
READY = EndpointHealth("http://10.0.0.1:8100/v1", "ready")


def desk(backend: str = "auto"):
    return manifest(QWEN, nodes=("a", "b"), mesh=Mesh(backend=backend))


def cabled() -> tuple[ObservedNode, ObservedNode]:
    return with_rdma_cable(*PAIR)


def with_ranks(nodes, ranks: dict[str, RankInfo]) -> tuple[ObservedNode, ...]:
    return tuple(replace(n, state=replace(n.state, ranks=(ranks[n.name],))) for n in nodes)


def failed_jaccl_group(manifest_=None) -> tuple[ObservedNode, ...]:
    """The jaccl group the plan starts, with rank 1 exited: its agent read that it could not join."""
    nodes = cabled()
    start = start_of(plan(manifest_ or desk(), seen(*nodes)))
    (_, first), (_, second) = start.launches
    ranks = {
        "a": RankInfo(first, 100, "running", NOW - 5),
        "b": RankInfo(second, 101, "exited", NOW - 5, 78, "exited", backend_failure=JACCL_ERROR),
    }
    return with_ranks(nodes, ranks)


def test_a_rank_that_could_not_join_jaccl_is_a_failure_with_the_facts_it_was_planned_from():
    nodes = failed_jaccl_group()
    found = failures_in_ranks(desk(), seen(*nodes))
    failure = found["qwen"]
    assert (failure.backend, failure.node, failure.error) == ("jaccl", "b", JACCL_ERROR)
    assert failure.spec_hash == nodes[1].state.ranks[0].launch.spec_hash
    assert remember({}, found) == found
    later = {"qwen": replace(failure, error="read again")}
    assert remember(found, later) == found, "the same group's failure is kept as first read"
    elsewhere = {"qwen": replace(failure, fingerprint="other facts", error="again")}
    assert remember(found, elsewhere) == elsewhere, "failing again on new facts is a new failure"
    assert failures_in_ranks(desk(), seen(*cabled())) == {}, "no exited rank, no failure"


def test_auto_restarts_the_failed_jaccl_group_on_ring_and_serves_degraded_with_the_ranks_error():
    nodes = failed_jaccl_group()
    failures = failures_in_ranks(desk(), seen(*nodes))
    (assessment,) = assess_models(desk(), replace(seen(*nodes), backend_failures=failures))
    stop, start = assessment.actions
    assert isinstance(stop, StopRankGroup) and isinstance(start, StartRankGroup)
    assert {launch.backend for _, launch in start.launches} == {"ring"}
    assert start.launches[0][1].hostfile == ("10.0.0.1:32323", "10.0.0.2:32323")
    # Running on ring and serving: Ready, and Degraded with the reason and the rank's error.
    ring = {n: RankInfo(launch, 200, "running", NOW - 1) for n, launch in start.launches}
    serving = replace(seen(*with_ranks(cabled(), ring), health=READY), backend_failures=failures)
    (ready,) = assess_models(desk(), serving)
    assert (ready.phase, ready.actions) == ("Ready", ())
    reason, message = ready.degraded
    assert reason == "RDMAUnavailable"
    assert f"jaccl failed to start on b: {JACCL_ERROR}" in message
    conditions = {c.type: c for c in model_phase_conditions(ready, NOW)}
    assert (conditions["Degraded"].status, conditions["Degraded"].reason) == ("True", "RDMAUnavailable")
    assert plan(desk(), serving) == [], "a second pass plans nothing"


def test_new_facts_try_jaccl_again():
    nodes = failed_jaccl_group()
    failures = failures_in_ranks(desk(), seen(*nodes))
    a, b = cabled()
    upgraded = replace(b, state=replace(b.state, facts=replace(b.state.facts, mlx_version="0.99.0")))
    a = replace(a, state=replace(a.state, facts=replace(a.state.facts, mlx_version="0.99.0")))
    start = start_of(plan(desk(), replace(seen(a, upgraded), backend_failures=failures)))
    assert {launch.backend for _, launch in start.launches} == {"jaccl"}


def test_jaccl_asked_for_that_failed_is_stalled_with_the_error_and_its_broken_group_stopped():
    jaccl = desk("jaccl")
    nodes = failed_jaccl_group(jaccl)
    failures = failures_in_ranks(jaccl, seen(*nodes))
    (assessment,) = assess_models(jaccl, replace(seen(*nodes), backend_failures=failures))
    assert (assessment.phase, assessment.reason) == ("Blocked", "RDMAUnavailable")
    assert JACCL_ERROR in assessment.message and "mesh.backend is jaccl" in assessment.message
    (stop,) = assessment.actions
    assert isinstance(stop, StopRankGroup) and stop.ranks == (("a", 0), ("b", 1))
    conditions = {c.type: c for c in model_phase_conditions(assessment, NOW)}
    assert (conditions["Stalled"].status, conditions["Stalled"].reason) == ("True", "RDMAUnavailable")
    # Once stopped, nothing more is planned while the facts stand.
    assert plan(jaccl, replace(seen(*cabled()), backend_failures=failures)) == []


def test_a_start_an_agent_refused_for_rdma_is_a_failure_and_any_other_is_not():
    start = start_of(plan(desk(), seen(*cabled())))
    why = "RDMA not ready for qwen.1 on jaccl: rdma_en3 down"
    refusal = f"agent at 10.0.0.2:6790 rejected POST /api/v1/ranks: {why}"
    failure = failure_of_refused_start(start, "b", refusal, seen(*cabled()))
    assert failure == BackendFailure(
        "jaccl",
        failure.fingerprint,
        "b",
        "RDMA not ready for qwen.1 on jaccl: rdma_en3 down",
        start.spec_hash,
    )
    assert (
        failure_of_refused_start(start, "b", "agent at 10.0.0.2:6790 does not answer", seen(*cabled()))
        is None
    )
    ring = start_of(plan(desk("ring"), seen(*cabled())))
    assert failure_of_refused_start(ring, "b", refusal, seen(*cabled())) is None


def test_a_cable_whose_last_check_found_it_down_is_no_rdma_link():
    down = {("a", "b"): "from b: en3 is down or has no carrier (is the cable in at both ends?)"}
    start = start_of(plan(desk(), replace(seen(*cabled()), links_down=down)))
    assert {launch.backend for _, launch in start.launches} == {"ring"}, "auto runs ring meanwhile"
    (held,) = assess_models(desk("jaccl"), replace(seen(*cabled()), links_down=down))
    assert (held.phase, held.reason) == ("Blocked", "RDMAUnavailable")
    assert "the Thunderbolt link between a and b is down (from b: en3 is down" in held.message
    back = start_of(plan(desk(), seen(*cabled())))
    assert {launch.backend for _, launch in back.launches} == {"jaccl"}, "checked up again: jaccl"
