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
(``measure_span``): the largest of the quantized layers its blocks repeat multiplies random rows
both ways at row counts from 1 to 2,048, and the row counts where the dequantized weight was
clearly faster (``faster_span``) become the span of the layers whose shape the blocks repeat (not
the output layer's, one of its kind and as wide as the vocabulary); nowhere faster, they keep the
kernel. The timings are kept in ``GENMLX_HOME/quantized-products.json`` by device, MLX version
and layer, so the next load of such a model there takes them instead of measuring again.
``--dequantize-rows N`` sets the span to N rows and up instead (0: never).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import QuantizedAllToShardedLinear, QuantizedShardedToAllLinear

from genmlx.dispatcher.engine.measurements import (
    MEASUREMENTS_FILE,
    Timing,
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
    "faster_span",
    "measure_span",
    "measured_span",
]

log = logging.getLogger(__name__)

MEASURED_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
FASTER = 0.9  # the dequantized product must take at most this share of the kernel's time
TIMED_RUNS = 3  # per path and row count; the fastest counts


@dataclass(frozen=True)
class RowSpan:
    """Calls of ``low`` rows or more, and fewer than ``high`` (None: no upper end), multiply
    through the dequantized weight."""

    low: int
    high: int | None = None

    def __contains__(self, rows: int) -> bool:
        return rows >= self.low and (self.high is None or rows < self.high)

    def __str__(self) -> str:
        return f"{self.low} rows or more" if self.high is None else f"{self.low} to {self.high - 1} rows"


def batch_quantized_layers(model: nn.Module, span: RowSpan | None = None) -> int:
    """Make ``model``'s quantized linear layers and quantized embeddings (their ``as_linear``)
    multiply each call's rows as one matrix, and those of a shape the model repeats calls with rows
    in ``span`` through a dequantized weight (None: none); how many layers changed. Their
    parameters stay as they are (same names, same arrays)."""
    found = [(module, kind) for _, module in model.named_modules() if (kind := _batched_class(module))]
    shapes = Counter((kind, module["weight"].shape) for module, kind in found)
    for module, kind in found:
        module.__class__ = kind  # the same module, with the call below; nothing is copied
        # Only the layers the blocks repeat, as measured: the output layer, as wide as the
        # vocabulary, would need gigabytes of float32 for its one product per step.
        module.span = span if shapes[kind, module["weight"].shape] > 1 else None
    return len(found)


def dequantize_where_it_pays(model: nn.Module, rows: int | None, kept: Path | None = None) -> RowSpan | None:
    """Make the model's quantized layers multiply each call's rows as one matrix, and ``rows`` rows
    or more through their dequantized weight (0: never; None: at the row counts where this device
    was measured faster so, with the timings logged and kept in ``kept`` for the next load, see
    ``measured_span``); the span they got (None where they have none, or the model no quantized
    layer)."""
    if not any(_batched_class(m) for _, m in model.named_modules()):
        return None  # nothing quantized
    if rows == 0:
        batch_quantized_layers(model)
        return None
    if rows is not None:
        span: RowSpan | None = RowSpan(rows)
    else:
        try:
            span, timings, source = measured_span(model, kept)
        except Exception:  # an optimization's measurement must not keep the model from serving
            log.exception("measuring the quantized layers failed; they keep MLX's quantized kernel")
            span, timings, source = None, [], "not measured"
        log.info("the quantized layers' products, %s", source)
        for t in timings:
            log.info(
                "a quantized layer, %d rows: %.3f ms; dequantized: %.3f ms",
                t.rows,
                t.quantized * 1e3,
                t.dequantized * 1e3,
            )
    layers = batch_quantized_layers(model, span)
    if span is None:
        log.info("%d quantized layers multiply through MLX's quantized kernel at every row count", layers)
        return None
    log.info("%d quantized layers multiply %s through their dequantized weight", layers, span)
    return span


def _batched_class(module: nn.Module) -> type | None:
    """The class ``module`` takes to join its rows: for one of the quantized layers in ``_BATCHED``
    exactly (a model's own subclass of one calls it its own way, and is left alone), or one that
    already did."""
    kind = type(module)
    return _BATCHED.get(kind) or (kind if kind in _BATCHED.values() else None)


def measured_span(model: nn.Module, kept: Path | None) -> tuple[RowSpan | None, list[Timing], str]:
    """``measure_span``'s span and timings, and where they came from: from the file ``kept`` where
    a load on this device, with this MLX, measured a layer of this kind before (measuring can take
    a minute or more on a GPU, nearly all of it MLX compiling its kernel for each tile height, see
    ``model_loading.keep_compiled_kernels``), else measured now and kept there."""
    layer = measured_layer(model)
    if layer is None:
        return None, [], "none to measure"
    key = measurement_key(layer, MEASURED_ROWS)
    found = kept_timings(kept).get(key) if kept else None
    try:
        timings = [Timing(*entry) for entry in found or ()]
    except TypeError:  # an entry not of three numbers: measured over
        timings = []
    if timings:
        return faster_span(timings), timings, f"as an earlier load measured them (kept in {kept})"
    started = time.monotonic()
    span, timings = measure_span(model)
    if kept:
        keep_timings(kept, key, timings)
    return span, timings, f"measured in {time.monotonic() - started:.2f} s"


def measured_layer(model: nn.Module) -> nn.Module | None:
    """The layer ``measure_span`` measures: the largest of the shapes every block repeats (not the
    output layer, whose float32 copy would be the largest of all, and is one of its kind)."""
    layers = [m for _, m in model.named_modules() if _batched_class(m) is _BatchedQuantizedLinear]
    if not layers:
        return None
    shapes = Counter(tuple(m["weight"].shape) for m in layers)
    repeated = [m for m in layers if shapes[tuple(m["weight"].shape)] > 1] or layers
    return max(repeated, key=lambda m: m["weight"].size)


def measure_span(
    model: nn.Module,
    rows: Sequence[int] = MEASURED_ROWS,
    timed: Callable[[str, int, Callable[[], mx.array]], float] | None = None,
) -> tuple[RowSpan | None, list[Timing]]:
    """Where the dequantized weight beats MLX's quantized kernel on this device, measured on the
    largest of the model's repeated quantized linear layers (``measured_layer``) with random rows of
    its input: the span (``faster_span``) and the timings. ``timed(path, rows, product)`` times one
    product (default: the fastest of ``TIMED_RUNS`` evaluations, after one untimed)."""
    layer = measured_layer(model)
    if layer is None:
        return None, []
    inputs = layer["weight"].shape[-1] * 32 // layer.bits
    timed = timed or _fastest
    timings = []
    for count in rows:
        x = mx.random.normal((count, inputs), key=mx.random.key(count)).astype(layer["scales"].dtype)
        mx.eval(x)
        timings.append(
            Timing(
                count,
                timed("quantized", count, lambda x=x: _quantized(layer, x)),
                timed("dequantized", count, lambda x=x: _dequantized(layer, x)),
            )
        )
    return faster_span(timings), timings


def faster_span(timings: Sequence[Timing]) -> RowSpan | None:
    """The first run of consecutive row counts at which the dequantized product took at most
    ``FASTER`` of the kernel's time, as a span: from its first row count up to the next row count
    measured after it (none if the run reaches the last); None if there is no such row count."""
    ordered = sorted(timings, key=lambda t: t.rows)
    faster = [t.dequantized <= FASTER * t.quantized for t in ordered]
    if True not in faster:
        return None
    start = faster.index(True)
    end = faster.index(False, start) if False in faster[start:] else None
    return RowSpan(ordered[start].rows, None if end is None else ordered[end].rows)


def _fastest(path: str, rows: int, product: Callable[[], mx.array]) -> float:
    mx.eval(product())
    times = []
    for _ in range(TIMED_RUNS):
        started = time.perf_counter()
        mx.eval(product())
        times.append(time.perf_counter() - started)
    return min(times)


def _product(layer: nn.Module, x: mx.array) -> mx.array:
    """``x`` times ``layer``'s quantized weight (transposed), its rows as one matrix: through the
    dequantized weight where their count is in the layer's span, else by MLX's quantized kernel."""
    rows = x.size // x.shape[-1]
    span = layer.span
    product = _dequantized if span is not None and rows in span else _quantized
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


class _BatchedQuantizedLinear(nn.QuantizedLinear):
    span: RowSpan | None

    def __call__(self, x: mx.array) -> mx.array:
        y = _product(self, x)
        return y + self["bias"] if "bias" in self else y


class _BatchedQuantizedEmbedding(nn.QuantizedEmbedding):
    span: RowSpan | None

    def as_linear(self, x: mx.array) -> mx.array:
        return _product(self, x)


class _RowsJoined:
    """A tensor-parallel group's quantized shard (mlx's distributed layers): its call, on the rows
    as one matrix. Its product stays MLX's kernel at every row count."""

    span: RowSpan | None

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
