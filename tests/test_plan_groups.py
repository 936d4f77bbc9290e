"""plan() for rank groups across nodes: placement decides how they split the model, each rank gets
its own port (ranks sharing a host never collide), the ring hostfile joins them, and a group that
hung or does not fit is handled as the manifest promises."""

from __future__ import annotations

from dataclasses import replace

from genmlx.manifest.types import Manifest, Master, Mesh, ModelSpec, Node, Serving, Source, StoragePath
from genmlx.master.planning.actions import StartRankGroup, StopRankGroup
from genmlx.master.planning.observed import EndpointHealth, Observed, ObservedNode, RolloutRecord
from genmlx.master.planning.plan import LOAD_DEADLINE_S, assess_models, plan
from genmlx.wire.agent_state import AgentState, ModelShape, NodeFacts, RankInfo, StorageReport, StoredModel

NOW = 1_000_000.0
GIB = 1 << 30
SHAPE = ModelShape(
    weight_bytes=8 * GIB, num_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128
)
QWEN = ModelSpec("qwen", Source("file", "/models/qwen"), ("a", "b"), serving=Serving(context_length=4096))


def desk(*models: ModelSpec, mesh_port: int = 32323) -> Manifest:
    nodes = tuple(Node(n, None, (StoragePath("/models"),)) for n in "abc")
    return Manifest("desk", Master("a"), nodes, models, mesh=Mesh(port=mesh_port))


def node(
    name: str,
    host: str,
    memory_gib: int = 64,
    shape: ModelShape | None = SHAPE,
    ranks=(),
    published=NOW - 3600,
) -> ObservedNode:
    facts = NodeFacts(name, "Darwin 25.2.0", "arm64", 12, memory_gib * GIB, memory_gib * GIB // 2)
    copy = StoredModel("qwen", "/models/qwen", SHAPE.weight_bytes, True, shape=shape, published_at=published)
    stored = (copy,)
    state = AgentState(
        name, "0.1.0", facts, (StorageReport("/models", True, 1 << 42, 1 << 41, stored),), ranks
    )
    return ObservedNode(name, f"{host}:6790", "ready", "", state)


def seen(*nodes: ObservedNode, health: EndpointHealth | None = None, rollouts=None) -> Observed:
    endpoints = {"qwen": health} if health else {}
    return Observed(NOW, {n.name: n for n in nodes}, endpoints, rollouts or {})


def start_of(actions) -> StartRankGroup:
    (start,) = [a for a in actions if isinstance(a, StartRankGroup)]
    return start


def test_equal_nodes_whose_heads_divide_run_tensor_parallel_joined_by_a_ring_hostfile():
    start = start_of(plan(desk(QWEN), seen(node("a", "10.0.0.1"), node("b", "10.0.0.2"))))
    launches = [launch for _, launch in start.launches]
    assert [(node, launch.rank) for node, launch in start.launches] == [("a", 0), ("b", 1)]
    assert {launch.parallelism for launch in launches} == {"tensor"}
    assert all(launch.world_size == 2 and launch.port == 8100 for launch in launches)
    assert launches[0].hostfile == ("10.0.0.1:32323", "10.0.0.2:32323")
    assert launches[0].layer_split is None


def test_ranks_sharing_a_host_get_their_own_http_and_ring_ports():
    start = start_of(plan(desk(QWEN, mesh_port=40000), seen(node("a", "127.0.0.1"), node("b", "127.0.0.1"))))
    launches = [launch for _, launch in start.launches]
    assert [launch.port for launch in launches] == [8100, 8101]
    assert launches[1].hostfile == ("127.0.0.1:40000", "127.0.0.1:40001")


def test_unequal_memory_runs_pipeline_parallel_split_by_memory():
    start = start_of(plan(desk(QWEN), seen(node("a", "10.0.0.1", 96), node("b", "10.0.0.2", 32))))
    launches = [launch for _, launch in start.launches]
    assert {launch.parallelism for launch in launches} == {"pipeline"}
    assert launches[0].layer_split == (24, 8)
    assert start.describe() == "+ start qwen, pipeline parallel 24/8 (rank 0 on a:8100, rank 1 on b:8100)"


def test_a_model_that_does_not_fit_is_blocked_with_the_numbers_and_nothing_starts():
    small = seen(node("a", "10.0.0.1", 4), node("b", "10.0.0.2", 4))
    (assessment,) = assess_models(desk(QWEN), small)
    assert (assessment.phase, assessment.reason) == ("Blocked", "DoesNotFit")
    assert "GB" in assessment.message and assessment.actions == ()
    assert plan(desk(QWEN), small) == []


def running_group() -> tuple[dict[str, RankInfo], tuple[ObservedNode, ...]]:
    """QWEN's group as the plan starts it, running for a minute on a and b: its ranks by node, and
    the nodes reporting them."""
    first = plan(desk(QWEN), seen(node("a", "10.0.0.1"), node("b", "10.0.0.2")))
    ranks = {
        n: RankInfo(launch, 100 + launch.rank, "running", NOW - 60) for n, launch in start_of(first).launches
    }
    return ranks, (node("a", "10.0.0.1", ranks=(ranks["a"],)), node("b", "10.0.0.2", ranks=(ranks["b"],)))


def test_a_hung_group_is_restarted_and_backs_off_when_it_keeps_hanging():
    ranks, nodes = running_group()
    hung = EndpointHealth("http://10.0.0.1:8100/v1", "hung", "the canary completion got no answer in 60s")
    (assessment,) = assess_models(desk(QWEN), seen(*nodes, health=hung))
    assert assessment.reason == "RankHung" and "no answer" in assessment.message
    assert [type(a) for a in assessment.actions] == [StopRankGroup, StartRankGroup]
    recently = {"qwen": RolloutRecord(ranks["a"].launch.spec_hash, attempts=3, last_start=NOW - 1)}
    (waiting,) = assess_models(desk(QWEN), seen(*nodes, health=hung, rollouts=recently))
    assert (waiting.phase, waiting.reason, waiting.actions) == ("Backoff", "RankHung", ())
    ready = EndpointHealth("http://10.0.0.1:8100/v1", "ready")
    assert plan(desk(QWEN), seen(*nodes, health=ready)) == []  # same spec, same ports: converged


def test_a_group_still_loading_after_the_deadline_is_restarted():
    _, nodes = running_group()
    loading = EndpointHealth("http://10.0.0.1:8100/v1", "loading", "loading the model")
    (patient,) = assess_models(desk(QWEN), seen(*nodes, health=loading))
    assert (patient.reason, patient.actions) == ("Loading", ())
    later = replace(seen(*nodes, health=loading), now=NOW - 60 + LOAD_DEADLINE_S + 1)
    (restarted,) = assess_models(desk(QWEN), later)
    assert restarted.reason == "LoadDeadlineExceeded" and "15 minutes" in restarted.message
    assert [type(a) for a in restarted.actions] == [StopRankGroup, StartRankGroup]


def test_jaccl_is_refused_until_ranks_can_be_started_on_it():
    jaccl = replace(desk(QWEN), mesh=Mesh(backend="jaccl"))
    (assessment,) = assess_models(jaccl, seen(node("a", "10.0.0.1"), node("b", "10.0.0.2")))
    assert (assessment.phase, assessment.reason, assessment.actions) == ("Blocked", "BackendUnsupported", ())


def test_ring_ports_beyond_the_last_port_block_the_model_with_the_numbers():
    one_host = seen(node("a", "127.0.0.1"), node("b", "127.0.0.1"))
    (assessment,) = assess_models(desk(QWEN, mesh_port=65535), one_host)
    assert (assessment.phase, assessment.reason) == ("Blocked", "MeshUnplannable")
    assert "[65535, 65536]" in assessment.message and "lower mesh.port" in assessment.message
    assert plan(desk(QWEN, mesh_port=65535), one_host) == []


def test_http_ports_beyond_the_last_port_block_the_model_with_the_numbers():
    high = replace(QWEN, serving=Serving(context_length=4096, port=65535))
    (assessment,) = assess_models(desk(high), seen(node("a", "127.0.0.1"), node("b", "127.0.0.1")))
    assert (assessment.phase, assessment.reason) == ("Blocked", "MeshUnplannable")
    assert "HTTP ports [65535, 65536]" in assessment.message and "lower serving.port" in assessment.message


def test_a_copy_replaced_in_place_restarts_the_group_that_loaded_the_old_one():
    ranks, nodes = running_group()
    ready = EndpointHealth("http://10.0.0.1:8100/v1", "ready")
    resynced = (nodes[0], node("b", "10.0.0.2", ranks=(ranks["b"],), published=NOW - 5))
    (assessment,) = assess_models(desk(QWEN), seen(*resynced, health=ready))
    assert assessment.reason == "SpecChanged"
    assert [type(a) for a in assessment.actions] == [StopRankGroup, StartRankGroup]
