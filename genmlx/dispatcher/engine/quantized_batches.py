"""Quantized layers that multiply a batch's rows as one matrix, and many rows at once through a
dequantized weight.

A batch of decoding sequences reaches each linear layer as B rows of one token each, an array of
shape (B, 1, D). MLX's Metal backend multiplies that by a quantized weight as one (B, D) matrix;
its CUDA backend (0.32) as B problems of one row each, each reading the whole weight: on an H100 a
decode step of Llama 3.2 1B's shape in 4 bits took 1.6 ms of device time for one sequence and 28
for 64, while a (64, D) matrix took about as long as an (8, D) one
(``benchmarks/decode_step_profile.py``, ``benchmarks/quantized_matmul.py``).
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
(``measurements.measure_products``): the layers of each shape its blocks repeat (their size and
quantization: a mixed-precision model has several bit widths at one size) multiply random
rows both ways at row counts from 1 to 2,048, one layer after another, each product waiting for
the one before it and reading its weight from the device's memory as a step's do, and the row
counts where the dequantized weight was clearly faster (``faster_span``: the longest run) become
that shape's span (never the output layer's, one of its kind and as wide as the vocabulary);
nowhere faster, it keeps the kernel. The timings are kept in
``GENMLX_HOME/quantized-products.json`` by device, MLX version and shape, so the next load of such
a model there takes them instead of measuring again.
``--dequantize-rows N`` sets every repeated shape's span to N rows and up instead (0: never).

Dequantizing for each call costs the dequantization each time. A layer can instead keep a copy of
its weight dequantized once, in the type of its scales (the activations'), beside its quantized
weight: two bytes a weight more for as long as the model is loaded, which is why it is done only
within the memory the master found spare beside the weights, the prefix cache and the batch's full
contexts (``--spare-gb``; ``master.planning.batching``). The measurement times that path too; the
shapes where it was clearly faster over a run of row counts keep copies as far as the spare
memory holds them (those that saved the most time per byte first), and multiply those row counts
through them and the others through the kernel (on an H100, Llama 3.2 1B's shape in 4 bits: a
decode step's kernels at 64 sequences from 8.7 to 2.6 ms, for 1.95 GB); the shapes without room
dequantize per call where that pays, and the log says why. Which path a row count takes can
differ between a sequence decoded alone and in a batch; MLX's CUDA kernels do not give the same
greedy tokens alone and in a batch either (13 of 16 random-weight sequences on an H100 and an
H200, through the kernel alone). With ``--dequantize-rows N`` the repeated shapes keep copies as
far as the spare memory holds them, in the model's order, and multiply N rows and more through
them.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import QuantizedAllToShardedLinear, QuantizedShardedToAllLinear

from genmlx.dispatcher.engine.measurements import (
    MEASUREMENTS_FILE,
    RowSpan,
    Timing,
    faster_span,
    measured_timings,
)
from genmlx.dispatcher.engine.quantized_products import (
    Shape,
    copy_bytes,
    copy_product,
    dequantized_product,
    layer_shape,
    quantized_product,
    weight_copy,
)

__all__ = [
    "MEASUREMENTS_FILE",
    "RowSpan",
    "batch_quantized_layers",
    "dequantize_where_it_pays",
    "copied_bytes",
    "faster_span",
    "repeated_shapes",
]

log = logging.getLogger(__name__)


def batch_quantized_layers(
    model: nn.Module, spans: Mapping[Shape, RowSpan | None] | None = None, copies: Collection[Shape] = ()
) -> int:
    """Make ``model``'s quantized linear layers and quantized embeddings (their ``as_linear``)
    multiply each call's rows as one matrix, and the linear layers of a shape the model repeats
    call with rows in that shape's span (``spans``, by ``Shape``; none: none) through a
    dequantized weight: a copy each keeps where its shape is in ``copies``, else one made for the
    call; how many layers changed. Their parameters stay as they are (same names, same arrays); a
    copy is beside them, not one of them."""
    found = _quantized_layers(model)
    for module, kind, repeated in found:
        module.__class__ = kind  # the same module, with the call below; nothing is copied
        # Only the layers the blocks repeat, as measured: the output layer, as wide as the
        # vocabulary, would need gigabytes of float32 for its one product per step.
        linear = repeated and kind is _BatchedQuantizedLinear
        module.span = (spans or {}).get(layer_shape(module)) if linear else None
        module.__dict__.pop("dense", None)
        if module.span is not None and layer_shape(module) in copies:
            dense = weight_copy(module, module["scales"].dtype)
            mx.eval(dense)
            object.__setattr__(module, "dense", dense)
    return len(found)


def copied_bytes(model: nn.Module, shapes: Collection[Shape] | None = None) -> int:
    """The memory copies of the weights of the quantized linear layers the model repeats (those of
    ``shapes``; None: all), dequantized to the type of their scales, would take."""
    return sum(
        _copies_bytes(layers)
        for shape, layers in repeated_shapes(model).items()
        if shapes is None or shape in shapes
    )


def _copies_bytes(layers: Sequence[nn.Module]) -> int:
    return sum(copy_bytes(layer) for layer in layers)


def repeated_shapes(model: nn.Module) -> dict[Shape, list[nn.Module]]:
    """The quantized linear layers the model repeats (as its blocks do), by their shape."""
    by_shape: dict[Shape, list[nn.Module]] = {}
    for module, kind, repeated in _quantized_layers(model):
        if repeated and kind is _BatchedQuantizedLinear:
            by_shape.setdefault(layer_shape(module), []).append(module)
    return by_shape


def _quantized_layers(model: nn.Module) -> list[tuple[nn.Module, type, bool]]:
    """The model's quantized layers this module batches, each with the class it takes and whether
    the model repeats it (has another of its kind and shape, as the blocks' layers are)."""
    found = [(module, kind) for _, module in model.named_modules() if (kind := _batched_class(module))]
    shapes = Counter((kind, layer_shape(module)) for module, kind in found)
    return [(module, kind, shapes[kind, layer_shape(module)] > 1) for module, kind in found]


def dequantize_where_it_pays(
    model: nn.Module, rows: int | None, kept: Path | None = None, spare: int | None = None
) -> dict[Shape, RowSpan | None]:
    """Make the model's quantized layers multiply each call's rows as one matrix, and those of each
    shape the model repeats ``rows`` rows or more through their dequantized weight (0: never; None:
    at the row counts where this device was measured faster so for that shape, with the timings
    logged and kept in ``kept`` for the next load, see ``measured_timings``), through copies they
    keep where those fit in ``spare`` bytes (and, when measured, were faster); the span each shape
    got (None: MLX's kernel at every row count)."""
    shapes = repeated_shapes(model)
    if rows == 0 or not shapes:
        batch_quantized_layers(model)
        return dict.fromkeys(shapes)
    if rows is not None:
        spans = copy_spans = dict.fromkeys(shapes, RowSpan(rows))
        gains: dict[Shape, float] = {}
    else:
        timings = {shape: _logged_timings(layers, kept) for shape, layers in shapes.items()}
        spans = {shape: faster_span(each) for shape, each in timings.items()}
        copy_spans = {shape: faster_span(each, "copied") for shape, each in timings.items()}
        gains = {
            shape: _gain_per_byte(each, copy_spans[shape], shapes[shape][0])
            for shape, each in timings.items()
        }
    faster = sorted((shape for shape, span in copy_spans.items() if span), key=lambda s: -gains.get(s, 0.0))
    copies = _copies_that_fit({shape: shapes[shape] for shape in faster}, spare)
    spans = {shape: copy_spans[shape] if shape in copies else span for shape, span in spans.items()}
    batch_quantized_layers(model, spans, copies)
    for shape, span in spans.items():
        layers = f"{len(shapes[shape])} quantized layers of {shape}"
        if span is None:
            log.info("%s multiply through MLX's quantized kernel at every row count", layers)
        else:
            kept_as = (
                "copies of their weights dequantized once"
                if shape in copies
                else "their weights dequantized per call"
            )
            log.info("%s multiply %s through %s", layers, span, kept_as)
    return spans


def _logged_timings(layers: Sequence[nn.Module], kept: Path | None) -> list[Timing]:
    """``measured_timings`` of ``layers``, logged; none where measuring failed."""
    shape = layer_shape(layers[0])
    try:
        timings, source = measured_timings(layers, kept)
    except Exception:  # an optimization's measurement must not keep the model from serving
        log.exception("measuring a quantized layer of %s failed; its shape keeps MLX's kernel", shape)
        return []
    log.info("a quantized layer of %s, its products %s", shape, source)
    for t in timings:
        log.info(
            "  %d rows: %.3f ms; dequantized: %.3f ms; through a copy: %.3f ms",
            t.rows,
            t.quantized * 1e3,
            t.dequantized * 1e3,
            t.copied * 1e3,
        )
    return timings


def _gain_per_byte(timings: Sequence[Timing], span: RowSpan | None, layer: nn.Module) -> float:
    """Seconds a copy of ``layer`` saved per product, per byte it takes: the median over the row
    counts in ``span`` measured (a mean would be the prompt chunks' thousands of rows)."""
    saved = [t.quantized - t.copied for t in timings if span is not None and t.rows in span]
    return statistics.median(saved) / copy_bytes(layer) if saved else 0.0


def _copies_that_fit(candidates: Mapping[Shape, list[nn.Module]], spare: int | None) -> list[Shape]:
    """The shapes of ``candidates`` (in the order given: the most time saved per byte first) whose
    layers' copies fit together in ``spare`` bytes, each taken while it fits; logs what did not."""
    if not candidates:
        return []
    if spare is None:
        log.info("no spare memory given (--spare-gb): the quantized layers keep no dequantized copies")
        return []
    chosen, left = [], spare
    for shape, layers in candidates.items():
        needed = _copies_bytes(layers)
        if needed <= left:
            chosen.append(shape)
            left -= needed
        else:
            log.info(
                "no room for copies of the %d quantized layers of %s (%.2f GB) in the %.2f GB left "
                "of the %.2f GB spare beside the batch",
                len(layers),
                shape,
                needed / 2**30,
                left / 2**30,
                spare / 2**30,
            )
    if chosen:
        log.info(
            "dequantized copies take %.2f GB of the %.2f GB spare", (spare - left) / 2**30, spare / 2**30
        )
    return chosen


def _batched_class(module: nn.Module) -> type | None:
    """The class ``module`` takes to join its rows: for one of the quantized layers in ``_BATCHED``
    exactly (a model's own subclass of one calls it its own way, and is left alone), or one that
    already did."""
    kind = type(module)
    return _BATCHED.get(kind) or (kind if kind in _BATCHED.values() else None)


def _product(layer: nn.Module, x: mx.array) -> mx.array:
    """``x`` times ``layer``'s quantized weight (transposed), its rows as one matrix: through the
    dequantized weight where their count is in the layer's span, else by MLX's quantized kernel."""
    rows = x.size // x.shape[-1]
    span = layer.span
    if span is None or rows not in span:
        product = quantized_product
    elif layer.dense is None:
        product = dequantized_product
    else:
        return copy_product(layer.dense, x)  # the matrix kernel joins the rows itself
    return _on_rows(lambda matrix: product(layer, matrix), x)


def _on_rows(product: Callable[[mx.array], mx.array], x: mx.array) -> mx.array:
    """``product`` of ``x``'s rows as one matrix, shaped back as ``x`` came. Rows that are one run
    already (one sequence's tokens, (1, L, D)) go as they are: no reshape to build each step."""
    *leading, width = x.shape
    if x.ndim <= 2 or x.size // width == leading[-1]:
        return product(x)
    y = product(x.reshape(-1, width))
    return y.reshape(*leading, y.shape[-1])


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
