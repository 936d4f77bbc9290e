"""Timings of a quantized layer's products (``quantized_batches``), kept on disk by what they
depend on, so the next load on the same machine takes them instead of measuring again."""

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


@dataclass(frozen=True)
class Timing:
    """One row count's product on one layer, in seconds: MLX's quantized kernel, and through the
    dequantized weight."""

    rows: int
    quantized: float
    dequantized: float


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
    kept = {**kept_timings(path), key: [[t.rows, t.quantized, t.dequantized] for t in timings]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, json.dumps(kept, indent=1) + "\n")
    except OSError as e:
        log.warning("could not keep the measurement in %s: %s", path, e)
