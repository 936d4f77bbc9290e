"""Load and soak: many streaming clients through the master for minutes, with nothing lost.

    python benchmarks/soak.py [--streams 64] [--seconds 300] [--nodes 2] [--max-batch 8]
        [--max-queue 32] [--disconnect 0.1] [--seed 0] [--json FILE]

Real processes on 127.0.0.1: a master and ``--nodes`` agents, serving the demo model (a tensor
group over both nodes by default). ``--streams`` clients each send streaming chat completions
through the master, one after another until the time is up: random prompt lengths (10 to 400
words) and output lengths (8 to 256 tokens), and a tenth (``--disconnect``) of the streams dropped
by the client after a random number of chunks. With more clients than ``maxBatch`` + ``maxQueue``,
some requests find the queue full: a 429, which the client honours (``Retry-After``) before its
next request. Those two are intended; any other failure is an error, counted by kind.

Every second the resident memory (RSS) of the master, each agent and every rank is sampled; the
report gives each one's first and last sample and its slope (least squares, MB per minute) over the
run after the first quarter (warming up: buffers, caches, the prefix cache filling). Each one's open
files (sockets included) are counted before the clients start and once they are all gone: a
process that holds more afterwards leaks them. A rank that
restarts (a new pid) is an error too. Before and after, a completion at temperature 0 is asked:
the same answer afterwards means the ranks of the group are still in step.

Reported: requests, outcomes (completed, disconnected, 429), errors by kind, p50/p99 time to first
token and inter-token latency (of streams that got a token), tokens per second overall, and the
memory table. ``--json`` writes the same as JSON (``tests/test_soak.py`` runs a short one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import openai
import psutil
from decode_throughput import TOKEN, model_directory
from rollout_latency import MODEL, Cluster, first_token

WORDS = ("river", "sea", "mountain", "valley", "field", "wheat", "barley", "bean", "library", "map", "coast")
SAMPLE_S = 1.0
SETTLE_S = 3.0  # after the last client, before open files are counted again


@dataclass
class Tally:
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    rejected: int = 0  # 429: the queue was full, as intended
    errors: Counter = field(default_factory=Counter)
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)


class MemorySampler:
    """RSS of the master, the agents and their ranks, every second, in a thread of its own."""

    def __init__(self, cluster: Cluster):
        self.named = {"master": psutil.Process(cluster.procs[-1].pid)}
        self.named |= {
            f"agent {n}": psutil.Process(p.pid) for n, p in zip(cluster.names, cluster.procs, strict=False)
        }
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self.rank_pids: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            now = time.monotonic() - self.started
            for name, process in self._processes().items():
                try:
                    self.samples.setdefault(name, []).append((now, process.memory_info().rss / 1e6))
                except psutil.Error:
                    continue

    def _processes(self) -> dict[str, psutil.Process]:
        found = dict(self.named)
        for agent, process in self.named.items():
            if not agent.startswith("agent"):
                continue
            for child in process.children(recursive=True):
                try:
                    command = child.cmdline()
                except psutil.Error:
                    continue
                if "genmlx.dispatcher" in command:
                    rank = command[command.index("--rank") + 1] if "--rank" in command else "0"
                    name = f"rank {rank} ({agent.split()[1]})"
                    self.rank_pids.setdefault(name, set()).add(child.pid)
                    found[name] = child
        return found

    def open_files(self) -> dict[str, int]:
        """How many files (sockets included) each process holds open now."""
        counts = {}
        for name, process in self._processes().items():
            try:
                counts[name] = process.num_fds()
            except psutil.Error:
                continue
        return counts

    def restarts(self) -> int:
        return sum(len(pids) - 1 for pids in self.rank_pids.values())

    def table(self, files_before: dict[str, int], files_after: dict[str, int]) -> dict[str, dict[str, float]]:
        rows = {}
        for name, samples in sorted(self.samples.items()):
            warm = [s for s in samples if s[0] >= samples[-1][0] / 4] or samples
            rows[name] = {
                "first_mb": samples[0][1],
                "last_mb": samples[-1][1],
                "slope_mb_per_min": slope(warm),
                "files_before": files_before.get(name),
                "files_after": files_after.get(name),
            }
        return rows


def slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB), in MB per minute."""
    if len(samples) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in samples)
    mean_m = statistics.fmean(m for _, m in samples)
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    return 60 * sum((t - mean_t) * (m - mean_m) for t, m in samples) / spread if spread else 0.0


async def client_loop(
    client: openai.AsyncOpenAI, tally: Tally, rng: random.Random, deadline: float, disconnect: float
):
    while time.monotonic() < deadline:
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 400)))
        max_tokens = rng.randint(8, 256)
        leave_after = rng.randint(1, 8) if rng.random() < disconnect else None
        tally.requests += 1
        try:
            await one_stream(client, tally, prompt, max_tokens, leave_after)
        except openai.RateLimitError as e:
            tally.rejected += 1
            await asyncio.sleep(float(e.response.headers.get("retry-after", "1")))
        except openai.APIStatusError as e:
            tally.errors[f"HTTP {e.status_code}"] += 1
            await asyncio.sleep(1)  # as a client would before trying again
        except (openai.APIError, OSError) as e:
            tally.errors[type(e).__name__] += 1
            await asyncio.sleep(1)


async def one_stream(client, tally: Tally, prompt: str, max_tokens: int, leave_after: int | None) -> None:
    sent = time.monotonic()
    last = None
    chunks = 0
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True
    )
    try:
        async for chunk in stream:
            if not (chunk.choices and chunk.choices[0].delta.content):
                continue
            now = time.monotonic()
            if last is None:
                tally.ttft.append(now - sent)
            else:
                tally.itl.append(now - last)
            last, chunks = now, chunks + 1
            tally.tokens += 1
            if leave_after is not None and chunks >= leave_after:
                tally.disconnected += 1
                return  # the stream is closed below, mid-answer
    finally:
        await stream.close()
    tally.completed += 1


def reference_answer(cluster: Cluster) -> str:
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
    for _ in range(60):
        try:
            reply = client.completions.create(model=MODEL, prompt="Rivers", max_tokens=16, temperature=0)
            return reply.choices[0].text
        except openai.RateLimitError:
            time.sleep(1)
    sys.exit("the cluster never had room for the reference completion")


async def soak(cluster: Cluster, options: argparse.Namespace) -> Tally:
    tally = Tally()
    rng = random.Random(options.seed)
    deadline = time.monotonic() + options.seconds
    # A stream that stops sending for a minute is a failure to count, not one to wait out.
    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
    loops = [
        client_loop(client, tally, random.Random(rng.random()), deadline, options.disconnect)
        for _ in range(options.streams)
    ]
    await asyncio.gather(*loops)
    await client.close()
    return tally


def percentile(values: list[float], q: float) -> float | None:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else (values[0] if values else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--nodes", type=int, default=2, choices=(1, 2))
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--disconnect", type=float, default=0.1, help="share of streams the client drops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this (new) directory")
    options = parser.parse_args()
    serving = f"maxBatch: {options.max_batch}, maxQueue: {options.max_queue}"
    with model_directory(None) as model_dir, tempfile.TemporaryDirectory() as tmp:
        work = options.logs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cluster = Cluster(work, model_dir, options.nodes, serving)
        try:
            cluster.apply(serving=True)
            first_token(cluster.url)
            before = reference_answer(cluster)
            memory = MemorySampler(cluster)
            files_before = memory.open_files()
            memory.start()
            started = time.monotonic()
            tally = asyncio.run(soak(cluster, options))
            elapsed = time.monotonic() - started
            memory.stop()
            in_step = reference_answer(cluster) == before
            time.sleep(SETTLE_S)  # every client gone: what is still open now stays open
            files_after = memory.open_files()
        finally:
            cluster.stop()
    if memory.restarts():
        tally.errors["rank restarted"] += memory.restarts()
    figures = report(options, tally, elapsed, memory.table(files_before, files_after), in_step)
    if options.json:
        options.json.write_text(json.dumps(figures, indent=2))


def report(options, tally: Tally, elapsed: float, memory: dict, in_step: bool) -> dict:
    figures = {
        "streams": options.streams,
        "seconds": round(elapsed, 1),
        "nodes": options.nodes,
        **{k: v for k, v in asdict(tally).items() if k not in ("ttft", "itl", "errors")},
        "errors": dict(tally.errors),
        "ttft_p50_s": percentile(tally.ttft, 50),
        "ttft_p99_s": percentile(tally.ttft, 99),
        "itl_p50_s": percentile(tally.itl, 50),
        "itl_p99_s": percentile(tally.itl, 99),
        "tokens_per_second": tally.tokens / elapsed,
        "memory": memory,
        "in_step": in_step,
    }
    print(
        f"{options.streams} streams for {elapsed:.0f}s on {options.nodes} node(s) "
        f"(maxBatch {options.max_batch}, maxQueue {options.max_queue})"
    )
    print(
        f"requests {tally.requests}: completed {tally.completed}, disconnected by the client "
        f"{tally.disconnected}, 429 (queue full) {tally.rejected}"
    )
    print(f"errors: {dict(tally.errors) or 'none'}")
    for name in ("ttft", "itl"):
        p50, p99 = figures[f"{name}_p50_s"], figures[f"{name}_p99_s"]
        if p50 is not None:
            print(f"{name.upper():<4} p50 {p50 * 1000:8.1f} ms   p99 {p99 * 1000:8.1f} ms")
    print(f"tokens/s overall: {figures['tokens_per_second']:.1f}")
    print(f"{'process':<16} {'first MB':>9} {'last MB':>9} {'MB/min after warm-up':>22} {'open files':>16}")
    for name, row in memory.items():
        files = f"{row['files_before']} -> {row['files_after']}"
        mb = f"{row['first_mb']:9.1f} {row['last_mb']:9.1f} {row['slope_mb_per_min']:22.2f}"
        print(f"{name:<16} {mb} {files:>16}")
    print(
        f"ranks still in step (same answer at temperature 0 before and after): {'yes' if in_step else 'NO'}"
    )
    return figures


if __name__ == "__main__":
    main()
