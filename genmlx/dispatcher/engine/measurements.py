"""Timings of a quantized layer's products (``quantized_products``) on this device, the row counts
where a path beat MLX's kernel, and the timings kept on disk by what they depend on, so the next
load on the same machine takes them instead of measuring again."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from genmlx.core.files import write_whole
from genmlx.dispatcher.engine.quantized_products import (
    copy_bytes,
    copy_product,
    dequantized_product,
    layer_shape,
    quantized_bytes,
    quantized_product,
    weight_copy,
)

log = logging.getLogger(__name__)

MEASUREMENTS_FILE = "quantized-products.json"  # under GENMLX_HOME: what loads there measured
FASTER = 0.9  # a path must take at most this share of the kernel's time to be clearly faster
MEASURED_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TIMED_RUNS = 5  # per path and row count; the fastest counts
# Weights a timed run reads, at least: several times a GPU's last-level cache (50 MB on an H100).
COLD_BYTES = 256 << 20
LEAST_PRODUCT = 1e-9  # seconds: a product left at or below its link's time by the clock's noise


@dataclass(frozen=True)
class Timing:
    """One row count's product on one layer, in seconds: MLX's quantized kernel, through the weight
    dequantized for the call, and through a copy of it dequantized once."""

    rows: int
    quantized: float
    dequantized: float
    copied: float


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


def faster_span(timings: Sequence[Timing], path: str = "dequantized") -> RowSpan | None:
    """The longest run of consecutive row counts at which ``path`` (``dequantized`` or ``copied``)
    took at most ``FASTER`` of the kernel's time (of equally long ones, the first), as a span: from
    its first row count up to the next row count measured after it (none if the run reaches the
    last); None if there is no such row count. A lone row count that was faster by chance does not
    outweigh a run of them."""
    ordered = sorted(timings, key=lambda t: t.rows)
    runs: list[list[int]] = []  # indices into ordered, run by run
    for i, t in enumerate(ordered):
        if getattr(t, path) <= FASTER * t.quantized:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    if not runs:
        return None
    run = max(runs, key=len)
    end = run[-1] + 1
    return RowSpan(ordered[run[0]].rows, ordered[end].rows if end < len(ordered) else None)


def measurement_key(layer: nn.Module, rows: Sequence[int]) -> str:
    """What a measurement depends on: the device, MLX's version, the layer's kind, the rows."""
    shape = layer_shape(layer)
    device = mx.device_info().get("device_name", "?")
    return (
        f"{device} ({mx.default_device()}), MLX {mx.__version__}: {shape.outputs} x {shape.inputs}, "
        f"{layer.bits} bits in groups of {layer.group_size} ({layer.mode}), {layer['scales'].dtype}; "
        f"rows {', '.join(map(str, rows))}"
    )


def kept_timings(path: Path) -> dict[str, list]:
    """The timings kept in ``path`` by measurement key; none where it is missing or unreadable."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def keep_timings(path: Path, key: str, timings: Sequence[Timing]) -> None:
    """Add ``timings`` to ``path`` under ``key``, the file replaced whole (or left as it was)."""
    kept = {**kept_timings(path), key: [[t.rows, t.quantized, t.dequantized, t.copied] for t in timings]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, json.dumps(kept, indent=1) + "\n")
    except OSError as e:
        log.warning("could not keep the measurement in %s: %s", path, e)


def measured_timings(layers: Sequence[nn.Module], kept: Path | None) -> tuple[list[Timing], str]:
    """``measure_products``'s timings of ``layers`` (of one shape), and where they came from: from
    the file ``kept`` where a load on this device, with this MLX, measured layers of this kind and
    shape before (measuring can take a minute or more on a GPU, nearly all of it MLX compiling its
    kernel for each tile height, see ``model_loading.keep_compiled_kernels``), else measured now and
    kept there."""
    cold = len(_reading(layers, quantized_bytes))
    key = f"{measurement_key(layers[0], MEASURED_ROWS)}; each run a chain over {cold} layers"
    found = kept_timings(kept).get(key) if kept else None
    try:
        timings = [Timing(*entry) for entry in found or ()]
    except TypeError:  # an entry not of four numbers (one an earlier version kept): measured over
        timings = []
    if timings:
        return timings, f"as an earlier load measured them (kept in {kept})"
    started = time.monotonic()
    timings = measure_products(layers)
    if kept:
        keep_timings(kept, key, timings)
    return timings, f"measured in {time.monotonic() - started:.2f} s"


def measure_products(
    layers: Sequence[nn.Module],
    rows: Sequence[int] = MEASURED_ROWS,
    timed: Callable[[str, int, Callable[[], list[mx.array]]], float] | None = None,
) -> list[Timing]:
    """How long each path takes on this device for quantized linear layers of one shape, with random
    rows of their input: MLX's kernel, the weight dequantized for the call, and a copy of it
    dequantized once (``faster_span`` reads them). A timed run is a chain, as a decode step is: the
    rows multiply one layer after another, each product waiting for the one before it
    (``_chained``), until the weights read pass ``COLD_BYTES`` (all the layers, if fewer), so that
    each reads its weight from the device's memory, not from its cache. Products that wait for
    nothing do not measure a step: MLX's CUDA backend runs them side by side (its graphs order
    kernels only by the arrays they share), which fills the GPU for a kernel that keeps few
    multiprocessors busy. On an H100, 8192 x 2048 in 4 bits at 64 rows, the kernel took 0.022 ms a
    product so, against 0.066 ms in a step; copies looked slower than the kernel up to 64 rows,
    though they made a step of 64 sequences 30% faster (chained, on an H200: 0.055 ms, a copy
    0.039). What a chain's link itself takes (a one-element product and a sum of the rows,
    ``_after``) is timed alone and taken off. ``timed(path, rows, run)`` times a run's products, per
    product (default: the fastest of ``TIMED_RUNS``, after one untimed, see ``_fastest``); ``path``
    is ``link`` for the link alone. The copies are timed whether or not memory is spare now (they
    cost ``COLD_BYTES`` or one layer's copy while measuring): the timings are kept for this device
    and shape, and a later load with memory to spare reads them."""
    timed = timed or _fastest
    quantized = _reading(layers, quantized_bytes)
    dtype = layers[0]["scales"].dtype
    dense = [weight_copy(layer, dtype) for layer in _reading(layers, copy_bytes)]
    mx.eval(dense)
    paths = {
        "link": [lambda x: x] * len(quantized),
        "quantized": [partial(quantized_product, layer) for layer in quantized],
        "dequantized": [partial(dequantized_product, layer) for layer in quantized],
        "copied": [partial(copy_product, weight) for weight in dense],
    }
    timings = []
    for count in rows:
        x = mx.random.normal((count, layer_shape(layers[0]).inputs), key=mx.random.key(count)).astype(dtype)
        mx.eval(x)
        took = {path: timed(path, count, partial(_chained, x, products)) for path, products in paths.items()}
        link = took.pop("link")
        timings.append(Timing(count, **{path: max(t - link, LEAST_PRODUCT) for path, t in took.items()}))
    return timings


def _chained(x: mx.array, products: Sequence[Callable[[mx.array], mx.array]]) -> list[mx.array]:
    """Each of ``products`` of ``x``, one after another: each starts once the one before it has
    ended, its rows made from that one's output (``_after``)."""
    out: list[mx.array] = []
    for product in products:
        out.append(product(x))
        x = _after(x, out[-1])
    return out


def _after(x: mx.array, before: mx.array) -> mx.array:
    """``x`` as it is, as a new array computed from ``before`` too (a product that reads it waits)."""
    return x + before[:1, :1] * 0


def _reading(layers: Sequence[nn.Module], size: Callable[[nn.Module], int]) -> list[nn.Module]:
    """The first of ``layers`` whose ``size`` adds up to ``COLD_BYTES``, or all of them."""
    total = 0
    for count, layer in enumerate(layers, 1):
        total += size(layer)
        if total >= COLD_BYTES:
            return list(layers[:count])
    return list(layers)


def _fastest(path: str, rows: int, run: Callable[[], list[mx.array]]) -> float:
    """Seconds per product: the fastest of ``TIMED_RUNS`` runs of ``run``'s products evaluated
    together, after one untimed run. One product timed alone is mostly the wait for the device,
    and varied 3x between neighbouring row counts on an H200."""
    mx.eval(run())
    times = []
    for _ in range(TIMED_RUNS):
        products = run()
        started = time.perf_counter()
        mx.eval(products)
        times.append((time.perf_counter() - started) / len(products))
    return min(times)
