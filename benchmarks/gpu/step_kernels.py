"""Where one decode step's device time goes, kernel by kernel, measured by Nsight Compute.

    python gpu/step_kernels.py --model DIR [--batch 64] [--dequantize-rows 0|measure]   (from benchmarks/)

Runs itself under ``ncu`` (Nsight Compute, found on the PATH or under /opt/nvidia), which times
every kernel of one greedy decode step of ``--batch`` sequences (a 32-token prompt each, a plain
KV cache, as ``decode_step_profile.py``'s ``floor``), started and stopped around that step with
CUDA's profiler calls, at the GPU's own clocks (``--clock-control none``). Each kernel runs by
itself under the profiler, with the GPU's caches emptied before it (ncu's default), so the sum is
the device's busy time without the gaps between launches, every kernel reading its weights from
memory. Printed: the kernels by name (template arguments dropped), how many ran, their time and
share, and the sum. A block's projections of the same rows are stacked, and the model's quantized
layers multiply a batch's rows as one matrix, as the dispatcher makes them;
``--dequantize-rows measure`` measures first, as the dispatcher does by default on a CUDA GPU;
``--spare-gb G`` lets them keep dequantized copies within G GB, as the dispatcher's option does.
"""

from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROFILED = "GENMLX_STEP_KERNELS_PROFILED"
UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}  # to us


def ncu() -> str:
    found = shutil.which("ncu") or next(iter(sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))), None)
    if not found:
        sys.exit("Nsight Compute (ncu) is not installed here")
    return found


def cuda_runtime() -> ctypes.CDLL:
    """CUDA's runtime library, for cudaProfilerStart/Stop (the context MLX made is current)."""
    import mlx.core as mx  # noqa: F401  (its CUDA libraries are loaded)

    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for site in sys.path:
        names += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libcudart.so*")))
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    sys.exit("CUDA's runtime library (libcudart) was not found")


def profiled_step(model_dir: str, batch: int, dequantize: str, spare_gb: float | None) -> None:
    import mlx.core as mx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
    from decode_step_profile import prefilled
    from mlx_lm import load

    from genmlx.dispatcher.engine.fused_projections import fuse_projections
    from genmlx.dispatcher.engine.quantized_batches import dequantize_where_it_pays

    model, tokenizer = load(model_dir)
    spare = None if spare_gb is None else int(spare_gb * 2**30)
    fuse_projections(model)  # as the dispatcher does, before the quantized layers
    dequantize_where_it_pays(model, None if dequantize == "measure" else int(dequantize), spare=spare)
    prompt = tokenizer.encode("A prompt of a few words, read by every sequence of the batch alike.")[:32]
    cache, tokens = prefilled(model, batch, prompt)

    def step(previous: mx.array) -> mx.array:
        following = mx.argmax(model(previous[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(following)
        return following

    for _ in range(4):  # every kernel of the step compiled and run once
        tokens = step(tokens)
    runtime = cuda_runtime()
    runtime.cudaDeviceSynchronize()
    runtime.cudaProfilerStart()
    step(tokens)
    runtime.cudaDeviceSynchronize()
    runtime.cudaProfilerStop()


def summary(report: Path, batch: int) -> None:
    lines = report.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        sys.exit("ncu measured no kernel:\n" + "\n".join(lines[-20:]))
    times: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        scale = UNITS[row["Metric Unit"]]
        name = re.sub(r"<.*", "", row["Kernel Name"]).split("(")[0].strip() or row["Kernel Name"]
        times[name] += value * scale
        counts[name] += 1
    total = sum(times.values())
    kernels = sum(counts.values())
    print(f"one decode step, batch {batch}: {kernels} kernels, {total / 1e3:.3f} ms on the device")
    print(f"{'us':>9} {'share':>6} {'count':>6}  kernel")
    for name, spent in times.most_common():
        print(f"{spent:>9.1f} {spent / total:>6.1%} {counts[name]:>6}  {name[:100]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the model directory")
    parser.add_argument("--batch", type=int, default=64, help="sequences decoding together")
    parser.add_argument("--dequantize-rows", default="0", help="as the dispatcher's option, or 'measure'")
    parser.add_argument("--spare-gb", type=float, help="as the dispatcher's option (none)")
    options = parser.parse_args()
    if os.environ.get(PROFILED):
        return profiled_step(options.model, options.batch, options.dequantize_rows, options.spare_gb)
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "kernels.csv"
        command = [ncu(), "--profile-from-start", "off", "--clock-control", "none", "--metrics"]
        command += ["gpu__time_duration.sum", "--csv", "--log-file", str(report), sys.executable, *sys.argv]
        subprocess.run(command, env={**os.environ, PROFILED: "1"}, check=True)
        summary(report, options.batch)


if __name__ == "__main__":
    main()
