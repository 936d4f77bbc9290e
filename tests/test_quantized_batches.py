"""Quantized layers that multiply many rows through their dequantized weight (the dispatcher's
``--dequantize-rows``; measured at load on a CUDA GPU): on the demo model quantized to 4 bits, the
same outputs and the same greedy tokens as MLX's quantized kernel, alone and in a batch, in one
rank and in a pipeline of two; MLX's quantized kernel outside the span; parameters untouched; the
span measured where the dequantized product was faster, and only there; copies of the weights
dequantized once kept only within the spare memory given, and only where they were faster."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import openai
import pytest
from mlx.utils import tree_flatten
from test_ranks_lockstep import client_of
from test_ranks_lockstep import start_ranks as start_ranks  # a fixture, used by name

from genmlx.demo.pipeline_model import write_demo_pipeline_model
from genmlx.dispatcher.engine import measurements
from genmlx.dispatcher.engine.decoding import BatchDecoder, DecoderSettings
from genmlx.dispatcher.engine.events import GenerationRequest, Sampling
from genmlx.dispatcher.engine.measurements import measure_products
from genmlx.dispatcher.engine.quantized_batches import (
    RowSpan,
    Timing,
    batch_quantized_layers,
    copied_bytes,
    dequantize_where_it_pays,
    faster_span,
    repeated_shapes,
)
from genmlx.dispatcher.engine.quantized_products import Shape, layer_shape

TEXTS = ("Rivers start in the hills", "The sea is salty because", "Deltas form", "Copper is", "At night")


def quantized(source: Path, target: Path) -> Path:
    from mlx_lm import convert

    convert(hf_path=str(source), mlx_path=str(target), quantize=True, q_bits=4, q_group_size=32)
    return target


@pytest.fixture(scope="module")
def quantized_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantized(demo_model_dir, tmp_path_factory.mktemp("models") / "demo-q4")


def load(path: Path):
    from mlx_lm import load as mlx_lm_load

    return mlx_lm_load(str(path))


def q4(outputs: int, inputs: int) -> Shape:
    """The shape of one of the demo model's layers as ``quantized`` writes them."""
    return Shape(outputs, inputs, 4, 32, "affine")


def every(model, span: RowSpan | None) -> dict:
    """``span`` for every shape of quantized layer the model repeats."""
    return dict.fromkeys(repeated_shapes(model), span)


def greedy(model, tokenizer, texts: tuple[str, ...]) -> dict[int, list[int]]:
    """Each text's 24 greedy tokens, all decoded in one batch."""
    decoder = BatchDecoder(model, set(tokenizer.eos_token_ids), DecoderSettings(cache_entries=0))
    for uid, text in enumerate(texts):
        decoder.join(
            uid, GenerationRequest(f"r{uid}", tuple(tokenizer.encode(text)), 24, Sampling(temperature=0))
        )
    tokens: dict[int, list[int]] = {uid: [] for uid in range(len(texts))}
    while decoder.active:
        for sampled in decoder.step():
            tokens[sampled.uid].append(sampled.token)
    return tokens


def test_many_rows_go_through_the_dequantized_weight_with_the_kernels_outputs(
    quantized_dir: Path, monkeypatch
) -> None:
    model, tokenizer = load(quantized_dir)
    parameters = dict(tree_flatten(model.parameters()))
    rows = mx.array([tokenizer.encode("The river ran past the old mill")[:6]] * 3)  # 18 rows
    expected = model(rows)
    assert (
        batch_quantized_layers(model, every(model, RowSpan(4, 64))) == 16
    )  # the embedding, 7 per layer of 2, the output layer
    assert {k: id(v) for k, v in tree_flatten(model.parameters())} == {
        k: id(v) for k, v in parameters.items()
    }
    dequantized = []
    real_dequantize = mx.dequantize

    def dequantize(*args, **kwargs):  # the embedding's lookup dequantizes its rows too, not in float32
        dequantized.extend([1] if kwargs.get("dtype") is mx.float32 else [])
        return real_dequantize(*args, **kwargs)

    monkeypatch.setattr(mx, "dequantize", dequantize)
    assert mx.allclose(model(rows), expected, atol=1e-4).item()
    # 7 per layer of 2: the embedding looks rows up, and the output layer, one of its kind and as
    # wide as the vocabulary, keeps the kernel.
    assert len(dequantized) == 14
    assert (model.lm_head.span, model.model.layers[0].mlp.down_proj.span) == (None, RowSpan(4, 64))
    for outside in (rows[:1, :3], mx.concatenate([rows] * 4)):  # 3 rows, 72 rows: MLX's kernel
        dequantized.clear()
        model(outside)
        assert dequantized == []


@pytest.fixture
def kernel_inputs(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the activations MLX's quantized kernel is called with, as they come."""
    shapes: list[tuple[int, ...]] = []
    real_product = mx.quantized_matmul

    def quantized_matmul(x, *args, **kwargs):
        shapes.append(x.shape)
        return real_product(x, *args, **kwargs)

    monkeypatch.setattr(mx, "quantized_matmul", quantized_matmul)
    return shapes


def test_a_batchs_rows_reach_the_kernel_as_one_matrix_with_the_same_outputs(
    quantized_dir: Path, kernel_inputs: list
) -> None:
    model, tokenizer = load(quantized_dir)
    tokens = mx.array([[t] for t in tokenizer.encode("Rows of one token each, as a batch decodes")[:5]])
    expected = model(tokens)  # (5, 1): five sequences' next token
    run = model(tokens.T)  # (1, 5): one sequence of five tokens
    assert batch_quantized_layers(model) == 16
    kernel_inputs.clear()
    assert mx.array_equal(model(tokens), expected).item()
    assert kernel_inputs and all(len(shape) == 2 and shape[0] == 5 for shape in kernel_inputs), kernel_inputs
    # One sequence's tokens are one run of rows already: they reach the kernel as they are.
    kernel_inputs.clear()
    assert mx.array_equal(model(tokens.T), run).item()
    assert kernel_inputs and all(shape[:2] == (1, 5) for shape in kernel_inputs), kernel_inputs


def test_a_tensor_groups_quantized_shards_join_their_rows_too(kernel_inputs: list) -> None:
    from mlx.nn.layers.distributed import shard_linear

    group = mx.distributed.init()  # one process: a group of one, shards the whole layer
    layer = nn.QuantizedLinear(128, 256, bias=False, group_size=64, bits=4)
    shards = nn.Sequential(
        shard_linear(layer, "all-to-sharded", group=group),
        shard_linear(
            nn.QuantizedLinear(256, 128, bias=False, group_size=64, bits=4), "sharded-to-all", group=group
        ),
    )
    rows = mx.random.normal((6, 1, 128), key=mx.random.key(3)).astype(mx.bfloat16)
    expected = shards(rows)
    assert batch_quantized_layers(shards) == 2
    kernel_inputs.clear()
    joined = shards(rows)
    assert joined.shape == (6, 1, 128) and mx.array_equal(joined, expected).item()
    assert kernel_inputs == [(6, 128), (6, 256)]


def test_a_models_own_kind_of_quantized_layer_is_left_to_call_itself() -> None:
    class Split(nn.QuantizedLinear):  # as mlx-lm's fused projections: its call splits the product
        def __call__(self, x):
            return super().__call__(x).split([64], axis=-1)

    model = nn.Sequential(Split(64, 128, bias=False), nn.QuantizedLinear(64, 64, bias=False))
    assert batch_quantized_layers(model) == 1
    assert type(model.layers[0]) is Split and model.layers[1].span is None
    assert batch_quantized_layers(model) == 1, "a second time: the same layer, as it is"


def test_greedy_tokens_are_the_same_alone_in_a_batch_dequantized_and_not(quantized_dir: Path) -> None:
    model, tokenizer = load(quantized_dir)
    by_the_kernel = greedy(model, tokenizer, TEXTS)
    batch_quantized_layers(
        model, every(model, RowSpan(2))
    )  # a lone sequence decodes one row: the kernel; the batch: not
    batched = greedy(model, tokenizer, TEXTS)
    alone = {uid: greedy(model, tokenizer, (text,))[0] for uid, text in enumerate(TEXTS)}
    assert batched == by_the_kernel == alone


def test_the_dispatcher_measures_where_it_pays_on_cuda_and_dequantizes_nowhere_else(monkeypatch) -> None:
    from genmlx.dispatcher.settings import decoder_settings, parse_settings

    def rows(*flags: str) -> int | None:
        argv = ["--model", "/models/m", "--name", "m", "--port", "8100", *flags]
        return decoder_settings(parse_settings(argv)).dequantize_rows

    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert (rows(), rows("--dequantize-rows", "16")) == (0, 16)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    assert rows() == 0, "Apple silicon's quantized kernels batch well"
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    assert (rows(), rows("--dequantize-rows", "0")) == (None, 0), "None: measured when the model loads"
    argv = ["--model", "/models/m", "--name", "m", "--port", "8100"]
    assert decoder_settings(parse_settings(argv)).spare_bytes is None, "no copies without spare memory"
    assert decoder_settings(parse_settings([*argv, "--spare-gb", "1.5"])).spare_bytes == 3 << 29


def timings(*rows_kernel_dequantized: tuple[float, ...]) -> list[Timing]:
    """Timings of rows, kernel, dequantized and, where given, copied (else as slow as the kernel)."""
    return [Timing(*row) if len(row) == 4 else Timing(*row, row[1]) for row in rows_kernel_dequantized]


def test_the_span_is_the_longest_run_of_row_counts_where_the_dequantized_weight_was_clearly_faster() -> None:
    decode_only = timings((1, 1, 3), (8, 6, 3), (64, 28, 5), (512, 40, 45), (2048, 90, 150))
    assert faster_span(decode_only) == RowSpan(8, 512)
    assert faster_span(timings((1, 1, 3), (8, 6, 3), (64, 28, 5))) == RowSpan(8)
    assert faster_span(timings((1, 1, 0.95), (8, 6, 5.9))) is None, "within 10%: not clearly faster"
    assert faster_span(timings((64, 28, 5), (1, 1, 3))) == RowSpan(64), "in order of rows"
    blip = timings((1, 1, 0.5), (2, 1, 2), (8, 6, 3), (64, 28, 5), (512, 40, 45))
    assert faster_span(blip) == RowSpan(8, 512), "a lone faster row count does not outweigh a run"
    assert faster_span(timings((1, 1, 0.5), (2, 1, 2), (8, 6, 3))) == RowSpan(1, 2), "equal runs: the first"
    assert faster_span([]) is None
    assert (
        8 in RowSpan(8, 512) and 511 in RowSpan(8, 512) and 512 not in RowSpan(8, 512) and 7 not in RowSpan(8)
    )


def test_measuring_times_each_path_over_the_layers_given_one_after_another(quantized_dir: Path) -> None:
    model, _ = load(quantized_dir)
    downs = [block.mlp.down_proj for block in model.model.layers]
    seen = []

    def timed(path: str, rows: int, run) -> float:
        seen.append((path, rows, [out.shape for out in run()]))
        return {
            "link": 0.25,
            "quantized": 1.25,
            "dequantized": 0.75 if rows >= 4 else 2.25,
            "copied": 0.45 if rows >= 16 else 1.25,
        }[path]

    measured = measure_products(downs, rows=(1, 4, 16), timed=timed)
    assert [(t.quantized, t.dequantized, t.copied) for t in measured] == [
        (1.0, 2.0, 1.0),
        (1.0, 0.5, 1.0),
        (1.0, 0.5, pytest.approx(0.2)),
    ], "what a chain's link takes is taken off each product"
    assert (faster_span(measured), faster_span(measured, "copied")) == (RowSpan(4), RowSpan(16))
    assert [t.rows for t in measured] == [1, 4, 16]
    # 128 inputs to 64 outputs, through each of the two blocks' layers: together far below
    # COLD_BYTES, so every one of them is read in each run; the links alone pass the rows on.
    assert seen == [
        (path, n, [(n, 128 if path == "link" else 64)] * 2)
        for n in (1, 4, 16)
        for path in ("link", "quantized", "dequantized", "copied")
    ]


def test_each_product_of_a_timed_run_waits_for_the_one_before_it(quantized_dir: Path) -> None:
    """MLX's CUDA backend runs kernels that share no array side by side: a run of independent
    products would time the GPU filled by several at once, not a step's products one by one."""
    model, _ = load(quantized_dir)
    ups = [block.mlp.up_proj for block in model.model.layers]  # 128 x 64
    given = []

    def product(layer, x):
        given.append(x)
        y = layer(x)
        return y * float("nan") if len(given) == 1 else y  # the first product's output poisoned

    x = mx.ones((4, 64))
    out = measurements._chained(x, [partial(product, layer) for layer in ups])
    assert len(out) == 2 and [g.shape for g in given] == [(4, 64), (4, 64)]
    assert given[1] is not x and mx.all(mx.isnan(given[1])).item(), "the second read the first's output"
    assert not mx.any(mx.isnan(given[0])).item()
    clean = measurements._chained(x, [ups[0], ups[1]])
    assert mx.array_equal(clean[1], ups[1](x)).item(), "the rows themselves pass on as they are"


def test_a_run_reads_as_many_layers_as_pass_the_cache_and_no_more(quantized_dir: Path, monkeypatch) -> None:
    model, _ = load(quantized_dir)
    ups = [block.mlp.up_proj for block in model.model.layers] * 3  # six of 64 x 128, 4 bits
    one = sum(ups[0][name].nbytes for name in ("weight", "scales", "biases"))
    monkeypatch.setattr(measurements, "COLD_BYTES", 2 * one + 1)  # passed by the third layer
    runs = []
    measure_products(ups, rows=(2,), timed=lambda path, rows, run: runs.append((path, len(run()))) or 1.0)
    copies = -(-(2 * one + 1) // (128 * 64 * 4))  # float32 copies, four bytes a weight
    assert runs == [("link", 3), ("quantized", 3), ("dequantized", 3), ("copied", copies)]


def test_each_shape_the_blocks_repeat_is_measured_once_and_gets_its_own_path(
    quantized_dir: Path, monkeypatch
) -> None:
    model, _ = load(quantized_dir)
    down, up = q4(64, 128), q4(128, 64)  # the MLP's down projection; its gate and up projections
    measured = []

    def measure(layers) -> list[Timing]:
        shape = layer_shape(layers[0])
        measured.append((shape, len(layers)))
        if shape == down:  # copies faster at every row count, per call never
            return timings((1, 1, 3, 0.5), (8, 6, 7, 2), (64, 28, 30, 5))
        if shape == up:  # copies faster from 8 rows, by less
            return timings((1, 1, 3, 1.5), (8, 6, 7, 5), (64, 28, 30, 25))
        return timings((1, 1, 3, 1.5), (8, 6, 3, 7), (64, 28, 5, 29))  # per call from 8 rows, copies never

    monkeypatch.setattr(measurements, "measure_products", measure)
    spans = dequantize_where_it_pays(model, None, spare=copied_bytes(model, [down, up]))
    # The attention's q and o (64 x 64), k and v (32 x 64), the MLP's gate and up, its down.
    assert sorted(measured) == [(q4(32, 64), 4), (q4(64, 64), 4), (down, 2), (up, 4)]
    assert sorted(repeated_shapes(model)) == [shape for shape, _ in sorted(measured)]
    assert spans == {q4(32, 64): RowSpan(8), q4(64, 64): RowSpan(8), down: RowSpan(1), up: RowSpan(8)}
    block = model.model.layers[1]
    assert block.mlp.down_proj.dense is not None and block.mlp.up_proj.dense is not None
    assert block.self_attn.q_proj.dense is None, "copies only where faster: per call here"
    dequantize_where_it_pays(model, None, spare=copied_bytes(model, [down, up]) - 1)
    # Copies of the down projections saved more per byte (4 units a product at the median row
    # count, against 2 for as many weights): they are kept first, the gate and up ones find no room.
    assert block.mlp.down_proj.dense is not None and block.mlp.up_proj.dense is None
    assert block.mlp.up_proj.span is None, "not held, and per call never faster: the kernel"
    dequantize_where_it_pays(model, None, spare=0)
    assert block.mlp.down_proj.dense is None and block.mlp.down_proj.span is None, "not held: the kernel"
    assert block.self_attn.q_proj.span == RowSpan(8)


def test_measured_on_this_machine_every_path_is_timed_and_the_spans_follow_the_timings(
    quantized_dir: Path,
) -> None:
    model, _ = load(quantized_dir)
    measured = measure_products([block.mlp.up_proj for block in model.model.layers], rows=(1, 8, 64))
    assert [t.rows for t in measured] == [1, 8, 64]
    assert all(t.quantized > 0 and t.dequantized > 0 and t.copied > 0 for t in measured)
    for path in ("dequantized", "copied"):
        span = faster_span(measured, path)
        faster = [t.rows for t in measured if getattr(t, path) <= measurements.FASTER * t.quantized]
        assert (span is None) == (not faster), (path, measured)
        assert span is None or span.low in faster, (path, measured)


@pytest.mark.e2e
def test_a_pipeline_dequantizing_writes_what_one_rank_with_the_kernel_writes(
    start_ranks, tmp_path_factory: pytest.TempPathFactory, token: str
) -> None:
    models = tmp_path_factory.mktemp("models")
    model_dir = quantized(write_demo_pipeline_model(models / "demo-qwen2"), models / "demo-qwen2-q4")
    (one,) = start_ranks(model_dir, 1, "--dequantize-rows", "0")
    expected = answers(client_of(one, token))
    one.proc.stop()
    group = start_ranks(model_dir, 2, "--parallelism", "pipeline", "--dequantize-rows", "1")
    assert answers(client_of(group[0], token)) == expected
    # Rank 0 runs two of the three blocks: the layers it repeats dequantize (rank 1's one block
    # repeats none once its projections are stacked, so it keeps the kernel).
    assert "multiply 1 rows or more through their weights dequantized per call" in group[0].proc.output()


def answers(client: openai.OpenAI) -> list[str]:
    return [
        client.completions.create(model="demo", prompt=text, temperature=0, max_tokens=16).choices[0].text
        for text in TEXTS
    ]


def test_a_failed_measurement_leaves_the_kernel_and_says_so(quantized_dir: Path, monkeypatch, caplog) -> None:
    from genmlx.dispatcher.engine import quantized_batches

    model, _ = load(quantized_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(measurements, "measure_products", broken)
    assert set(quantized_batches.dequantize_where_it_pays(model, None).values()) == {None}
    assert "measuring a quantized layer of 64 x 128 in 4 bits failed" in caplog.text
    layer = model.model.layers[0].mlp.down_proj
    assert layer.span is None, "rows as one matrix, through the kernel"
    assert set(quantized_batches.dequantize_where_it_pays(model, 8).values()) == {RowSpan(8)}
    assert layer.span == RowSpan(8)


def test_a_measurement_is_kept_for_the_next_load_on_this_device(
    quantized_dir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    from genmlx.dispatcher.engine import quantized_batches

    measured = []
    real_measure = measurements.measure_products
    monkeypatch.setattr(
        measurements, "measure_products", lambda layers: measured.append(1) or real_measure(layers)
    )
    kept = tmp_path / "home" / quantized_batches.MEASUREMENTS_FILE
    caplog.set_level("INFO")
    monkeypatch.setattr(measurements, "TIMED_RUNS", 1)  # what is kept matters here, not the times

    first = quantized_batches.dequantize_where_it_pays(load(quantized_dir)[0], None, kept)
    assert measured == [1] * 4 and "measured in" in caplog.text, "four shapes repeated: four layers"
    keys = json.loads(kept.read_text())
    assert len(keys) == 4
    key, timings = next((k, v) for k, v in keys.items() if ": 64 x 128," in k)
    assert mx.device_info()["device_name"] in key and f"MLX {mx.__version__}" in key, key
    assert key.endswith("; each run a chain over 2 layers"), "timings taken another way are measured again"
    assert [rows for rows, *_ in timings] == list(measurements.MEASURED_ROWS)
    assert all(len(entry) == 4 for entry in timings), "rows, the kernel, per call, through a copy"

    caplog.clear()
    again = quantized_batches.dequantize_where_it_pays(load(quantized_dir)[0], None, kept)
    assert measured == [1] * 4, "the next load takes what the first measured"
    assert again == first and "as an earlier load measured them" in caplog.text

    kept.write_text("{half a file")  # a damaged file is measured over and written whole
    quantized_batches.dequantize_where_it_pays(load(quantized_dir)[0], None, kept)
    assert len(measured) == 8 and sorted(json.loads(kept.read_text())) == sorted(keys)
    kept.write_text(json.dumps({**keys, key: [[1, 0.5]]}))  # and so is a damaged entry, alone
    quantized_batches.dequantize_where_it_pays(load(quantized_dir)[0], None, kept)
    assert len(measured) == 9 and len(json.loads(kept.read_text())[key]) == len(timings)
    kept.write_text(json.dumps({**keys, key: [[1, 0.5, 0.25]]}))  # and one kept before copies were timed
    quantized_batches.dequantize_where_it_pays(load(quantized_dir)[0], None, kept)
    assert len(measured) == 10


def test_a_model_without_quantized_layers_is_left_as_it_is(demo_model_dir: Path, caplog) -> None:
    from genmlx.dispatcher.engine.quantized_batches import dequantize_where_it_pays

    model, _ = load(demo_model_dir)
    caplog.set_level("INFO")
    assert dequantize_where_it_pays(model, None) == {}
    assert dequantize_where_it_pays(model, 8) == {}
    assert "quantized" not in caplog.text, "nothing measured, nothing said"


def test_compiled_kernels_are_kept_under_genmlx_home_unless_placed(tmp_path: Path, monkeypatch) -> None:
    from genmlx.dispatcher.engine.model_loading import keep_compiled_kernels

    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    kept = keep_compiled_kernels(tmp_path / "home")
    assert kept == tmp_path / "home" / "mlx-kernels" / mx.__version__
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(kept), "MLX reads where to keep them from the environment"
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "theirs"))
    assert keep_compiled_kernels(tmp_path / "home") == tmp_path / "theirs"
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(tmp_path / "theirs")


def test_a_measurement_that_cannot_be_written_is_logged_and_leaves_no_partial(tmp_path: Path, caplog) -> None:
    from genmlx.dispatcher.engine.measurements import keep_timings

    kept = tmp_path / "kept.json"
    kept.mkdir()  # not a file to replace: the rename fails, whoever runs this
    (kept / "theirs").write_text("stays")
    keep_timings(kept, "a", [Timing(1, 0.5, 0.25, 0.125)])
    assert "could not keep the measurement" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"], "no partial left behind"
    assert (kept / "theirs").read_text() == "stays"
    keep_timings(tmp_path / "other.json", "a", [Timing(1, 0.5, 0.25, 0.125)])
    assert json.loads((tmp_path / "other.json").read_text()) == {"a": [[1, 0.5, 0.25, 0.125]]}


# ----- copies of the weights dequantized once -----


def repeated_layers(model) -> list:
    return [layer for block in model.model.layers for layer in block.mlp.children().values()]


def test_copies_are_kept_where_the_spare_memory_holds_them_beside_the_parameters(
    quantized_dir: Path, monkeypatch, caplog
) -> None:
    model, tokenizer = load(quantized_dir)
    parameters = {k: id(v) for k, v in tree_flatten(model.parameters())}
    rows = mx.array([tokenizer.encode("The river ran past the old mill")[:6]] * 3)  # 18 rows
    expected = model(rows)
    needed = copied_bytes(model)
    # Two blocks of three MLP projections and four attention ones; the demo model is in float32.
    assert needed == 2 * (3 * 128 * 64 + 2 * 64 * 64 + 2 * 32 * 64) * 4
    caplog.set_level("INFO")

    # A byte short: the shapes in the model's order while they fit, so the last keeps none.
    assert dequantize_where_it_pays(model, 4, spare=needed - 1) == every(model, RowSpan(4))
    shapes = repeated_shapes(model)
    (left_out,) = [shape for shape, layers in shapes.items() if layers[0].dense is None]
    assert left_out == list(shapes)[-1] and all(layer.dense is None for layer in shapes[left_out])
    assert (
        f"no room for copies of the {len(shapes[left_out])} quantized layers of {left_out} (" in caplog.text
    )
    assert dequantize_where_it_pays(model, 4, spare=0) == every(model, RowSpan(4))
    assert all(layer.dense is None for layer in repeated_layers(model))

    assert dequantize_where_it_pays(model, 4, spare=needed) == every(model, RowSpan(4))
    copies = [m.dense for _, m in model.named_modules() if getattr(m, "dense", None) is not None]
    assert len(copies) == 14 and sum(c.nbytes for c in copies) == needed
    assert {c.dtype for c in copies} == {model.lm_head["scales"].dtype}
    assert model.lm_head.dense is None, "the output layer keeps the kernel"
    assert {k: id(v) for k, v in tree_flatten(model.parameters())} == parameters, "copies are not parameters"
    real_dequantize, calls = mx.dequantize, []

    def dequantize(*args, **kwargs):  # the embedding's lookup dequantizes its rows
        calls.append(args[0].shape)
        return real_dequantize(*args, **kwargs)

    monkeypatch.setattr(mx, "dequantize", dequantize)
    assert mx.allclose(model(rows), expected, atol=1e-4).item()
    assert calls == [(3, 6, 8)], "the embedding's rows alone: the layers multiply through their copies"
    monkeypatch.undo()

    assert dequantize_where_it_pays(model, 4) == every(model, RowSpan(4)), "no spare memory given: no copies"
    assert all(layer.dense is None for layer in repeated_layers(model))
    assert "no spare memory given" in caplog.text


def test_greedy_tokens_are_the_same_through_copies_alone_and_in_a_batch(quantized_dir: Path) -> None:
    model, tokenizer = load(quantized_dir)
    by_the_kernel = greedy(model, tokenizer, TEXTS)
    dequantize_where_it_pays(model, 2, spare=copied_bytes(model))  # a batch's rows through the copies
    assert model.model.layers[0].mlp.down_proj.dense is not None
    batched = greedy(model, tokenizer, TEXTS)
    alone = {uid: greedy(model, tokenizer, (text,))[0] for uid, text in enumerate(TEXTS)}
    assert batched == by_the_kernel == alone


def test_measured_copies_are_kept_where_faster_and_held_else_per_call_where_that_pays(
    quantized_dir: Path, monkeypatch
) -> None:

    measured = timings((1, 1, 3, 1.05), (8, 6, 3, 2), (64, 28, 5, 2), (512, 40, 45, 20))
    monkeypatch.setattr(measurements, "measure_products", lambda layers: measured)
    model, _ = load(quantized_dir)
    layer = model.model.layers[0].mlp.down_proj
    assert dequantize_where_it_pays(model, None, spare=1 << 40) == every(model, RowSpan(8))
    assert layer.dense is not None, "copies faster from 8 rows on, and held: 8 rows and more through them"
    assert dequantize_where_it_pays(model, None, spare=0) == every(model, RowSpan(8, 512))
    assert layer.dense is None, "not held: per call, where that was faster"
    measured[:] = timings((1, 1, 3, 3), (8, 6, 7, 6))
    assert dequantize_where_it_pays(model, None, spare=1 << 40) == every(model, None) and layer.dense is None


def test_layers_of_one_size_in_two_bit_widths_are_two_shapes(quantized_dir: Path) -> None:
    model, _ = load(quantized_dir)
    wider = model.model.layers[1].mlp  # its three projections in 8 bits, the first block's in 4
    for name in ("gate_proj", "up_proj", "down_proj"):
        dense = nn.Linear(*reversed(layer_shape(getattr(wider, name))[:2]), bias=False)
        setattr(wider, name, nn.QuantizedLinear.from_linear(dense, group_size=32, bits=8))
    shapes = repeated_shapes(model)
    assert q4(128, 64) in shapes and Shape(128, 64, 8, 32, "affine") in shapes
    assert q4(64, 128) not in shapes, "one down projection in each width: neither repeats"
    assert copied_bytes(model) == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 2 * 128 * 64) * 4
