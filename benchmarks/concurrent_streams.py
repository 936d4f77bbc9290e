"""Aggregate generated tokens/s at 1, 4 and 16 concurrent streams: our dispatcher over ``mlx_lm.server``.

    python benchmarks/concurrent_streams.py [--model DIR | --shape demo|benchmark] [--tokens 64]
        [--levels 1 4 16] [--temperature 0]

Both servers run as processes on 127.0.0.1 on the same model (the demo model, written to a temporary
directory, unless ``--model`` names one or ``--shape benchmark`` asks for a larger random one):
ours is ``python -m genmlx.dispatcher``; the baseline is
``python -m mlx_lm.server``. Both are given the same batch size, ``--batch`` (default 32, which is
mlx_lm.server's default ``--decode-concurrency``), so neither server's batch limit holds back any
stream of any level here: ours gets ``--max-batch N`` (its decode and prefill batch), the baseline
``--decode-concurrency N --prompt-concurrency N`` (its prompt default, 8, would read 16 prompts in
two rounds). Everything else is each server's default; the prompts are far shorter than
either's prefill chunk, and both keep a prompt cache (ours 16 entries, mlx_lm.server 10), which the
repeated prompts hit alike. The same client code drives both: at each level, that many threads,
spread over several client processes (``stream_clients.py``: one per 8 streams, at most one per
two cores, so that the client's own parsing of every chunk does not cap a fast server), each
send one streaming chat completion through the ``openai`` client, all with the same prompts,
``max_tokens`` and temperature (0 unless ``--temperature`` says otherwise: at 0 both servers sample
the whole batch in one call, above it each request has a sampler of its own, on both).

Timed: from just before the first request is sent to the end of the last stream, prefill included
(each thread builds its ``openai`` client before the clock starts: building one takes ~30 ms of
CPU). Tokens: the sum of ``usage.completion_tokens`` the servers report. A second table splits that
time: the seconds until the slowest stream's first chunk with content (prefill and admission), and
the chunks with content a second that all streams received while every one of them was generating
(from that first chunk to the first stream's end: a full batch's serving rate, without its ramps),
and for ours the model thread's mean step and mean batch over the run, from its step counters in
``/metrics`` (a served step much longer than ``decode_step_profile.py``'s engine step at that
batch is time the thread lost to the process around it).
Both servers run throughout (an idle one blocks on its request queue, costing no CPU) and each first
runs every level once, untimed, with 8-token requests (on a GPU, MLX compiles kernels for each batch
shape it first meets: in one unwarmed run on an H100 ours, first to reach 8 streams, made 0.03 of
the rate mlx_lm.server made right after it); then, level by level, runs alternate between the two,
``--rounds`` times each, so a change in the machine's background load reaches both alike. Printed
per level: each server's median aggregate rate, and the ratio as the median of the rounds' own
ratios (ours over the baseline run right after it), with their range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from decode_throughput import (
    Server,
    add_dequantize_option,
    add_model_options,
    cluster_batching,
    dequantize_flags,
    free_port,
    model_directory,
    our_dispatcher,
    paired_ratios,
    running_process,
)
from prometheus_client.parser import text_string_to_metric_families
from stream_clients import run_streams

PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how rivers shape valleys.",
    "List some uses of copper in everyday life.",
    "Describe a busy market in the morning.",
)


@dataclass(frozen=True)
class Workload:
    """What every request asks for."""

    max_tokens: int
    temperature: float


@dataclass(frozen=True)
class LevelRun:
    """One level's run: how many streams, the tokens they generated and the wall-clock seconds."""

    streams: int
    tokens: int
    seconds: float
    errors: tuple[str, ...] = ()  # one per stream that failed
    last_first: float | None = None  # seconds until the slowest stream's first content
    together: float | None = None  # chunks with content a second while every stream was generating
    step_ms: float | None = None  # ours: the model thread's mean step meanwhile
    batch: float | None = None  # ours: tokens its steps decoded, a step on average

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def while_all_generate(arrivals: list[list[float]]) -> tuple[float | None, float | None]:
    """From each stream's chunk arrivals (seconds from start): when the slowest stream's first
    chunk came, and the chunks a second that all streams got between then and the first stream's
    end, when every stream was generating (None where no such stretch was)."""
    streamed = [times for times in arrivals if times]
    if not streamed:
        return None, None
    start, end = max(times[0] for times in streamed), min(times[-1] for times in streamed)
    if end <= start:
        return start, None
    chunks = sum(start <= t <= end for times in streamed for t in times)
    return start, chunks / (end - start)


@contextmanager
def mlx_lm_server(model_dir: Path, work: Path, batch: int | None) -> Iterator[Server]:
    """``mlx_lm.server`` on ``model_dir`` reading and decoding up to ``batch`` requests together
    (None: its defaults); it answers to ``default_model``."""
    port = free_port()
    args = [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir)]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    if batch is not None:
        args += ["--decode-concurrency", str(batch), "--prompt-concurrency", str(batch)]
    base_url = f"http://127.0.0.1:{port}"
    with running_process(args, base_url + "/health", work / "mlx_lm_server.log") as process:
        yield Server(base_url, "default_model", "unused", process.pid)


def engine_counts(server: Server) -> tuple[float, float, float] | None:
    """Our dispatcher's step counters (steps, seconds, tokens) from its ``/metrics``; None for a
    server without them."""
    request = urllib.request.Request(
        server.base_url + "/metrics", headers={"Authorization": f"Bearer {server.api_key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
    except OSError:  # no such page (mlx_lm.server), or no answer
        return None
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("genmlx:engine_")
    }
    names = [f"genmlx:engine_{name}_total" for name in ("steps", "step_seconds", "step_tokens")]
    return tuple(values[name] for name in names) if all(name in values for name in names) else None


def run_level(server: Server, streams: int, workload: Workload) -> LevelRun:
    """``streams`` concurrent streams, started together from several client processes
    (``stream_clients``); aggregate tokens over wall time, and for ours its steps meanwhile."""
    before = engine_counts(server)
    run = run_streams(
        server.base_url,
        server.api_key,
        server.model,
        PROMPTS,
        workload.max_tokens,
        workload.temperature,
        streams,
    )
    after = engine_counts(server)
    step_ms = batch = None
    if before is not None and after is not None and after[0] > before[0]:
        steps, seconds, tokens = (a - b for a, b in zip(after, before, strict=True))
        step_ms, batch = seconds * 1000 / steps, tokens / steps
    started_all, rate_all = while_all_generate(run.arrivals)
    return LevelRun(
        streams, sum(run.counts), run.seconds, tuple(run.errors), started_all, rate_all, step_ms, batch
    )


def median_rate(runs: list[LevelRun]) -> float:
    return statistics.median(run.tokens_per_second for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent streams")
    parser.add_argument("--rounds", type=int, default=3, help="runs per level and server")
    parser.add_argument("--batch", type=int, default=32, help="requests each server batches together")
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="instead of --batch: each server's defaults (ours as a one-node cluster on this machine "
        "places it, mlx_lm.server's own)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="temperature of every request")
    add_dequantize_option(parser)
    options = parser.parse_args()
    workload = Workload(options.tokens, options.temperature)
    with (
        model_directory(options.model, options.shape) as model_dir,
        tempfile.TemporaryDirectory() as work,
    ):
        if options.defaults:
            batching = cluster_batching(model_dir)
            ours_flags = ["--max-batch", str(batching.max_batch), "--max-queue", str(batching.max_queue)]
            limits = f"each server's defaults: ours {batching.reason}; mlx_lm.server its own"
            batch = None
        else:
            ours_flags, limits = ["--max-batch", str(options.batch)], f"batch {options.batch} on both servers"
            batch = options.batch
        with (
            our_dispatcher(
                model_dir, Path(work), [*ours_flags, *dequantize_flags(options, model_dir, batch)]
            ) as ours,
            mlx_lm_server(model_dir, Path(work), None if options.defaults else options.batch) as baseline,
        ):
            servers = {"ours": ours, "mlx_lm.server": baseline}
            results = run_alternating(servers, options.levels, options.rounds, workload)
    report(model_dir, workload, limits, results)


def run_alternating(
    servers: dict[str, Server], levels: list[int], rounds: int, workload: Workload
) -> dict[str, dict[int, list[LevelRun]]]:
    """Every level ``rounds`` times on each server, alternating, after an untimed run of every level
    on each."""
    for server in servers.values():
        for level in levels:
            run_level(server, level, Workload(8, workload.temperature))
    results: dict[str, dict[int, list[LevelRun]]] = {name: {} for name in servers}
    for level in levels:
        for _ in range(rounds):
            for name, server in servers.items():
                results[name].setdefault(level, []).append(run_level(server, level, workload))
    return results


def report(
    model_dir: Path, workload: Workload, limits: str, results: dict[str, dict[int, list[LevelRun]]]
) -> None:
    print(f"model: {model_dir}; max_tokens {workload.max_tokens}; temperature {workload.temperature}")
    print(limits)
    print("aggregate generated tokens/s (median)")
    print(f"{'streams':>7} {'tokens':>13} {'ours':>10} {'mlx_lm.server':>14}  ratio (paired rounds)")
    for level, ours in results["ours"].items():
        baseline = results["mlx_lm.server"][level]
        tokens = f"{ours[0].tokens}/{baseline[0].tokens}"
        ratio = paired_ratios([r.tokens_per_second for r in ours], [r.tokens_per_second for r in baseline])
        failed = {name: [e for r in runs[level] for e in r.errors] for name, runs in results.items()}
        if any(failed.values()):  # a server that dropped streams made fewer tokens: no ratio
            ratio = "not compared: " + "; ".join(
                f"{name} failed {len(errors)} of {level * len(results[name][level])} streams ({errors[0]})"
                for name, errors in failed.items()
                if errors
            )
        print(f"{level:>7} {tokens:>13} {median_rate(ours):>10.1f} {median_rate(baseline):>14.1f}  {ratio}")
    print("while every stream was generating, chunks with content a second; seconds until the slowest")
    print("stream's first chunk (medians; prefill and admission take that part of the time above);")
    print("our model thread's mean step over the whole run (a prompt chunk, a token for each")
    print("generating sequence, or both) and the tokens a step decoded on average")
    header = f"{'streams':>7} {'ours':>10} {'mlx_lm.server':>14} {'ours first':>11} {'theirs first':>13}"
    print(f"{header} {'ours step ms':>13} {'ours batch':>11}")
    for level, ours in results["ours"].items():
        baseline = results["mlx_lm.server"][level]
        rates = [shown(median_of(runs, "together"), 1) for runs in (ours, baseline)]
        firsts = [shown(median_of(runs, "last_first"), 3) for runs in (ours, baseline)]
        step, batch = shown(median_of(ours, "step_ms"), 2), shown(median_of(ours, "batch"), 1)
        row = f"{level:>7} {rates[0]:>10} {rates[1]:>14} {firsts[0]:>11} {firsts[1]:>13}"
        print(f"{row} {step:>13} {batch:>11}")


def shown(figure: float | None, places: int) -> str:
    return "-" if figure is None else f"{figure:.{places}f}"


def median_of(runs: list[LevelRun], field: str) -> float | None:
    values = [value for run in runs if (value := getattr(run, field)) is not None]
    return statistics.median(values) if values else None


if __name__ == "__main__":
    main()
