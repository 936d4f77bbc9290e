"""plan() for rank groups across nodes: placement decides how they split the model, each rank gets
its own port (ranks sharing a host never collide), the ring hostfile joins them, and a group that
hung or does not fit is handled as the manifest promises."""

from __future__ import annotations

from dataclasses import replace

from builders import GIB, NOW, manifest, model, node, observed, stored

from genmlx.manifest.types import Mesh, ModelSpec, Serving
from genmlx.master.planning.actions import StartRankGroup, StopRankGroup
from genmlx.master.planning.observed import EndpointHealth, ObservedNode, RolloutRecord
from genmlx.master.planning.plan import LOAD_DEADLINE_S, assess_models, plan
from genmlx.wire.agent_state import GpuDevice, ModelShape, NetworkInterface, RankInfo

SHAPE = ModelShape(
    weight_bytes=8 * GIB, num_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128
)
QWEN = model("qwen", ("a", "b"), source="file", context_length=4096)
QWEN_COPY = stored("qwen", size=SHAPE.weight_bytes, shape=SHAPE, published_at=NOW - 3600)


PAIR = (node("a", stored=[QWEN_COPY]), node("b", stored=[QWEN_COPY]))  # at 10.0.0.1 and 10.0.0.2
ONE_HOST = (node("a", host="127.0.0.1", stored=[QWEN_COPY]), node("b", host="127.0.0.1", stored=[QWEN_COPY]))


def desk(*models: ModelSpec, mesh_port: int = 32323):
    return manifest(*models, nodes=("a", "b", "c"), mesh=Mesh(port=mesh_port))


def seen(*nodes: ObservedNode, health: EndpointHealth | None = None, rollouts=None):
    return observed(*nodes, endpoints={"qwen": health} if health else {}, rollouts=rollouts)


def start_of(actions) -> StartRankGroup:
    (start,) = [a for a in actions if isinstance(a, StartRankGroup)]
    return start


def test_equal_nodes_whose_heads_divide_run_tensor_parallel_joined_by_a_ring_hostfile():
    start = start_of(plan(desk(QWEN), seen(*PAIR)))
    launches = [launch for _, launch in start.launches]
    assert [(node, launch.rank) for node, launch in start.launches] == [("a", 0), ("b", 1)]
    assert {launch.parallelism for launch in launches} == {"tensor"}
    assert all(launch.world_size == 2 and launch.port == 8100 for launch in launches)
    assert launches[0].hostfile == ("10.0.0.1:32323", "10.0.0.2:32323")
    assert launches[0].layer_split is None


def test_ranks_sharing_a_host_get_their_own_http_and_ring_ports():
    start = start_of(plan(desk(QWEN, mesh_port=40000), seen(*ONE_HOST)))
    launches = [launch for _, launch in start.launches]
    assert [launch.port for launch in launches] == [8100, 8101]
    assert launches[1].hostfile == ("127.0.0.1:40000", "127.0.0.1:40001")


def test_two_groups_on_one_host_take_ports_apart_and_a_second_pass_plans_nothing():
    other = model("other", ("a", "b"), source="file", context_length=4096)
    copies = [QWEN_COPY, replace(QWEN_COPY, name="other", path="/models/other")]
    nodes = [node(n, host="127.0.0.1", stored=copies) for n in "ab"]
    starts = [a for a in plan(desk(QWEN, other), seen(*nodes)) if isinstance(a, StartRankGroup)]
    ports = {s.model: ([launch.port for _, launch in s.launches], s.launches[0][1].hostfile) for s in starts}
    assert ports == {
        "qwen": ([8100, 8101], ("127.0.0.1:32323", "127.0.0.1:32324")),
        "other": ([8102, 8103], ("127.0.0.1:32325", "127.0.0.1:32326")),
    }
    ranks = {
        n: [RankInfo(launch, 1, "running", NOW) for s in starts for m, launch in s.launches if m == n]
        for n in "ab"
    }
    running = [node(n, host="127.0.0.1", stored=copies, ranks=ranks[n]) for n in "ab"]
    assert plan(desk(QWEN, other), observed(*running, ready=["qwen", "other"])) == []


def test_unequal_memory_runs_pipeline_parallel_split_by_memory():
    start = start_of(
        plan(
            desk(QWEN),
            seen(node("a", memory_gib=96, stored=[QWEN_COPY]), node("b", memory_gib=32, stored=[QWEN_COPY])),
        )
    )
    launches = [launch for _, launch in start.launches]
    assert {launch.parallelism for launch in launches} == {"pipeline"}
    assert launches[0].layer_split == (24, 8)
    assert start.describe() == "+ start qwen, pipeline parallel 24/8 (rank 0 on a:8100, rank 1 on b:8100)"


def test_a_model_that_does_not_fit_is_blocked_with_the_numbers_and_nothing_starts():
    small = seen(node("a", memory_gib=4, stored=[QWEN_COPY]), node("b", memory_gib=4, stored=[QWEN_COPY]))
    (assessment,) = assess_models(desk(QWEN), small)
    assert (assessment.phase, assessment.reason) == ("Blocked", "DoesNotFit")
    assert "GB" in assessment.message and assessment.actions == ()
    assert plan(desk(QWEN), small) == []


def running_group() -> tuple[dict[str, RankInfo], tuple[ObservedNode, ...]]:
    """QWEN's group as the plan starts it, running for a minute on a and b: its ranks by node, and
    the nodes reporting them."""
    first = plan(desk(QWEN), seen(*PAIR))
    ranks = {
        n: RankInfo(launch, 100 + launch.rank, "running", NOW - 60) for n, launch in start_of(first).launches
    }
    return ranks, (
        node("a", stored=[QWEN_COPY], ranks=(ranks["a"],)),
        node("b", stored=[QWEN_COPY], ranks=(ranks["b"],)),
    )


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


def test_jaccl_asked_for_without_rdma_links_holds_the_model_back_saying_why():
    jaccl = replace(desk(QWEN), mesh=Mesh(backend="jaccl"))
    (assessment,) = assess_models(jaccl, seen(*PAIR))
    assert (assessment.phase, assessment.reason, assessment.actions) == ("Blocked", "RDMAUnavailable", ())
    assert assessment.message == "qwen: mesh.backend is jaccl, but no RDMA link between a-b"


def with_rdma_cable(a: ObservedNode, b: ObservedNode) -> tuple[ObservedNode, ObservedNode]:
    """``a`` and ``b`` with a Thunderbolt cable between them, an active RDMA device at each end."""

    def cabled(node: ObservedNode, port: str, peer: str) -> ObservedNode:
        cable = NetworkInterface(
            port,
            "thunderbolt",
            (),
            True,
            domain=f"{node.name}/{port}",
            peer_domain=peer,
            rdma_device=f"rdma_{port}",
        )
        facts = replace(node.state.facts, interfaces=(*node.state.facts.interfaces, cable))
        return replace(node, state=replace(node.state, facts=facts))

    return cabled(a, "en2", "b/en3"), cabled(b, "en3", "a/en2")


def test_jaccl_asked_for_over_rdma_links_launches_every_rank_on_it():
    jaccl = replace(desk(QWEN), mesh=Mesh(backend="jaccl"))
    start = start_of(plan(jaccl, seen(*with_rdma_cable(*PAIR))))
    launches = [launch for _, launch in start.launches]
    assert {launch.backend for launch in launches} == {"jaccl"}
    assert {launch.coordinator for launch in launches} == {"10.0.0.1:32323"}
    assert {launch.rdma_devices for launch in launches} == {'[[null, "rdma_en2"], ["rdma_en3", null]]'}
    auto = start_of(plan(desk(QWEN), seen(*with_rdma_cable(*PAIR))))
    assert auto == start, "auto starts jaccl where the links allow it"
    ring = start_of(plan(replace(desk(QWEN), mesh=Mesh(backend="ring")), seen(*with_rdma_cable(*PAIR))))
    assert {launch.backend for _, launch in ring.launches} == {"ring"}
    assert ring.spec_hash != start.spec_hash


def test_ring_ports_beyond_the_last_port_block_the_model_with_the_numbers():
    one_host = seen(*ONE_HOST)
    (assessment,) = assess_models(desk(QWEN, mesh_port=65535), one_host)
    assert (assessment.phase, assessment.reason) == ("Blocked", "MeshUnplannable")
    assert "[65535, 65536]" in assessment.message and "lower mesh.port" in assessment.message
    assert plan(desk(QWEN, mesh_port=65535), one_host) == []


def test_http_ports_beyond_the_last_port_block_the_model_with_the_numbers():
    high = replace(QWEN, serving=Serving(context_length=4096, port=65535))
    (assessment,) = assess_models(desk(high), seen(*ONE_HOST))
    assert (assessment.phase, assessment.reason) == ("Blocked", "MeshUnplannable")
    assert "HTTP ports [65535, 65536]" in assessment.message and "lower serving.port" in assessment.message


def test_a_copy_replaced_in_place_restarts_the_group_that_loaded_the_old_one():
    ranks, nodes = running_group()
    ready = EndpointHealth("http://10.0.0.1:8100/v1", "ready")
    resynced = (nodes[0], node("b", stored=[replace(QWEN_COPY, published_at=NOW - 5)], ranks=(ranks["b"],)))
    (assessment,) = assess_models(desk(QWEN), seen(*resynced, health=ready))
    assert assessment.reason == "SpecChanged"
    assert [type(a) for a in assessment.actions] == [StopRankGroup, StartRankGroup]


def test_ranks_are_launched_with_the_batch_and_queue_placement_derived_and_status_gets_why():
    (assessment,) = assess_models(desk(QWEN), seen(*PAIR))
    assert {
        (launch.serving.max_batch, launch.serving.max_queue) for _, launch in assessment.desired.launches
    } == {(64, 512)}
    assert assessment.batching.reason.startswith(
        "maxBatch 64: the 42.9 GB left after the weights and the prefix cache (4.3 GB) on a holds "
    )
    assert "capped at 64" in assessment.batching.reason
    smaller = replace(QWEN, serving=replace(QWEN.serving, max_batch=3))
    (assessment,) = assess_models(desk(smaller), seen(*PAIR))
    assert {launch.serving.max_batch for _, launch in assessment.desired.launches} == {3}
    assert assessment.batching.reason.startswith("maxBatch 3: serving.maxBatch")


def on_gpu(observed_node: ObservedNode, gpu_gib: int) -> ObservedNode:
    """``observed_node`` as a Linux machine whose MLX runs on CUDA, with one GPU of ``gpu_gib``."""
    state = observed_node.state
    gpus = (GpuDevice("NVIDIA H100 80GB HBM3", gpu_gib * GIB, "580.159.03"),)
    facts = replace(state.facts, os="Linux 6.8.0", arch="x86_64", gpu="CUDA", gpus=gpus)
    return replace(observed_node, state=replace(state, facts=facts))


def test_a_cuda_node_is_placed_by_its_gpus_memory_not_its_own():
    big = ModelShape(
        weight_bytes=60 * GIB, num_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128
    )
    spec = model("big", ("a",), source="file", context_length=4096)
    copy = stored("big", size=big.weight_bytes, shape=big, published_at=NOW - 3600)
    box = node("a", stored=[copy], memory_gib=32)  # 24 GiB usable: the weights alone do not fit
    (refused,) = assess_models(desk(spec), seen(box))
    assert (refused.phase, refused.reason) == ("Blocked", "DoesNotFit")
    assert "(75% of memory)" in refused.message

    (placed,) = assess_models(desk(spec), seen(on_gpu(box, 80)))  # 72 GiB of the GPU: 8 beside the cache
    assert placed.desired is not None and placed.batching.max_batch == 16  # 8 GiB / 512 MiB a sequence
    (short,) = assess_models(desk(spec), seen(on_gpu(box, 64)))  # 57.6 GiB of the GPU
    assert short.reason == "DoesNotFit" and "(90% of its GPU)" in short.message


def test_a_loaded_group_whose_rank_0_stops_answering_a_while_is_not_restarted_for_the_load_deadline():
    ranks, nodes = running_group()
    loaded = replace(ranks["a"], phase="ready")  # its agent saw it answer /health
    nodes = (node("a", stored=[QWEN_COPY], ranks=(loaded,)), nodes[1])
    silent = EndpointHealth(
        "http://10.0.0.1:8100/v1", "down", "rank 0 did not answer /health within 3 s: Timeout during request"
    )
    later = replace(seen(*nodes, health=silent), now=NOW - 60 + LOAD_DEADLINE_S + 1)
    (assessment,) = assess_models(desk(QWEN), later)
    assert (assessment.phase, assessment.reason, assessment.actions) == ("Progressing", "NotAnswering", ())
    assert "did not answer /health" in assessment.message
