"""Where a serving dispatcher's Python time goes while N streams decode: py-spy samples which
thread holds the interpreter lock, and in which functions, over one run of N streams.

    python benchmarks/serving_profile.py [--model DIR | --shape demo|benchmark] [--streams 64]
        [--tokens 256] [--max-batch 64] [--seconds 10] [--top 25]

A real dispatcher process serves the model (``--max-batch`` sequences in its batch); this process
sends ``--streams`` streaming chat completions at a time through the ``openai`` client, again and
again, while ``py-spy record --gil`` samples the dispatcher for ``--seconds`` (needs py-spy, and
the right to trace another process). Printed: the aggregate tokens/s meanwhile; the model
thread's mean step, tokens a step and share of the time in steps while sampled (from its counters
in ``/metrics``); for each thread, the share of the samples in which it held the lock (the lock is
one: the shares of all threads add up to at most 100%, and near 100% the host's Python is the
limit); then, for each thread, the functions it spent that time in, inclusive (a function's
callees count toward it).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from concurrent_streams import LevelRun, Workload, engine_counts, run_level
from decode_throughput import (
    add_dequantize_option,
    add_model_options,
    dequantize_flags,
    model_directory,
    our_dispatcher,
)

SAMPLES_PER_SECOND = 200


def sample(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    spy = shutil.which("py-spy") or sys.exit("py-spy is not installed (pip install py-spy)")
    args = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(SAMPLES_PER_SECOND)]
    args += ["-f", "raw", "-o", str(out), "--threads", "--gil", "--nonblocking"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def frame_name(frame: str) -> str:
    """``name (path/to/file.py:12)`` as ``name (file.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]}" + (")" if where else "")


def summarize(raw: Path, seconds: float, top: int) -> None:
    held: collections.Counter[str] = collections.Counter()
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        held[thread] += int(count)
        for name in {frame_name(f) for f in frames[1:]}:
            inclusive[thread][name] += int(count)
    possible = seconds * SAMPLES_PER_SECOND
    print(f"interpreter lock held: {sum(held.values()) / possible:.0%} of the time")
    for thread, samples in held.most_common():
        print(f"\n== {thread}: {samples / possible:.0%} of the time")
        # The frames every sample of the thread passes through (its entry point) say nothing.
        telling = [(n, c) for n, c in inclusive[thread].most_common() if c < 0.95 * samples]
        for name, count in telling[:top]:
            print(f"{count / possible:6.1%}  {name}")


def step_summary(before: tuple | None, after: tuple | None, seconds: float) -> str:
    """The model thread's steps while sampled, from its counters in ``/metrics``."""
    if before is None or after is None or after[0] <= before[0]:
        return "model thread: no steps counted"
    steps, spent, tokens = (a - b for a, b in zip(after, before, strict=True))
    return (
        f"model thread: {steps:.0f} steps, {spent * 1000 / steps:.2f} ms a step, {tokens / steps:.1f} "
        f"tokens a step, in steps {spent / seconds:.0%} of the time"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=256, help="max_tokens of every request")
    parser.add_argument("--max-batch", type=int, default=64, help="the dispatcher's --max-batch")
    parser.add_argument("--seconds", type=float, default=10, help="how long py-spy samples")
    parser.add_argument("--top", type=int, default=25, help="functions shown per thread")
    add_dequantize_option(parser)
    options = parser.parse_args()
    workload = Workload(max_tokens=options.tokens, temperature=0.0)
    with (
        tempfile.TemporaryDirectory(prefix="genmlx-bench-") as scratch,
        model_directory(options.model, options.shape) as model_dir,
    ):
        work = Path(scratch)
        flags = [
            "--max-batch",
            str(options.max_batch),
            *dequantize_flags(options, model_dir, options.max_batch),
        ]
        with our_dispatcher(model_dir, work, flags) as server:
            run_level(server, options.streams, Workload(max_tokens=8, temperature=0.0))  # warm-up
            runs: list[LevelRun] = []
            done = threading.Event()

            def keep_streaming() -> None:
                while not done.is_set():
                    runs.append(run_level(server, options.streams, workload))

            streaming = threading.Thread(target=keep_streaming)
            streaming.start()
            time.sleep(1)  # the first requests' prompts are read
            before, started = engine_counts(server), time.monotonic()
            spy = sample(server.pid, options.seconds, work / "raw.txt")
            _, problem = spy.communicate()
            steps = step_summary(before, engine_counts(server), time.monotonic() - started)
            done.set()
            streaming.join()
        if spy.returncode != 0:
            sys.exit(f"py-spy failed: {problem.strip()}")
        if errors := [e for r in runs for e in r.errors]:
            sys.exit(f"{len(errors)} streams failed, the first: {errors[0]}")
        rate = sum(r.tokens for r in runs) / sum(r.seconds for r in runs)
        print(f"model: {model_dir}; {options.streams} streams of {options.tokens} tokens: {rate:.0f} tok/s")
        print(steps)
        summarize(work / "raw.txt", options.seconds, options.top)


if __name__ == "__main__":
    main()
