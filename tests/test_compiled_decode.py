"""Each block's MLP runs a compiled graph in decode steps (``engine.compiled_decode``): the same
outputs as its plain call, one trace per batch size and none for prompt chunks, the same greedy
tokens alone and in a batch (plain, through the quantized kernel, through copies of dequantized
weights), tensor groups' MLPs and models without blocks left alone, and an MLP that cannot be
traced falling back to its plain call."""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.nn.layers.distributed import ShardedToAllLinear
from test_quantized_batches import TEXTS, greedy, load
from test_quantized_batches import quantized_dir as quantized_dir  # a fixture, used by name

from genmlx.dispatcher.engine.compiled_decode import compile_decode_mlps
from genmlx.dispatcher.engine.quantized_batches import copied_bytes, dequantize_where_it_pays


def traces_of(mlp: nn.Module, monkeypatch) -> list[tuple[int, ...]]:
    """The input shapes of ``mlp``'s plain calls and of its traces, as they come (a compiled call
    replayed adds none)."""
    traced: list[tuple[int, ...]] = []
    plain = mlp._plain

    def tracing(x: mx.array, *args, **kwargs) -> mx.array:
        traced.append(tuple(x.shape))
        return plain(x, *args, **kwargs)

    monkeypatch.setattr(mlp, "_plain", tracing)
    monkeypatch.setattr(mlp, "_compiled", mx.compile(tracing))
    return traced


def test_decode_rows_go_through_one_trace_per_batch_size_with_the_plain_outputs(
    demo_model_dir: Path, monkeypatch
) -> None:
    model, _ = load(demo_model_dir)
    mlp = model.model.layers[0].mlp
    inputs = {b: mx.random.normal((b, 1, 64), key=mx.random.key(b)) for b in (1, 8, 64)}
    expected = {b: mlp(x) for b, x in inputs.items()}
    chunk = mx.random.normal((2, 7, 64), key=mx.random.key(7))  # a prompt chunk's rows
    chunk_expected = mlp(chunk)
    assert compile_decode_mlps(model) == 2  # the demo model's two blocks
    traced = traces_of(mlp, monkeypatch)
    for _ in range(3):
        for b, x in inputs.items():
            assert mx.array_equal(mlp(x), expected[b]).item()
    assert traced == [(1, 1, 64), (8, 1, 64), (64, 1, 64)], "traced once per batch size, then replayed"
    for _ in range(2):
        assert mx.array_equal(mlp(chunk), chunk_expected).item()
    assert traced[3:] == [(2, 7, 64)] * 2, "a prompt chunk: the plain call each time, never a trace"


def test_greedy_tokens_are_the_same_compiled_or_not_alone_and_in_a_batch(demo_model_dir: Path) -> None:
    model, tokenizer = load(demo_model_dir)
    plain = greedy(model, tokenizer, TEXTS)
    compile_decode_mlps(model)
    alone = {uid: greedy(model, tokenizer, (text,))[0] for uid, text in enumerate(TEXTS)}
    assert greedy(model, tokenizer, TEXTS) == plain == alone


@pytest.mark.parametrize("copies", [False, True], ids=["quantized kernel", "dequantized copies"])
def test_a_quantized_models_tokens_are_the_same_compiled(quantized_dir: Path, copies: bool) -> None:
    model, tokenizer = load(quantized_dir)
    dequantize_where_it_pays(model, 2 if copies else 0, spare=copied_bytes(model))
    assert (model.model.layers[0].mlp.down_proj.dense is not None) is copies
    plain = greedy(model, tokenizer, TEXTS)
    assert compile_decode_mlps(model) == 2
    assert greedy(model, tokenizer, TEXTS) == plain


class _Blocks(nn.Module):
    def __init__(self, mlps: list[nn.Module]) -> None:
        super().__init__()
        self.layers = [_Block(mlp) for mlp in mlps]


class _Block(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp


class _Scaled(nn.Module):
    """An MLP whose call takes more than its rows."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def __call__(self, x: mx.array, scale: float = 1.0) -> mx.array:
        return self.proj(x) * scale


class _Reads(nn.Module):
    """An MLP whose call reads a value on the host: it cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x) * float(x.sum().item() > 0)


def test_a_tensor_groups_mlp_and_models_without_blocks_are_left_alone() -> None:
    group = mx.distributed.init()  # a group of one: the sharded layer as a tensor group has it
    sharded = nn.Sequential(nn.Linear(8, 8), ShardedToAllLinear(8, 8, group=group))
    model = _Blocks([sharded, nn.Linear(8, 8)])
    assert compile_decode_mlps(model) == 1
    assert type(model.layers[0].mlp) is nn.Sequential and type(model.layers[1].mlp) is not nn.Linear
    assert compile_decode_mlps(nn.Linear(8, 8)) == 0
    assert compile_decode_mlps(model) == 0, "compiled once"


def test_a_call_with_more_than_rows_keeps_the_plain_call(monkeypatch) -> None:
    model = _Blocks([_Scaled()])
    x = mx.ones((4, 1, 8))
    expected = model.layers[0].mlp(x, 2.0), model.layers[0].mlp(x, scale=3.0)
    compile_decode_mlps(model)
    traced = traces_of(model.layers[0].mlp, monkeypatch)
    assert mx.array_equal(model.layers[0].mlp(x, 2.0), expected[0]).item()
    assert mx.array_equal(model.layers[0].mlp(x, scale=3.0), expected[1]).item()
    assert traced == [(4, 1, 8)] * 2, "each the plain call"


def test_an_mlp_that_cannot_be_traced_keeps_its_plain_call_and_says_so(caplog) -> None:
    model = _Blocks([_Reads()])
    x = mx.ones((4, 1, 8))
    expected = model.layers[0].mlp(x)
    assert compile_decode_mlps(model) == 1
    with caplog.at_level(logging.ERROR, logger="genmlx.dispatcher.engine.compiled_decode"):
        assert mx.array_equal(model.layers[0].mlp(x), expected).item()
        assert mx.array_equal(model.layers[0].mlp(x), expected).item()
    assert caplog.text.count("cannot run compiled; it keeps its plain call") == 1
