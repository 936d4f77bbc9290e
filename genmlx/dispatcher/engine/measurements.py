"""Timings of a quantized layer's products (``quantized_batches``), the row counts where a path
beat MLX's kernel, and the timings kept on disk by what they depend on, so the next load on the
same machine takes them instead of measuring again."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from genmlx.core.files import write_whole

log = logging.getLogger(__name__)

MEASUREMENTS_FILE = "quantized-products.json"  # under GENMLX_HOME: what loads there measured
FASTER = 0.9  # a path must take at most this share of the kernel's time to be clearly faster


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


def copies_span(timings: Sequence[Timing]) -> RowSpan | None:
    """Every row count (``RowSpan(1)``) where copies were clearly faster than the kernel at some run
    of row counts (``faster_span``) and clearly slower at none, else None. Every row count, so
    that a layer's product takes one path however many sequences share the step (a copy rounds
    the weight to the activations' type, the kernel does not), and only where no row count is
    slower, so that one stream does not pay for the batch. MLX's CUDA kernels are not the same
    alone and in a batch either: on an H100 and an H200, 13 of 16 random-weight sequences kept
    their greedy tokens alone and in a batch of 16 through the kernel, as through copies."""
    slower = any(t.copied * FASTER > t.quantized for t in timings)
    return RowSpan(1) if faster_span(timings, "copied") is not None and not slower else None


def measurement_key(layer: nn.Module, rows: Sequence[int]) -> str:
    """What a measurement depends on: the device, MLX's version, the layer's kind, the rows."""
    outputs, packed = layer["weight"].shape
    device = mx.device_info().get("device_name", "?")
    return (
        f"{device} ({mx.default_device()}), MLX {mx.__version__}: {outputs} x {packed * 32 // layer.bits}, "
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
