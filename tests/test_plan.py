"""plan(desired, observed): desired + observed in, exact actions out."""

from __future__ import annotations

from dataclasses import replace

import pytest
from builders import NOW, STORE, manifest, node, observed, stored
from builders import model as spec_of

from genmlx.master.planning.actions import StartRankGroup, StopRankGroup
from genmlx.master.planning.groups import GroupPlan, desired_group
from genmlx.master.planning.observed import RolloutRecord
from genmlx.master.planning.placement import Placement
from genmlx.master.planning.plan import assess_models, plan, shared_nodes
from genmlx.wire.agent_state import RankInfo


def model(name: str, nodes=("a",), **serving):
    """A model whose source is a directory of /models on its node."""
    return spec_of(name, nodes, source="file", **serving)


def group(spec, port: int = 8100) -> StartRankGroup:
    one_node = GroupPlan((f"{STORE}/{spec.name}",), (port,), Placement("single", None, "one node"), (None,))
    return desired_group(spec, observed(), one_node)


def running(spec, port: int = 8100, state="running", exit_code=None, spec_hash=None) -> RankInfo:
    launch = group(spec, port).launches[0][1]
    if spec_hash:
        launch = replace(launch, spec_hash=spec_hash)
    return RankInfo(launch, pid=4242, state=state, started_at=NOW - 60, exit_code=exit_code)


M = model("m")
CASES = {
    "a model on a ready node, not running: start it on the first free port": (
        manifest(M),
        observed(node(stored=["m"])),
        [group(M)],
    ),
    "converged: running with the same spec and serving": (
        manifest(M),
        observed(node(stored=["m"], ranks=[running(M)]), ready=["m"]),
        [],
    ),
    "running, still loading: wait": (
        manifest(M),
        observed(node(stored=["m"], ranks=[running(M)])),
        [],
    ),
    "node unreachable: wait, touch nothing": (
        manifest(M),
        observed(node(reachability="unreachable")),
        [],
    ),
    "model files absent on the node: nothing to start": (
        manifest(M),
        observed(node()),
        [],
    ),
    "model directory incomplete: nothing to start": (
        manifest(M),
        observed(node(stored=[stored("m", complete=False)])),
        [],
    ),
    "spec changed: stop the group, start the new one on the same port": (
        manifest(model("m", max_batch=4)),
        observed(node(stored=["m"], ranks=[running(M, port=8105)]), ready=["m"]),
        [
            StopRankGroup("m", (("a", 0),), "its spec changed"),
            group(model("m", max_batch=4), port=8105),
        ],
    ),
    "a rank exited: restart the group": (
        manifest(M),
        observed(node(stored=["m"], ranks=[running(M, state="exited", exit_code=1)])),
        [StopRankGroup("m", (("a", 0),), "rank 0 on a exited with code 1; restarting the group"), group(M)],
    ),
    "a rank exited again within its backoff: wait": (
        manifest(M),
        observed(
            node(stored=["m"], ranks=[running(M, state="exited", exit_code=1)]),
            rollouts={"m": RolloutRecord(group(M).spec_hash, 2, NOW - 1)},
        ),
        [],
    ),
    "a rank exited after its backoff: restart": (
        manifest(M),
        observed(
            node(stored=["m"], ranks=[running(M, state="exited", exit_code=1)]),
            rollouts={"m": RolloutRecord(group(M).spec_hash, 2, NOW - 10)},
        ),
        [StopRankGroup("m", (("a", 0),), "rank 0 on a exited with code 1; restarting the group"), group(M)],
    ),
    "a model removed from the manifest: stop its ranks": (
        manifest(),
        observed(node(stored=["m"], ranks=[running(M)])),
        [StopRankGroup("m", (("a", 0),), "no longer in the manifest")],
    ),
    "a second model takes the next free port; a running one keeps its own": (
        manifest(model("m"), model("n")),
        observed(node(stored=["m", "n"], ranks=[running(M, port=8100)]), ready=["m"]),
        [group(model("n"), port=8101)],
    ),
    "an explicit port wins": (
        manifest(model("m", port=9000)),
        observed(node(stored=["m"])),
        [group(model("m", port=9000), port=9000)],
    ),
    "a model on two nodes is not served by this version": (
        manifest(model("m", nodes=("a", "b")), nodes=("a", "b")),
        observed(node("a", stored=["m"]), node("b", stored=["m"])),
        [],
    ),
}


@pytest.mark.parametrize("desired,seen,expected", CASES.values(), ids=CASES.keys())
def test_plan(desired, seen, expected):
    assert plan(desired, seen) == expected


def test_no_manifest_plans_nothing_even_with_ranks_running():
    assert plan(None, observed(node(stored=["m"], ranks=[running(M)]))) == []


def test_a_second_pass_after_carrying_out_the_plan_plans_nothing():
    desired = manifest(model("m"), model("n", port=9001))
    seen = observed(node(stored=["m", "n"]))
    actions = plan(desired, seen)
    assert [type(a) for a in actions] == [StartRankGroup, StartRankGroup]
    ranks = [RankInfo(launch, 1, "running", NOW) for a in actions for _, launch in a.launches]
    after = observed(node(stored=["m", "n"], ranks=ranks), ready=["m", "n"])
    assert plan(desired, after) == []
    assert {a.phase for a in assess_models(desired, after)} == {"Ready"}


def test_assessment_explains_why_a_model_is_blocked():
    (assessment,) = assess_models(manifest(M), observed(node()))
    assert assessment.phase == "Blocked"
    assert assessment.reason == "ModelNotFound"
    assert "file:///models/m is not in a storage path of any node" in assessment.message


def test_an_incomplete_local_model_is_named():
    (assessment,) = assess_models(manifest(M), observed(node(stored=[stored("m", complete=False)])))
    assert (assessment.phase, assessment.reason) == ("Blocked", "ModelIncomplete")
    assert "/models/m on node a is incomplete" in assessment.message


def test_a_changed_serving_option_changes_the_spec_hash_and_a_same_spec_does_not():
    assert group(M).spec_hash == group(model("m")).spec_hash
    assert group(M).spec_hash != group(model("m", max_batch=2)).spec_hash


def test_the_plan_reads_as_a_diff_with_a_closing_summary():
    from genmlx.master.planning.actions import describe_plan, plan_summary

    changed = model("m", max_batch=4)
    actions = plan(
        manifest(changed, model("n")),
        observed(node(stored=["m", "n"], ranks=[running(M), running(model("gone"), port=8109)]), ready=["m"]),
    )
    lines = describe_plan(actions)
    assert lines == [
        "~ restart m: its spec changed",
        "+ start n (rank 0 on a:8101)",
        "- stop gone (rank 0 on a): no longer in the manifest",
    ]
    assert plan_summary(lines) == "1 to create, 1 to change, 1 to remove"


@pytest.mark.parametrize(
    "seen,expected",
    [
        (
            observed(node(stored=["m"], ranks=[running(M)]), ready=["m"]),
            {"Reconciling": "False", "Stalled": "False", "Degraded": "False"},
        ),
        (observed(node(stored=["m"])), {"Reconciling": "True", "Stalled": "False", "Degraded": "False"}),
        (observed(node()), {"Reconciling": "False", "Stalled": "True", "Degraded": "False"}),
        (
            observed(
                node(stored=["m"], ranks=[running(M, state="exited", exit_code=1)]),
                rollouts={"m": RolloutRecord(group(M).spec_hash, 2, NOW - 1)},
            ),
            {"Reconciling": "False", "Stalled": "False", "Degraded": "True"},
        ),
    ],
    ids=["serving", "starting", "model missing", "crash loop backing off"],
)
def test_each_model_gets_reconciling_stalled_and_degraded_beside_ready(seen, expected):
    from genmlx.master.planning.status import model_phase_conditions

    (assessment,) = assess_models(manifest(M), seen)
    conditions = model_phase_conditions(assessment, NOW)
    assert {c.type: c.status for c in conditions} == expected
    for condition in conditions:
        assert (condition.reason == assessment.reason) == (condition.status == "True")


def test_each_rank_is_launched_with_its_nodes_spare_memory_which_alone_restarts_nothing() -> None:
    from genmlx.master.planning.batching import Batching

    batching = Batching(8, 64, "maxBatch 8: why", spare_bytes=(5 << 30,))
    one_node = GroupPlan(
        (f"{STORE}/m",), (8100,), Placement("single", None, "one node"), (None,), batching=batching
    )
    started = desired_group(M, observed(), one_node)
    assert started.launches[0][1].spare_bytes == 5 << 30
    assert started.launches[0][1].serving.max_batch == 8
    less = replace(one_node, batching=replace(batching, spare_bytes=(1 << 30,)))
    assert desired_group(M, observed(), less).spec_hash == started.spec_hash
    unknown = desired_group(M, observed(), replace(one_node, batching=None))
    assert unknown.launches[0][1].spare_bytes is None
    # A GPU node that comes to serve another model too leaves none spare: the group restarts.
    shared = replace(one_node, batching=replace(batching, spare_bytes=(0,), shared_gpu_nodes=("a",)))
    assert desired_group(M, observed(), shared).spec_hash != started.spec_hash


def test_the_nodes_a_model_shares_with_others_are_those_another_model_names() -> None:
    alone, pair, other = model("m", nodes=("a", "b")), model("n", nodes=("b", "c")), model("o", nodes=("d",))
    assert shared_nodes(alone, manifest(alone, pair, other)) == {"b"}
    assert shared_nodes(pair, manifest(alone, pair, other)) == {"b"}
    assert shared_nodes(other, manifest(alone, pair, other)) == frozenset()
    assert shared_nodes(alone, manifest(alone)) == frozenset()
