"""Sibling projections multiplied as one layer (``engine.fused_projections``): the same outputs and
the same greedy tokens alone and in a batch (plain weights, MLX's quantized kernel, copies of
dequantized weights, compiled MLPs) and in several of mlx-lm's model families, a tensor group's
shards stacked as shards, one product per group where there were two or three, the parameters
counted once, nothing kept after a block, and groups that cannot be stacked left as they are."""

from __future__ import annotations

import importlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.nn.layers.distributed import AllToShardedLinear, QuantizedAllToShardedLinear, shard_linear
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from test_quantized_batches import TEXTS, greedy, load
from test_quantized_batches import quantized_dir as quantized_dir  # a fixture, used by name

from genmlx.dispatcher.engine.compiled_decode import compile_decode_mlps
from genmlx.dispatcher.engine.fused_projections import Part, fuse_projections
from genmlx.dispatcher.engine.quantized_batches import copied_bytes, dequantize_where_it_pays


def parameter_sizes(model: nn.Module) -> tuple[int, int]:
    """How many parameter arrays ``model`` has, and their elements in all."""
    arrays = [a for _, a in tree_flatten(model.parameters())]
    return len(arrays), sum(a.size for a in arrays)


def test_a_blocks_projections_give_the_same_outputs_stacked(demo_model_dir: Path) -> None:
    model, _ = load(demo_model_dir)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    rows = {
        shape: mx.random.normal(shape, key=mx.random.key(sum(shape)))
        for shape in ((1, 1, 64), (8, 1, 64), (2, 7, 64))
    }
    names = ("q_proj", "k_proj", "v_proj")
    expected = {
        shape: [attention[n](x) for n in names] + [mlp.gate_proj(x), mlp.up_proj(x)]
        for shape, x in rows.items()
    }
    _, elements = parameter_sizes(model)
    assert fuse_projections(model) == 4  # two groups in each of the demo model's two blocks
    assert all(isinstance(attention[n], Part) for n in names)
    assert type(attention.fused_q_k_v_proj) is nn.Linear and type(mlp.fused_gate_up_proj) is nn.Linear
    for shape, x in rows.items():
        got = [attention[n](x) for n in names] + [mlp.gate_proj(x), mlp.up_proj(x)]
        for a, b in zip(got, expected[shape], strict=True):
            assert a.shape == b.shape
            assert mx.array_equal(a, b).item()
    assert parameter_sizes(model)[1] == elements, "each weight once, in its stacked layer"
    assert fuse_projections(model) == 0, "stacked once"


def test_one_product_for_each_group_and_nothing_kept_after_the_call(
    demo_model_dir: Path, monkeypatch
) -> None:
    model, _ = load(demo_model_dir)
    fuse_projections(model)
    attention = model.model.layers[0].self_attn
    calls: list[tuple[int, ...]] = []
    stacked_call = type(attention.fused_q_k_v_proj).__call__

    def counted(layer, x):
        calls.append(tuple(layer.weight.shape))
        return stacked_call(layer, x)

    monkeypatch.setattr(nn.Linear, "__call__", counted)
    x = mx.ones((3, 1, 64))
    q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
    stacked_rows = attention.fused_q_k_v_proj.weight.shape[0]
    assert calls == [(stacked_rows, 64)], "one product for the three"
    assert q.shape[-1] + k.shape[-1] + v.shape[-1] == stacked_rows
    assert attention.q_proj._shared.product is None, "let go once every member took its columns"
    attention.q_proj(mx.zeros((3, 1, 64)))
    attention.q_proj(x)
    assert len(calls) == 3, "other rows: the product again"


def test_greedy_tokens_are_the_same_stacked_alone_and_in_a_batch(demo_model_dir: Path) -> None:
    model, tokenizer = load(demo_model_dir)
    plain = greedy(model, tokenizer, TEXTS)
    fuse_projections(model)
    compile_decode_mlps(model)
    alone = {uid: greedy(model, tokenizer, (text,))[0] for uid, text in enumerate(TEXTS)}
    assert greedy(model, tokenizer, TEXTS) == plain == alone


@pytest.mark.parametrize("copies", [False, True], ids=["quantized kernel", "dequantized copies"])
def test_a_quantized_models_tokens_are_the_same_stacked(quantized_dir: Path, copies: bool) -> None:
    model, tokenizer = load(quantized_dir)
    plain = greedy(model, tokenizer, TEXTS)
    assert fuse_projections(model) == 4
    stacked = model.model.layers[0].self_attn.fused_q_k_v_proj
    assert type(stacked) is nn.QuantizedLinear and stacked.bits == 4 and stacked.group_size == 32
    dequantize_where_it_pays(model, 2 if copies else 0, spare=copied_bytes(model))
    assert (model.model.layers[0].mlp.fused_gate_up_proj.dense is not None) is copies
    compile_decode_mlps(model)
    assert greedy(model, tokenizer, TEXTS) == plain


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "quantized"])
def test_a_tensor_groups_shards_stack_as_shards(quantized: bool) -> None:
    group = mx.distributed.init()  # a group of one: the shards as a tensor group's ranks hold them
    members = [nn.Linear(64, n, bias=False) for n in (64, 16, 16)]
    if quantized:
        members = [nn.QuantizedLinear.from_linear(m, group_size=32, bits=4) for m in members]
    attention = _Attention(*(shard_linear(m, "all-to-sharded", group=group) for m in members))
    kind = QuantizedAllToShardedLinear if quantized else AllToShardedLinear
    x = mx.random.normal((4, 1, 64), key=mx.random.key(3))
    expected = [attention[name](x) for name in ("q_proj", "k_proj", "v_proj")]
    assert fuse_projections(attention) == 1
    assert type(attention.fused_q_k_v_proj) is kind and attention.fused_q_k_v_proj.group is group
    for name, want in zip(("q_proj", "k_proj", "v_proj"), expected, strict=True):
        assert mx.array_equal(attention[name](x), want).item()


# Tiny random models of mlx-lm's families whose blocks name their projections as stacked here
# (and phi3, whose checkpoints stack them already), with the groups each block stacks.
FAMILIES = {
    "llama": ({}, 2),
    "qwen2": ({}, 2),
    "qwen3": ({"max_position_embeddings": 512, "tie_word_embeddings": True}, 2),
    "gemma2": ({"query_pre_attn_scalar": 16, "sliding_window": 64, "cache_implementation": "hybrid"}, 2),
    "olmo2": ({}, 2),
    "starcoder2": ({"norm_epsilon": 1e-5}, 1),  # a plain MLP: only the attention's three
    "phi3": ({}, 0),
}
SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}


def greedy_logits(model: nn.Module, steps: int = 12) -> tuple[list[int], mx.array]:
    """``steps`` greedy tokens after a short prompt, one at a time on a KV cache; the last logits."""
    cache, x, tokens = make_prompt_cache(model), mx.array([[1, 2, 3, 4, 5, 6, 7]]), []
    for _ in range(steps):
        logits = model(x, cache=cache)[:, -1, :]
        x = mx.argmax(logits, axis=-1)[None]
        tokens.append(x.item())
    return tokens, logits


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "4-bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_lm_families_decode_the_same_stacked(family: str, quantized: bool) -> None:
    extra, groups = FAMILIES[family]
    module = importlib.import_module(f"mlx_lm.models.{family}")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict({**SMALL, "model_type": family, **extra}))
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    tokens, logits = greedy_logits(model)
    assert fuse_projections(model) == groups * SMALL["num_hidden_layers"]
    stacked_tokens, stacked_logits = greedy_logits(model)
    assert stacked_tokens == tokens
    assert mx.array_equal(stacked_logits, logits).item()


class _Attention(nn.Module):
    """The query, key and value projections of a block, as many as given."""

    def __init__(self, *members: nn.Module) -> None:
        super().__init__()
        for name, member in zip(("q_proj", "k_proj", "v_proj"), members, strict=False):
            self[name] = member


def _quantized(outputs: int, bits: int = 4) -> nn.QuantizedLinear:
    return nn.QuantizedLinear(64, outputs, bias=False, group_size=32, bits=bits)


@pytest.mark.parametrize(
    "members",
    [
        lambda: (nn.Linear(64, 64), nn.Linear(64, 16), nn.Linear(64, 16, bias=False)),
        lambda: (nn.Linear(64, 64), nn.Linear(64, 16), _quantized(16)),
        lambda: (_quantized(64), _quantized(16), _quantized(16, bits=8)),
        lambda: (nn.Linear(64, 64), nn.Linear(32, 16), nn.Linear(64, 16)),
        lambda: (nn.Linear(64, 64), nn.Linear(64, 16)),
    ],
    ids=["a bias on some", "kinds differ", "bits differ", "inputs differ", "a member missing"],
)
def test_groups_that_cannot_be_stacked_are_left_alone(members) -> None:
    attention = _Attention(*members())
    before = dict(attention)
    assert fuse_projections(attention) == 0
    assert attention.keys() == before.keys()
    assert all(attention[name] is member for name, member in before.items()), "the same members"
