"""Quantized layers that multiply a batch's rows as one matrix, and many rows at once through a
dequantized weight.

A batch of decoding sequences reaches each linear layer as B rows of one token each, an array of
shape (B, 1, D). MLX's Metal backend multiplies that by a quantized weight as one (B, D) matrix;
its CUDA backend (0.32) as B problems of one row each (its tiled kernel runs a tile of rows per
problem, and each reads the whole weight). On an H100 a decode step of Llama 3.2 1B's shape in 4
bits took 1.6 ms of device time for one sequence, 6.2 for 8, 15.3 for 32 and 28 for 64, growing by
a weight read per sequence, while a (64, D) matrix on the block's layers took about as long as an
(8, D) one (``benchmarks/decode_step_profile.py``, ``benchmarks/quantized_matmul.py``; the host
built each step in 0.7 to 1.5 ms and held the interpreter lock 9% of the time serving 64 streams,
``benchmarks/serving_profile.py``: neither launches nor Python bound the batch there).
``batch_quantized_layers`` makes a model's quantized linear layers (and a quantized embedding used
as the output layer, and a tensor-parallel group's quantized shards) multiply every call's rows as
one (rows, D) matrix: the same numbers on the CPU, the same kernel as before on Metal, one weight
read for the whole batch on CUDA.

They can also dequantize their weight when a call has rows in a ``RowSpan`` and multiply it on the
device's matrix kernel, in float32, close to what the quantized kernel computes (each weight
``scale * q + bias``, products summed in float32); a weight rounded to bfloat16 would move the
logits by more. The dequantized weight lives for the one call: it costs, transiently, four bytes
per weight of the largest layer. Where that pays depends on the device, MLX's version and the
layer's shape, so on a CUDA GPU the dispatcher measures it when it loads the model
(``measure_products``): the largest of the quantized layers its blocks repeat multiplies random
rows both ways at row counts from 1 to 2,048, and the row counts where the dequantized weight was
clearly faster (``faster_span``: the longest run) become the span of the layers whose shape the
blocks repeat (not the output layer's, one of its kind and as wide as the vocabulary); nowhere
faster, they keep the kernel. The timings are kept in ``GENMLX_HOME/quantized-products.json`` by
device, MLX version and layer, so the next load of such a model there takes them instead of
measuring again.
``--dequantize-rows N`` sets the span to N rows and up instead (0: never).

Dequantizing for each call costs the dequantization each time. A layer can instead keep a copy of
its weight dequantized once, in the type of its scales (the activations'), beside its quantized
weight: two bytes a weight more for as long as the model is loaded, which is why it is done only
within the memory the master found spare beside the weights, the prefix cache and the batch's full
contexts (``--spare-gb``; ``master.planning.batching``). The measurement times that path too, and
where it was clearly faster at some row counts, clearly slower at none, and the copies of every
repeated layer fit in the spare memory, those layers keep copies and multiply every row count
through them (``copies_span``: one path whatever the batch; on an H100, Llama
3.2 1B's shape in 4 bits: a decode step's kernels at 64 sequences from 8.7 to 2.6 ms, for 1.95 GB);
else they dequantize per call where that pays, and the log says why. With ``--dequantize-rows N``
they keep copies where the spare memory holds them, and multiply N rows and more through them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import QuantizedAllToShardedLinear, QuantizedShardedToAllLinear

from genmlx.dispatcher.engine.measurements import (
    MEASUREMENTS_FILE,
    RowSpan,
    Timing,
    copies_span,
    faster_span,
    keep_timings,
    kept_timings,
    measurement_key,
)

__all__ = [
    "MEASUREMENTS_FILE",
    "RowSpan",
    "batch_quantized_layers",
    "dequantize_where_it_pays",
    "dequantized_weight",
    "copied_bytes",
    "copies_span",
    "faster_span",
    "measure_products",
    "measured_timings",
]

log = logging.getLogger(__name__)

MEASURED_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TIMED_RUNS = 5  # per path and row count; the fastest counts
RUN_PRODUCTS = 10  # products evaluated together in a timed run, as a step runs them back to back


def batch_quantized_layers(model: nn.Module, span: RowSpan | None = None, copies: bool = False) -> int:
    """Make ``model``'s quantized linear layers and quantized embeddings (their ``as_linear``)
    multiply each call's rows as one matrix, and those of a shape the model repeats calls with rows
    in ``span`` through a dequantized weight (None: none): a copy each keeps where ``copies``, else
    one made for the call; how many layers changed. Their parameters stay as they are (same names,
    same arrays); a copy is beside them, not one of them."""
    found = _quantized_layers(model)
    for module, kind, repeated in found:
        module.__class__ = kind  # the same module, with the call below; nothing is copied
        # Only the layers the blocks repeat, as measured: the output layer, as wide as the
        # vocabulary, would need gigabytes of float32 for its one product per step.
        module.span = span if repeated else None
        module.__dict__.pop("dense", None)
        if copies and module.span is not None and kind is _BatchedQuantizedLinear:
            dense = dequantized_weight(module, module["scales"].dtype)
            mx.eval(dense)
            object.__setattr__(module, "dense", dense)
    return len(found)


def copied_bytes(model: nn.Module) -> int:
    """The memory copies of the weights of the quantized linear layers of a shape the model repeats,
    dequantized to the type of their scales, would take."""
    return sum(
        m["weight"].shape[0] * _inputs(m) * m["scales"].dtype.size for m in _linears(model, repeated=True)
    )


def _quantized_layers(model: nn.Module) -> list[tuple[nn.Module, type, bool]]:
    """The model's quantized layers this module batches, each with the class it takes and whether
    the model repeats it (has another of its kind and shape, as the blocks' layers are)."""
    found = [(module, kind) for _, module in model.named_modules() if (kind := _batched_class(module))]
    shapes = Counter((kind, tuple(module["weight"].shape)) for module, kind in found)
    return [(module, kind, shapes[kind, tuple(module["weight"].shape)] > 1) for module, kind in found]


def _linears(model: nn.Module, repeated: bool) -> list[nn.Module]:
    """The model's quantized linear layers; only those it repeats where ``repeated``."""
    return [
        module
        for module, kind, is_repeated in _quantized_layers(model)
        if kind is _BatchedQuantizedLinear and (is_repeated or not repeated)
    ]


def dequantize_where_it_pays(
    model: nn.Module, rows: int | None, kept: Path | None = None, spare: int | None = None
) -> RowSpan | None:
    """Make the model's quantized layers multiply each call's rows as one matrix, and ``rows`` rows
    or more through their dequantized weight (0: never; None: at the row counts where this device
    was measured faster so, with the timings logged and kept in ``kept`` for the next load, see
    ``measured_timings``), through copies they keep where those fit in ``spare`` bytes (and, when
    measured, were faster); the span they got (None where they have none, or the model no quantized
    layer)."""
    if not _quantized_layers(model):
        return None  # nothing quantized
    if rows == 0:
        batch_quantized_layers(model)
        return None
    if rows is not None:
        span = copy_span = RowSpan(rows)
    else:
        try:
            timings, source = measured_timings(model, kept)
        except Exception:  # an optimization's measurement must not keep the model from serving
            log.exception("measuring the quantized layers failed; they keep MLX's quantized kernel")
            timings, source = [], "not measured"
        log.info("the quantized layers' products, %s", source)
        for t in timings:
            log.info(
                "a quantized layer, %d rows: %.3f ms; dequantized: %.3f ms; through a copy: %.3f ms",
                t.rows,
                t.quantized * 1e3,
                t.dequantized * 1e3,
                t.copied * 1e3,
            )
        span, copy_span = faster_span(timings), copies_span(timings)
    copies = copy_span is not None and _copies_fit(copied_bytes(model), spare)
    if copies:
        span = copy_span
    layers = batch_quantized_layers(model, span, copies)
    if span is None:
        log.info("%d quantized layers multiply through MLX's quantized kernel at every row count", layers)
        return None
    kept_as = "copies of their weights dequantized once" if copies else "their weights dequantized per call"
    log.info("%d quantized layers multiply %s through %s", layers, span, kept_as)
    return span


def _copies_fit(needed: int, spare: int | None) -> bool:
    """Whether copies of ``needed`` bytes fit in ``spare``; logs why not."""
    if spare is None:
        log.info("no spare memory given (--spare-gb): the quantized layers keep no dequantized copies")
        return False
    if needed > spare:
        log.info(
            "dequantized copies of the repeated quantized layers would take %.2f GB, more than the "
            "%.2f GB spare beside the batch: none kept",
            needed / 2**30,
            spare / 2**30,
        )
        return False
    log.info(
        "dequantized copies of the repeated quantized layers take %.2f GB of the %.2f GB spare",
        needed / 2**30,
        spare / 2**30,
    )
    return True


def _batched_class(module: nn.Module) -> type | None:
    """The class ``module`` takes to join its rows: for one of the quantized layers in ``_BATCHED``
    exactly (a model's own subclass of one calls it its own way, and is left alone), or one that
    already did."""
    kind = type(module)
    return _BATCHED.get(kind) or (kind if kind in _BATCHED.values() else None)


def measured_timings(model: nn.Module, kept: Path | None) -> tuple[list[Timing], str]:
    """``measure_products``'s timings, and where they came from: from the file ``kept`` where a load on
    this device, with this MLX, measured a layer of this kind before (measuring can take a minute or
    more on a GPU, nearly all of it MLX compiling its kernel for each tile height, see
    ``model_loading.keep_compiled_kernels``), else measured now and kept there."""
    layer = measured_layer(model)
    if layer is None:
        return [], "none to measure"
    key = f"{measurement_key(layer, MEASURED_ROWS)}; in runs of {RUN_PRODUCTS}"
    found = kept_timings(kept).get(key) if kept else None
    try:
        timings = [Timing(*entry) for entry in found or ()]
    except TypeError:  # an entry not of four numbers (one an earlier version kept): measured over
        timings = []
    if timings:
        return timings, f"as an earlier load measured them (kept in {kept})"
    started = time.monotonic()
    timings = measure_products(model)
    if kept:
        keep_timings(kept, key, timings)
    return timings, f"measured in {time.monotonic() - started:.2f} s"


def measured_layer(model: nn.Module) -> nn.Module | None:
    """The layer ``measure_products`` measures: the largest of the shapes every block repeats (not the
    output layer, whose float32 copy would be the largest of all, and is one of its kind)."""
    layers = _linears(model, repeated=True) or _linears(model, repeated=False)
    return max(layers, key=lambda m: m["weight"].size, default=None)


def measure_products(
    model: nn.Module,
    rows: Sequence[int] = MEASURED_ROWS,
    timed: Callable[[str, int, Callable[[], mx.array]], float] | None = None,
) -> list[Timing]:
    """How long each path takes on this device, measured on the largest of the model's repeated
    quantized linear layers (``measured_layer``) with random rows of its input: MLX's kernel, the
    weight dequantized for the call, and a copy of it dequantized once (``faster_span`` reads
    them). ``timed(path, rows, product)`` times one product (default: the fastest of
    ``TIMED_RUNS`` runs of ``RUN_PRODUCTS``, after one untimed, see ``_fastest``). The copy is timed
    whether or not memory is spare now (it costs the one layer's copy while measuring): the timings
    are kept for this device and layer, and a later load with memory to spare reads them."""
    layer = measured_layer(model)
    if layer is None:
        return []
    timed = timed or _fastest
    dense = dequantized_weight(layer, layer["scales"].dtype)
    mx.eval(dense)
    timings = []
    for count in rows:
        x = mx.random.normal((count, _inputs(layer)), key=mx.random.key(count)).astype(layer["scales"].dtype)
        mx.eval(x)
        timings.append(
            Timing(
                count,
                timed("quantized", count, lambda x=x: _quantized(layer, x)),
                timed("dequantized", count, lambda x=x: _dequantized(layer, x)),
                timed("copied", count, lambda x=x: x @ dense.T),
            )
        )
    return timings


def _inputs(layer: nn.Module) -> int:
    return layer["weight"].shape[-1] * 32 // layer.bits


def _fastest(path: str, rows: int, product: Callable[[], mx.array]) -> float:
    """Seconds per product: the fastest of ``TIMED_RUNS`` runs of ``RUN_PRODUCTS`` products
    evaluated together, after one untimed run. One product timed alone is mostly the wait for the
    device, and varied 3x between neighbouring row counts on an H200."""
    mx.eval([product() for _ in range(RUN_PRODUCTS)])
    times = []
    for _ in range(TIMED_RUNS):
        products = [product() for _ in range(RUN_PRODUCTS)]
        started = time.perf_counter()
        mx.eval(products)
        times.append((time.perf_counter() - started) / RUN_PRODUCTS)
    return min(times)


def _product(layer: nn.Module, x: mx.array) -> mx.array:
    """``x`` times ``layer``'s quantized weight (transposed), its rows as one matrix: through the
    dequantized weight where their count is in the layer's span, else by MLX's quantized kernel."""
    rows = x.size // x.shape[-1]
    span = layer.span
    if span is None or rows not in span:
        product = _quantized
    else:
        product = _dequantized if layer.dense is None else _copied
    return _on_rows(lambda matrix: product(layer, matrix), x)


def _on_rows(product: Callable[[mx.array], mx.array], x: mx.array) -> mx.array:
    """``product`` of ``x``'s rows as one matrix, shaped back as ``x`` came. Rows that are one run
    already (one sequence's tokens, (1, L, D)) go as they are: no reshape to build each step."""
    *leading, width = x.shape
    if x.ndim <= 2 or x.size // width == leading[-1]:
        return product(x)
    y = product(x.reshape(-1, width))
    return y.reshape(*leading, y.shape[-1])


def _quantized(layer: nn.Module, x: mx.array) -> mx.array:
    return mx.quantized_matmul(
        x,
        layer["weight"],
        scales=layer["scales"],
        biases=layer.get("biases"),
        transpose=True,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


def dequantized_weight(layer: nn.Module, dtype: mx.Dtype) -> mx.array:
    """``layer``'s quantized weight dequantized to ``dtype`` (each weight ``scale * q + bias``)."""
    return mx.dequantize(
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
        dtype=dtype,
    )


def _dequantized(layer: nn.Module, x: mx.array) -> mx.array:
    return (x.astype(mx.float32) @ dequantized_weight(layer, mx.float32).T).astype(x.dtype)


def _copied(layer: nn.Module, x: mx.array) -> mx.array:
    return x @ layer.dense.T


class _BatchedQuantizedLinear(nn.QuantizedLinear):
    span: RowSpan | None
    dense: mx.array | None = None  # its weight dequantized once, where it keeps a copy

    def __call__(self, x: mx.array) -> mx.array:
        y = _product(self, x)
        return y + self["bias"] if "bias" in self else y


class _BatchedQuantizedEmbedding(nn.QuantizedEmbedding):
    span: RowSpan | None
    dense: mx.array | None = None  # never a copy: one of its kind

    def as_linear(self, x: mx.array) -> mx.array:
        return _product(self, x)


class _RowsJoined:
    """A tensor-parallel group's quantized shard (mlx's distributed layers): its call, on the rows
    as one matrix. Its product stays MLX's kernel at every row count."""

    span: RowSpan | None
    dense: mx.array | None = None

    def __call__(self, x: mx.array) -> mx.array:
        return _on_rows(super().__call__, x)


class _JoinedAllToSharded(_RowsJoined, QuantizedAllToShardedLinear):
    pass


class _JoinedShardedToAll(_RowsJoined, QuantizedShardedToAllLinear):
    pass


_BATCHED: dict[type, Any] = {
    nn.QuantizedLinear: _BatchedQuantizedLinear,
    nn.QuantizedEmbedding: _BatchedQuantizedEmbedding,
    QuantizedAllToShardedLinear: _JoinedAllToSharded,
    QuantizedShardedToAllLinear: _JoinedShardedToAll,
}
