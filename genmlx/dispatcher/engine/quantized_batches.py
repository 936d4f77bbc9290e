"""Quantized layers that multiply many rows at once through a dequantized weight.

MLX's CUDA backend (0.32) multiplies a quantized weight by a few rows of activations with a kernel
whose time grows with every row: on an H100 a decode step of Llama 3.2 1B's shape in 4 bits takes
1.7 ms of device time for one sequence, 6.1 for 8, 15.5 for 32 and 28 for 64, while the same step
in bfloat16, on cuBLAS, takes 1.9 ms for one and 4.5 for 64 (``benchmarks/decode_step_profile.py``;
the host built each step's graph in 0.7 to 1.5 ms and held the interpreter lock 9% of the time
while serving 64 streams, ``benchmarks/serving_profile.py``: the device's matrix kernel, not
launches or Python, bounds a batch there). A batch of decoding sequences is exactly such a product.
``dequantize_for_batches`` makes a model's quantized linear layers (and a quantized embedding used
as the output layer) dequantize their weight when a call has at least ``min_rows`` rows and
multiply it on the device's matrix kernel; below that they call MLX's quantized kernel as before,
so a sequence decoding alone (a row a step) runs exactly as it did. A prompt read in chunks of
``min_rows`` tokens or more goes through the dequantized weight too.

The weight is dequantized in float32 and multiplied in float32, close to what the quantized kernel
computes (each weight ``scale * q + bias``, products summed in float32), so that a sequence decoded
in a batch gives the tokens it gives alone; a weight rounded to bfloat16 would move the logits by
more. The dequantized weight lives for the one call: it costs, transiently, four bytes per weight
of the largest layer. The dispatcher does this when told (``--dequantize-rows``);
``benchmarks/quantized_matmul.py`` measures, row count by row count, where it pays on a device.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

__all__ = ["dequantize_for_batches"]


def dequantize_for_batches(model: nn.Module, min_rows: int) -> int:
    """Make ``model``'s quantized linear layers and quantized embeddings (their ``as_linear``)
    multiply calls of ``min_rows`` rows or more through a dequantized weight; how many layers
    changed. Their parameters stay as they are (same names, same arrays)."""
    changed = 0
    for _, module in model.named_modules():
        batched = _BATCHED.get(type(module))
        if batched is not None:
            module.__class__ = batched  # the same module, with the call below; nothing is copied
            module.min_rows = min_rows
            changed += 1
    return changed


def _product(layer: nn.Module, x: mx.array) -> mx.array:
    """``x`` times ``layer``'s quantized weight (transposed), by MLX's quantized kernel for few rows
    and through the dequantized weight for many."""
    rows = x.size // x.shape[-1]
    if rows < layer.min_rows:
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
    weight = mx.dequantize(
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
        dtype=mx.float32,
    )
    return (x.astype(mx.float32) @ weight.T).astype(x.dtype)


class _BatchedQuantizedLinear(nn.QuantizedLinear):
    min_rows: int

    def __call__(self, x: mx.array) -> mx.array:
        y = _product(self, x)
        return y + self["bias"] if "bias" in self else y


class _BatchedQuantizedEmbedding(nn.QuantizedEmbedding):
    min_rows: int

    def as_linear(self, x: mx.array) -> mx.array:
        return _product(self, x)


_BATCHED: dict[type, Any] = {
    nn.QuantizedLinear: _BatchedQuantizedLinear,
    nn.QuantizedEmbedding: _BatchedQuantizedEmbedding,
}
