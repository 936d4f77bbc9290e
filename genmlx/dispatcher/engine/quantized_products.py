"""The ways a quantized linear layer's weight can multiply rows: MLX's quantized kernel, the weight
dequantized for the call (in float32), and a copy dequantized once; and the sizes they read.
``quantized_batches`` chooses among them, ``measurements`` times them."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn


class Shape(NamedTuple):
    """What a quantized layer's products depend on: its outputs and inputs, and how it is
    quantized (a mixed-precision model has layers of one size in several bit widths)."""

    outputs: int
    inputs: int
    bits: int
    group_size: int
    mode: str

    def __str__(self) -> str:
        return f"{self.outputs} x {self.inputs} in {self.bits} bits"


def quantized_product(layer: nn.Module, x: mx.array) -> mx.array:
    """``x`` times ``layer``'s weight (transposed) by MLX's quantized kernel."""
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


def dequantized_product(layer: nn.Module, x: mx.array) -> mx.array:
    """``x`` times ``layer``'s weight dequantized for the call, products summed in float32."""
    return (x.astype(mx.float32) @ dequantized_weight(layer, mx.float32).T).astype(x.dtype)


def copy_product(copy: mx.array, x: mx.array) -> mx.array:
    """``x`` times a weight dequantized once (``weight_copy``), by the device's matrix kernel. Rows
    in any leading shape: MLX's matmul takes a batch's (B, 1, D) against a 2-D weight as one
    (B, D) matrix itself."""
    return x @ copy


def weight_copy(layer: nn.Module, dtype: mx.Dtype) -> mx.array:
    """``layer``'s weight dequantized to ``dtype`` once and stored transposed, (inputs, outputs) in
    memory order: each product then reads it as it is, with no transpose in the step's graph."""
    return mx.contiguous(dequantized_weight(layer, dtype).T)


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


def layer_shape(layer: nn.Module) -> Shape:
    outputs, packed = layer["weight"].shape[-2:]
    return Shape(outputs, packed * 32 // layer.bits, layer.bits, layer.group_size, layer.mode)


def quantized_bytes(layer: nn.Module) -> int:
    """What a product through the kernel reads of ``layer``: its packed weight, scales and biases."""
    return sum(layer[name].nbytes for name in ("weight", "scales", "biases") if name in layer)


def copy_bytes(layer: nn.Module) -> int:
    """The memory a copy of ``layer``'s weight dequantized to the type of its scales takes."""
    shape = layer_shape(layer)
    return shape.outputs * shape.inputs * layer["scales"].dtype.size
