"""Placement, a pure function: the parallelism each rule picks, the layer split, the capacity check
and the numbers its refusals name."""

from __future__ import annotations

from dataclasses import replace

import pytest

from genmlx.core.errors import PermanentError
from genmlx.manifest.types import ModelSpec, Serving, Source
from genmlx.master.planning.batching import Batching, batching_for
from genmlx.master.planning.placement import (
    NodeCapacity,
    Placement,
    PlacementRefused,
    describe_placement,
    kv_budget,
    node_loads,
    place,
    split_layers,
)
from genmlx.wire.agent_state import ModelShape

GB = 1_000_000_000
# Qwen3-30B-A3B in 4 bits: 48 layers, 32 attention and 4 KV heads of 128.
QWEN = ModelShape(
    weight_bytes=17_200_000_000,
    num_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    kv_dtype_bytes=2,
    max_position_embeddings=40960,
)
KV_PER_TOKEN_AND_LAYER = 2 * 4 * 128 * 2  # K and V, 4 KV heads of 128, float16
BIG = 512 * GB  # room for anything here


def spec(parallelism: str = "auto", max_batch: int = 4, context_length: int | None = 4096) -> ModelSpec:
    return ModelSpec(
        name="qwen3-30b",
        source=Source("hf", "mlx-community/Qwen3-30B-A3B-4bit"),
        nodes=("studio-a", "mini-b"),
        parallelism=parallelism,
        serving=Serving(max_batch=max_batch, context_length=context_length),
    )


def nodes(*memories: int) -> list[NodeCapacity]:
    names = ["studio-a", "mini-b", "mini-c", "mini-d"]
    return [NodeCapacity(name, memory) for name, memory in zip(names, memories, strict=False)]


def refusal(*args) -> PlacementRefused:
    with pytest.raises(PlacementRefused) as caught:
        place(*args)
    return caught.value


# ----- which parallelism -----


def test_one_node_runs_the_whole_model():
    assert place(spec(), nodes(64 * GB), QWEN, None) == Placement(
        "single", None, "single: one node (studio-a)"
    )
    explicit = place(spec("tensor"), nodes(64 * GB), replace(QWEN, num_attention_heads=7), None)
    assert explicit.parallelism == "single", "one node needs no split, whatever the manifest asks"


def test_auto_picks_tensor_when_memory_is_even_and_the_heads_divide():
    assert place(spec(), nodes(64 * GB, 64 * GB), QWEN, None) == Placement(
        "tensor", None, "tensor: memory within 10% and 32 attention and 4 KV heads divide by 2"
    )
    same_heads = replace(QWEN, num_key_value_heads=32)
    assert (
        place(spec(), nodes(BIG, BIG), same_heads, None).reason
        == "tensor: memory within 10% and 32 heads divide by 2"
    )


def test_memory_within_10_percent_is_even_enough_and_beyond_it_is_not():
    assert place(spec(), nodes(100 * GB, 90 * GB), QWEN, None).parallelism == "tensor"
    uneven = place(spec(), nodes(100 * GB, 89 * GB), QWEN, None)
    assert uneven.parallelism == "pipeline"
    assert (
        uneven.reason == "pipeline: memory differs by more than 10% (studio-a 75.0 GB, mini-b 66.8 GB usable)"
    )


def test_auto_picks_pipeline_in_proportion_to_memory_when_memory_differs():
    placement = place(spec(), nodes(128 * GB, 64 * GB, 64 * GB), QWEN, None)
    assert (placement.parallelism, placement.layer_split) == ("pipeline", (24, 12, 12))
    placement = place(spec(), nodes(64 * GB, 192 * GB), QWEN, None)
    assert placement.layer_split == (12, 36), "layer_split[r] is rank r's, in the nodes' order"


@pytest.mark.parametrize(
    ("attention", "kv", "problem"),
    [(30, 4, "30 attention heads do not divide by 4"), (32, 2, "2 KV heads do not divide by 4")],
)
def test_auto_picks_pipeline_when_the_heads_do_not_divide(attention: int, kv: int, problem: str):
    shape = replace(QWEN, num_attention_heads=attention, num_key_value_heads=kv)
    placement = place(spec(), nodes(BIG, BIG, BIG, BIG), shape, None)
    assert placement == Placement("pipeline", (12, 12, 12, 12), f"pipeline: {problem}")


def test_explicit_tensor_is_honoured_when_the_heads_divide_even_on_uneven_memory():
    placement = place(spec("tensor"), nodes(128 * GB, 64 * GB), QWEN, None)
    assert placement == Placement(
        "tensor", None, "tensor: as the manifest asks; 32 attention and 4 KV heads divide by 2"
    )


def test_explicit_tensor_is_refused_when_the_heads_do_not_divide():
    error = refusal(spec("tensor"), nodes(BIG, BIG, BIG), QWEN, None)
    assert error.reason == "HeadsDoNotDivide"
    assert str(error) == (
        "qwen3-30b cannot run tensor parallel on 3 nodes: 32 attention heads do not divide by 3; "
        "use parallelism: pipeline (or auto), or a node count that divides the heads"
    )


def test_explicit_pipeline_is_honoured_even_where_tensor_would_do():
    placement = place(spec("pipeline"), nodes(BIG, BIG), QWEN, None)
    assert placement == Placement("pipeline", (24, 24), "pipeline: as the manifest asks")


@pytest.mark.parametrize("parallelism", ["pipeline", "auto"])
def test_pipeline_is_refused_with_fewer_layers_than_nodes(parallelism: str):
    shape = replace(QWEN, num_layers=2, num_attention_heads=3, num_key_value_heads=3)
    error = refusal(spec(parallelism), nodes(BIG, BIG, GB), shape, None)  # auto: uneven memory
    assert error.reason == "TooFewLayers"
    assert str(error) == (
        "qwen3-30b has 2 layers, fewer than its 3 nodes: pipeline parallel needs at least one layer "
        "per node; place it on fewer nodes"
    )


def test_no_nodes_is_refused():
    error = refusal(spec(), [], QWEN, None)
    assert (error.reason, str(error)) == ("NoNodes", "qwen3-30b is placed on no nodes")
    assert isinstance(error, PermanentError), "retrying cannot fix it until the manifest changes"


# ----- the layer split -----


@pytest.mark.parametrize(
    ("layers", "memories", "split"),
    [
        (32, [64, 32], (21, 11)),  # 21.33 / 10.67: the larger remainder gets the extra layer
        (48, [1, 1, 1], (16, 16, 16)),
        (10, [1, 1, 1], (4, 3, 3)),  # equal remainders: the lower rank first
        (10, [3, 3, 4], (3, 3, 4)),
        (10, [1, 1, 1, 7], (1, 1, 1, 7)),
        (4, [100, 1, 1, 1], (1, 1, 1, 1)),  # every node runs at least one layer
        (5, [100, 1, 1], (3, 1, 1)),  # 4.9 / 0.05 / 0.05: each small node takes one from the large
        (2, [0, 0], (1, 1)),  # no memory reported anywhere: an even split
    ],
)
def test_layers_split_in_proportion_by_largest_remainder(layers: int, memories: list[int], split: tuple):
    assert split_layers(layers, memories) == split
    assert sum(split) == layers and min(split) >= 1


def test_the_split_is_the_same_every_time():
    memories = [137 * GB, 64 * GB, 96 * GB, 64 * GB]
    assert len({split_layers(61, memories) for _ in range(5)}) == 1
    assert split_layers(61, memories) == (23, 11, 16, 11)


# ----- the capacity check -----


def test_a_model_too_big_for_one_node_is_refused_with_the_numbers():
    # KV: 4096 tokens × 4 sequences × 48 layers × 2048 bytes = 1.6 GB; usable: 75% of 16 GB.
    error = refusal(spec(), nodes(16 * GB), QWEN, None)
    assert error.reason == "DoesNotFit"
    assert str(error) == (
        "qwen3-30b needs 17.2 GB of weights + 1.6 GB of KV cache for 4096 tokens × 4 sequences; "
        "studio-a can give 12.0 GB of its 16.0 GB (75% of memory) "
        "(lower serving.contextLength or serving.maxBatch, or place it on more nodes)"
    )


def test_tensor_parallel_gives_each_node_half_the_weights_and_half_the_kv_heads():
    # Each node: 8.6 GB of weights + 0.8 GB of KV = 9.4 GB, within 12.0 GB usable.
    assert place(spec(), nodes(16 * GB, 16 * GB), QWEN, None).parallelism == "tensor"
    error = refusal(spec(), nodes(12 * GB, 12 * GB), QWEN, None)
    assert str(error) == (
        "qwen3-30b needs 8.6 GB of weights + 0.8 GB of KV cache on studio-a (its 1/2 tensor-parallel share) "
        "for 4096 tokens × 4 sequences; studio-a can give 9.0 GB of its 12.0 GB (75% of memory); "
        "qwen3-30b needs 8.6 GB of weights + 0.8 GB of KV cache on mini-b (its 1/2 tensor-parallel share) "
        "for 4096 tokens × 4 sequences; mini-b can give 9.0 GB of its 12.0 GB (75% of memory) "
        "(lower serving.contextLength or serving.maxBatch, or place it on more nodes)"
    )


def test_pipeline_names_only_the_node_whose_layers_do_not_fit():
    # 5 layers of 2.0 GB by memory 100:4:2 is 4.7/0.2/0.1, but every node runs at least one layer: 3/1/1.
    shape = replace(QWEN, weight_bytes=10 * GB, num_layers=5)
    error = refusal(spec(context_length=1024), nodes(100 * GB, 4 * GB, 2 * GB), shape, None)
    assert str(error) == (
        "qwen3-30b needs 2.0 GB of weights + 0.0 GB of KV cache on mini-c (its 1 of 5 layers) "
        "for 1024 tokens × 4 sequences; mini-c can give 1.5 GB of its 2.0 GB (75% of memory) "
        "(lower serving.contextLength or serving.maxBatch, or place it on more nodes)"
    )
    assert place(spec(context_length=1024), nodes(100 * GB, 4 * GB, 4 * GB), shape, None).layer_split == (
        3,
        1,
        1,
    )


def test_exactly_full_fits_and_one_byte_less_does_not():
    tiny = ModelShape(2996, 1, 1, 1, 1, 2, None)  # + KV 1 token × 1 × 2 × 1 × 1 × 1 × 2 = 4 bytes: 3000
    one = spec(max_batch=1, context_length=1)
    assert place(one, nodes(4000), tiny, None).parallelism == "single"  # usable: 3000
    assert refusal(one, nodes(3999), tiny, None).reason == "DoesNotFit"  # usable: 2999


@pytest.mark.parametrize(
    ("context_argument", "context_in_manifest", "max_position", "tokens", "said"),
    [
        (1024, 2048, 40960, 1024, "1024 tokens × 4"),
        (None, 2048, 40960, 2048, "2048 tokens × 4"),
        (
            None,
            None,
            40960,
            8192,
            "8192 tokens (the model's max_position_embeddings, capped, as serving.contextLength is not "
            "set) × 4",
        ),
        (
            None,
            None,
            6000,
            6000,
            "6000 tokens (the model's max_position_embeddings, as serving.contextLength is not set) × 4",
        ),
        (None, None, None, 4096, "4096 tokens (the default, as serving.contextLength is not set) × 4"),
    ],
)
def test_the_kv_budget_takes_the_first_context_length_given(
    context_argument, context_in_manifest, max_position, tokens: int, said: str
):
    shape = replace(QWEN, max_position_embeddings=max_position)
    needed = QWEN.weight_bytes + tokens * 4 * 48 * KV_PER_TOKEN_AND_LAYER
    just_enough = nodes(needed * 4 // 3 + 4)
    one_short = nodes(needed * 4 // 3 - 4)
    assert (
        place(spec(context_length=context_in_manifest), just_enough, shape, context_argument).parallelism
        == "single"
    )
    error = refusal(spec(context_length=context_in_manifest), one_short, shape, context_argument)
    assert said in str(error)


def test_the_kv_budget_grows_with_max_batch():
    fits = nodes(32 * GB)  # 24.0 GB usable
    assert place(spec(max_batch=1, context_length=32768), fits, QWEN, None)  # 17.2 + 3.2 GB
    assert "12.9 GB of KV cache" in str(refusal(spec(max_batch=4, context_length=32768), fits, QWEN, None))


# ----- the batch and queue a model gets where the manifest does not set them -----


def unset(context_length: int = 32768, **serving) -> ModelSpec:
    base = spec(context_length=context_length)
    return replace(base, serving=replace(base.serving, max_batch=None, **serving))


def batching_of(spec_: ModelSpec, nodes_: list[NodeCapacity]) -> Batching:
    return batching_for(spec_, place(spec_, nodes_, QWEN, None), nodes_, QWEN, None)


def test_an_unset_max_batch_is_as_many_full_contexts_as_the_memory_left_after_the_weights_holds():
    # 48.0 GB usable, 17.2 GB of weights, 4.3 GB of prefix cache: 26.5 GB for 3.2 GB a sequence.
    batching = batching_of(unset(), nodes(64 * GB))
    assert (batching.max_batch, batching.max_queue) == (8, 64)
    assert batching.reason == (
        "maxBatch 8: the 26.5 GB left after the weights and the prefix cache (4.3 GB) holds 8 sequences "
        "of 32768 tokens; maxQueue 64: 8 per batch slot, at least 64"
    )
    larger = batching_of(unset(), nodes(96 * GB))  # 72.0 GB usable: 50.5 GB left
    assert (larger.max_batch, larger.max_queue) == (15, 120)


def test_a_derived_batch_is_capped_its_queue_is_at_least_64_and_one_sequence_must_fit():
    roomy = batching_of(unset(context_length=4096), nodes(BIG))
    assert (roomy.max_batch, roomy.max_queue) == (64, 512)
    assert "holds 900 sequences of 4096 tokens, capped at 64" in roomy.reason
    tight = batching_of(unset(), nodes(29 * GB))  # 4.6 GB left: one sequence, and no prefix cache beside it
    assert (tight.max_batch, tight.max_queue) == (1, 64)
    assert (
        "holds 0 sequences of 32768 tokens, so one (the prefix cache cannot fill beside it)" in tight.reason
    )
    error = refusal(unset(), nodes(26 * GB), QWEN, None)  # 2.3 GB left
    assert error.reason == "DoesNotFit" and "for 32768 tokens × 1 sequences" in error.message


def test_what_the_batch_leaves_is_each_nodes_spare_memory_and_a_gpus_reason_says_so():
    # 64 GB of RAM: 48.0 GB usable, 17.2 of weights, 4.3 of prefix cache, 8 sequences of 3.2 GB.
    ram = batching_of(unset(), nodes(64 * GB))
    sequence = 32768 * 48 * KV_PER_TOKEN_AND_LAYER
    assert ram.spare_bytes == (48 * GB - 17_200_000_000 - (4 << 30) - 8 * sequence,)
    assert "spare" not in ram.reason, "a Mac's ranks keep no dequantized copies"
    gpu = [NodeCapacity("studio-a", 80 * GB, gpu=True)]  # 90% usable: 72.0 GB
    capped = batching_of(unset(context_length=4096), gpu)
    assert capped.max_batch == 64
    (spare,) = capped.spare_bytes
    assert spare == 72 * GB - 17_200_000_000 - (4 << 30) - 64 * 4096 * 48 * KV_PER_TOKEN_AND_LAYER
    assert capped.reason.endswith(f"; {spare / GB:.1f} GB spare beside the batch")
    set_ = batching_of(spec(max_batch=4), [*gpu, NodeCapacity("mini-b", 40 * GB, gpu=True)])
    assert len(set_.spare_bytes) == 2 and set_.spare_bytes[0] > set_.spare_bytes[1]
    assert set_.reason.endswith("GB spare beside the batch on mini-b") and "serving.maxBatch" in set_.reason


def test_a_node_that_serves_other_models_too_has_no_memory_spare_for_copies():
    gpus = [NodeCapacity("studio-a", 80 * GB, gpu=True), NodeCapacity("mini-b", 80 * GB, gpu=True)]
    placed = spec(max_batch=4)
    alone = batching_of(placed, gpus)
    shared = batching_for(placed, place(placed, gpus, QWEN, None), gpus, QWEN, None, frozenset({"mini-b"}))
    assert shared.spare_bytes == (alone.spare_bytes[0], 0) and alone.spare_bytes[1] > 0
    assert shared.reason.endswith(
        "; 0.0 GB spare beside the batch on mini-b (mini-b serves other models too)"
    )
    assert (shared.max_batch, shared.max_queue) == (alone.max_batch, alone.max_queue)
    assert (shared.shared_gpu_nodes, alone.shared_gpu_nodes) == (("mini-b",), ())
    macs = nodes(64 * GB, 64 * GB)
    on_macs = batching_for(placed, place(placed, macs, QWEN, None), macs, QWEN, None, frozenset({"mini-b"}))
    assert on_macs.shared_gpu_nodes == (), "a Mac keeps no copies: sharing it changes nothing for them"


def test_the_tightest_node_of_a_group_sets_the_batch_and_is_named():
    # Tensor parallel on 64 and 70 GB: each holds half the weights and half of each sequence.
    batching = batching_of(unset(), nodes(64 * GB, 70 * GB))
    assert batching.max_batch == 21  # (48.0 - 8.6 - 4.3) GB / 1.6 GB
    assert batching.reason.startswith("maxBatch 21: the 35.1 GB left after the weights and the prefix cache")
    assert "(4.3 GB) on studio-a holds 21 sequences" in batching.reason


def test_a_set_batch_or_queue_is_kept_and_said_to_be_set():
    batching = batching_of(spec(max_batch=4), nodes(BIG, BIG))
    assert (batching.max_batch, batching.max_queue) == (4, 64)
    assert batching.reason == "maxBatch 4: serving.maxBatch; maxQueue 64: 8 per batch slot, at least 64"
    queued = batching_of(unset(max_queue=5), nodes(BIG, BIG))
    assert queued.max_queue == 5 and queued.reason.endswith("; maxQueue 5: serving.maxQueue")
    quantized = batching_of(unset(kv_bits=8), nodes(BIG, BIG))
    assert quantized.max_batch == 1 and "one sequence at a time with serving.kvBits" in quantized.reason
    overridden = batching_of(
        replace(spec(max_batch=4), serving=replace(spec().serving, kv_bits=8)), nodes(BIG)
    )
    assert overridden.max_batch == 1 and "(serving.maxBatch 4 does not apply)" in overridden.reason


# ----- one line for diff and describe -----


def test_describe_placement():
    assert describe_placement(Placement("tensor", None, "tensor: why")) == "tensor: why"
    pipelined = Placement("pipeline", (24, 12, 12), "pipeline: why")
    assert describe_placement(pipelined) == "pipeline: why; layers per rank 24/12/12"


def test_a_quantized_kv_cache_budgets_one_sequence_of_smaller_values():
    # 131,072 tokens × 8 sequences of float16 KV, 48 layers × 2,048 bytes a token each: 103 GB.
    long = replace(spec(max_batch=8, context_length=131_072), nodes=("studio-a",))
    assert refusal(long, nodes(96 * GB), QWEN, None).reason == "DoesNotFit"
    # 8 bits and a float16 scale and bias per 64 values: 1.0625 bytes a value, one sequence at a time.
    quantized = replace(long, serving=replace(long.serving, kv_bits=8))
    budget = kv_budget(quantized, QWEN, None)
    assert (budget.sequences, budget.value_bytes) == (1, 1 + 4 / 64)
    loads = node_loads(place(quantized, nodes(96 * GB), QWEN, None), nodes(96 * GB), QWEN, budget)
    assert loads[0].kv_bytes == int(131_072 * 48 * 2 * 4 * 128 * (1 + 4 / 64))
    four = replace(long, serving=replace(long.serving, kv_bits=4, kv_group_size=32))
    assert kv_budget(four, QWEN, None).value_bytes == 0.5 + 4 / 32


def test_a_quantized_kv_cache_needs_a_group_size_that_divides_the_heads():
    quantized = replace(spec(), serving=replace(spec().serving, kv_bits=4, kv_group_size=128))
    error = refusal(quantized, nodes(BIG, BIG), replace(QWEN, head_dim=96), None)
    assert error.reason == "KvGroupSizeDoesNotDivide" and "96 values" in error.message
    assert place(quantized, nodes(BIG, BIG), QWEN, None).parallelism == "tensor", "128 divides 128"
