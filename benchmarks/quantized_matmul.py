"""A quantized layer's product with M rows: MLX's quantized kernel against the weight dequantized
for the call (``genmlx.dispatcher.engine.quantized_batches``), at each M, on one transformer block
of a model's shape.

    python benchmarks/quantized_matmul.py [--hidden 2048] [--intermediate 8192] [--kv 512]
        [--bits 4] [--group-size 64] [--rows 1 2 4 8 16 32 64 128 512 2048]

The block's seven projections (q, k, v, o; gate, up, down) are random weights quantized by
``mx.quantize``, the activations random bfloat16 rows. Timed per M, median of 20 runs of the block
repeated 8 times in one evaluation (microseconds per block): ``quantized``
(``mx.quantized_matmul`` on the (M, D) matrix, as the dispatcher multiplies a batch), ``apart``
(the same on the M rows as an (M, 1, D) array, as a batch of M sequences reaches a layer of mlx-
lm's models: M products of one row), ``deq f32`` (dequantized and multiplied in float32, what the
dispatcher does), ``deq bf16`` (dequantized to bfloat16 and multiplied in it); ``ratio`` is
quantized over ``deq f32``: above 1 the dequantized weight is faster; ``apart/q`` is ``apart``
over ``quantized``. ``same`` is the share of the block's outputs (in bfloat16) the float32 path
gives exactly as the quantized kernel does, ``bf16 same`` the bfloat16 path's. ``1st q`` and ``1st
f32`` are the first run's microseconds per block on those two paths, any set-up of a kernel new
at that shape included: where the dispatcher's measurement at load spends its time. ``copy``
multiplies by the weight dequantized to bfloat16 once, beforehand, on the dense matrix kernel (as
the dispatcher's layers do where memory is spare and that was measured faster); ``q/copy`` is
``quantized`` over it, ``copy same`` the share of its outputs the same as the quantized kernel's.
The block's weights are read again each repeat, from the GPU's cache where they fit there (a
model's many blocks do not).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

REPEATS = 8
RUNS = 20


def quantized_block(hidden: int, intermediate: int, kv: int, bits: int, group_size: int) -> list[tuple]:
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
    shapes += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    block = []
    for i, shape in enumerate(shapes):
        weight = (mx.random.normal(shape, key=mx.random.key(i)) * 0.02).astype(mx.bfloat16)
        w, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
        dense = mx.dequantize(w, scales, biases, group_size, bits, dtype=mx.bfloat16)
        block.append((w, scales, biases, dense))
    mx.eval(block)
    return block


def run(block: list[tuple], x: dict[int, mx.array], path: str, bits: int, group_size: int) -> list[mx.array]:
    outs = []
    for w, scales, biases, dense in block:
        rows = x[w.shape[1] * 32 // bits]
        if path == "copy":
            outs.append(rows @ dense.T)
            continue
        if path == "quantized":
            outs.append(mx.quantized_matmul(rows, w, scales, biases, True, group_size, bits))
            continue
        if path == "apart":
            apart = mx.quantized_matmul(rows[:, None, :], w, scales, biases, True, group_size, bits)
            outs.append(apart.squeeze(1))
            continue
        dtype = mx.float32 if path == "deq f32" else mx.bfloat16
        weight = mx.dequantize(w, scales, biases, group_size, bits, dtype=dtype)
        outs.append((rows.astype(dtype) @ weight.T).astype(rows.dtype))
    return outs


def timed_us(block, x, path: str, bits: int, group_size: int) -> tuple[float, float]:
    """Microseconds per block: the median of the runs after two untimed, and the first run's (in
    which MLX sets up any kernel it has not used at this shape yet)."""
    times = []
    for _ in range(RUNS + 2):
        started = time.perf_counter()
        mx.eval([run(block, x, path, bits, group_size) for _ in range(REPEATS)])
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:]) * 1e6 / REPEATS, times[0] * 1e6 / REPEATS


def same_share(a: list[mx.array], b: list[mx.array]) -> float:
    equal = sum(mx.sum(p == q).item() for p, q in zip(a, b, strict=True))
    return equal / sum(p.size for p in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--kv", type=int, default=512, help="output size of the k and v projections")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 512, 2048])
    options = parser.parse_args()
    block = quantized_block(
        options.hidden, options.intermediate, options.kv, options.bits, options.group_size
    )
    print(
        f"device {mx.default_device()}; block {options.hidden}/{options.intermediate}/{options.kv}, "
        f"{options.bits} bits, groups of {options.group_size}"
    )
    columns = (
        "quantized",
        "apart",
        "deq f32",
        "deq bf16",
        "ratio",
        "apart/q",
        "same",
        "bf16 same",
        "1st q",
        "1st f32",
        "copy",
        "q/copy",
        "copy same",
    )
    print(f"{'M':>6} " + " ".join(f"{c:>10}" for c in columns))
    for m in options.rows:
        x = {
            size: mx.random.normal((m, size), key=mx.random.key(100 + size)).astype(mx.bfloat16)
            for size in (options.hidden, options.intermediate)
        }
        mx.eval(x)
        timed = {
            p: timed_us(block, x, p, options.bits, options.group_size)
            for p in ("quantized", "apart", "deq f32", "deq bf16", "copy")
        }
        times = {p: median for p, (median, _) in timed.items()}
        reference = run(block, x, "quantized", options.bits, options.group_size)
        f32 = same_share(reference, run(block, x, "deq f32", options.bits, options.group_size))
        bf16 = same_share(reference, run(block, x, "deq bf16", options.bits, options.group_size))
        copy = same_share(reference, run(block, x, "copy", options.bits, options.group_size))
        print(
            f"{m:>6} {times['quantized']:>10.0f} {times['apart']:>10.0f} {times['deq f32']:>10.0f}"
            f" {times['deq bf16']:>10.0f} {times['quantized'] / times['deq f32']:>10.2f}"
            f" {times['apart'] / times['quantized']:>10.2f} {f32:>10.1%} {bf16:>10.1%}"
            f" {timed['quantized'][1]:>10.0f} {timed['deq f32'][1]:>10.0f}"
            f" {times['copy']:>10.0f} {times['quantized'] / times['copy']:>10.2f} {copy:>10.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
