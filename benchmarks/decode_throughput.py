"""Single-stream decode speed: our dispatcher over HTTP against mlx-lm's ``stream_generate`` in-process.

    python benchmarks/decode_throughput.py [--model DIR | --shape demo|benchmark] [--tokens 256] [--rounds 5]

Both generate the same prompt tokens at temperature 0 for ``--tokens`` tokens on the same model
(the demo model, written to a temporary directory, unless ``--model`` names one; ``--shape
benchmark`` writes a larger random-weight one, where computing a token outweighs serving it as it
does for any real model). What is timed is
decode only, from the first generated token to the last, so prefill is left out of both:

- ours: a real dispatcher process (``python -m genmlx.dispatcher``), a streaming ``/v1/completions``
  request; the clock reads when each text chunk reaches the client, and the token count is the
  request's ``usage.completion_tokens``. Rate = (tokens - 1) / (last - first). Two clients read the
  same stream: a lean one (``http.client``, each event's JSON parsed with ``json.loads``), whose
  rate is the ratio's, and the ``openai`` client, whose rate is printed too. The ``openai`` client
  spends about half a millisecond of CPU on each chunk (server-sent event parsing, pydantic
  models); on a machine with few cores that CPU is taken from the server and the model, and the
  rate it sees measures the client as much as the server.
- baseline: ``mlx_lm.stream_generate`` in this process; the clock reads at each response it yields
  (one per token), same formula.

End-of-turn stops both at the same token at temperature 0, so on a real model a shorter answer is
possible; the token counts are printed. Each side is warmed up first; rounds alternate between them.
Printed: each side's median rate, and the ratio as the median of the rounds' own ratios (ours over
the baseline run right after it) with their range: on a machine whose speed drifts, a round's two
runs see the same machine, so paired ratios scatter less than two medians taken apart.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import psutil

from genmlx.demo.random_model import (
    BENCHMARK_SHAPE,
    DEMO_SHAPE,
    LLAMA_1B_SHAPE,
    LLAMA_8B_SHAPE,
    write_demo_model,
)
from genmlx.dispatcher.api.prompts import completion_prompt_tokens

SERVED_NAME = "bench-model"
PROMPT = "The river ran past the old mill and into the valley, where"
TOKEN = "benchmark-token"


@dataclass(frozen=True)
class DecodeRun:
    """One timed generation: tokens generated, seconds from the first to the last, and the CPU
    seconds the processes involved used meanwhile (server and client for ours, just this process
    for mlx-lm)."""

    tokens: int
    decode_seconds: float
    cpu_seconds: float = 0.0

    @property
    def cores_busy(self) -> float:
        return self.cpu_seconds / self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens - 1) / self.decode_seconds


@dataclass(frozen=True)
class Server:
    """An OpenAI-compatible server started for a benchmark: where it listens and what to call it."""

    base_url: str
    model: str
    api_key: str
    pid: int | None = None

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, max_retries=0, timeout=600)


SHAPES = {
    "demo": DEMO_SHAPE,
    "benchmark": BENCHMARK_SHAPE,
    "llama-1b": LLAMA_1B_SHAPE,
    "llama-8b": LLAMA_8B_SHAPE,
}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model directory (default: a random-weight model, see --shape)")
    parser.add_argument(
        "--shape",
        choices=SHAPES,
        default="demo",
        help=f"without --model: the demo model ({DEMO_SHAPE.describe()}: serving costs more than "
        f"computing a token), a larger random-weight one ({BENCHMARK_SHAPE.describe()}), or Llama 3.2 "
        "1B's or Llama 3.1 8B's layers (for a GPU)",
    )


def add_dequantize_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dequantize-rows",
        type=int,
        metavar="N",
        help="ours: quantized layers multiply N rows or more through their dequantized weight, 0: never "
        "(the dispatcher's --dequantize-rows; default: its own, measured at load on a CUDA GPU)",
    )
    parser.add_argument(
        "--spare-gb",
        type=float,
        metavar="G",
        help="ours: the memory its quantized layers may fill with dequantized copies (the dispatcher's "
        "--spare-gb; default: what a one-node cluster on this machine would give it)",
    )


def dequantize_flags(options: argparse.Namespace, model_dir: Path, max_batch: int | None = None) -> list[str]:
    """Our dispatcher's flags for ``--dequantize-rows`` and ``--spare-gb``: the spare memory a
    one-node cluster here gives a rank serving the model with ``max_batch`` (unset: derived), unless
    given."""
    rows = options.dequantize_rows
    spare = options.spare_gb
    if spare is None:
        spare_bytes = cluster_batching(model_dir, max_batch).spare_bytes
        spare = spare_bytes[0] / 2**30 if spare_bytes else 0.0
    return ([] if rows is None else ["--dequantize-rows", str(rows)]) + ["--spare-gb", f"{spare:.3f}"]


def cluster_batching(model_dir: Path, max_batch: int | None = None):
    """The batch, queue and spare memory a one-node cluster on this machine gives the model with
    ``serving.maxBatch`` ``max_batch`` (unset: placement's own choice, from this node's facts and
    the model's shape)."""
    from genmlx.agent.facts.collect import collect_node_facts
    from genmlx.agent.store.model_shape import read_model_shape
    from genmlx.manifest.types import ModelSpec, Serving, Source
    from genmlx.master.planning.batching import batching_for
    from genmlx.master.planning.placement import place
    from genmlx.master.planning.plan import node_capacity

    spec = ModelSpec("bench", Source("file", str(model_dir)), ("here",), serving=Serving(max_batch=max_batch))
    nodes, shape = [node_capacity("here", collect_node_facts())], read_model_shape(model_dir)
    return batching_for(spec, place(spec, nodes, shape, None), nodes, shape, None)


@contextmanager
def model_directory(requested: str | None, shape: str = "demo") -> Iterator[Path]:
    """``--model`` as given, or a random-weight model of ``shape`` written to a temporary directory."""
    if requested:
        yield Path(requested).expanduser()
        return
    with tempfile.TemporaryDirectory(prefix="genmlx-bench-") as work:
        yield write_demo_model(Path(work) / f"{shape}-llama", shape=SHAPES[shape])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_process(args: list[str], health_url: str, log_path: Path) -> Iterator[subprocess.Popen]:
    """Run ``args`` until the block ends; enters once ``health_url`` answers 200."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GENMLX_API_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(health_url, process, log_path)
            yield process
        finally:
            process.terminate()
            process.wait(30)


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{' '.join(process.args)} exited:\n{log_path.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    sys.exit(f"{url} did not answer within {timeout:.0f}s")


@contextmanager
def our_dispatcher(model_dir: Path, work: Path, flags: Sequence[str] = ()) -> Iterator[Server]:
    """A real dispatcher process serving ``model_dir``, started with ``flags`` besides its address."""
    port = free_port()
    args = [sys.executable, "-m", "genmlx.dispatcher", "--model", str(model_dir), "--name", SERVED_NAME]
    args += ["--port", str(port), "--max-queue", "256", *flags]
    base_url = f"http://127.0.0.1:{port}"
    log_path = work / f"dispatcher-{port}.log"  # one per server: a run may start several
    with running_process(args, base_url + "/health", log_path) as process:
        yield Server(base_url, SERVED_NAME, TOKEN, process.pid)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def time_ours(server: Server, tokens: int, prompt: str | list[int] = PROMPT) -> DecodeRun:
    """One stream read by the lean client: ``http.client`` and ``json.loads`` per event."""
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    host, port = server.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/completions", json.dumps(body), headers)
    response = connection.getresponse()
    if response.status != 200:
        sys.exit(f"{server.base_url}/v1/completions answered {response.status}: {response.read()[:500]!r}")

    def chunks() -> Iterator[dict]:
        for line in response:
            if line.startswith(b"data: {"):
                yield json.loads(line[len(b"data: ") :])

    try:
        return timed_stream(_server_and_client(server), chunks(), _has_text, _usage_tokens)
    finally:
        connection.close()


def _has_text(chunk: dict) -> bool:
    return bool(chunk["choices"] and chunk["choices"][0]["text"])


def _usage_tokens(chunk: dict) -> int | None:
    return chunk["usage"]["completion_tokens"] if chunk.get("usage") else None


def time_ours_openai(server: Server, tokens: int) -> DecodeRun:
    """One stream read by the ``openai`` client."""
    stream = server.client().completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    return timed_stream(
        _server_and_client(server),
        stream,
        lambda chunk: chunk.choices and chunk.choices[0].text,
        lambda chunk: chunk.usage.completion_tokens if chunk.usage is not None else None,
    )


def _server_and_client(server: Server) -> list[psutil.Process]:
    return [psutil.Process(server.pid), psutil.Process()]


def timed_stream(
    processes: list[psutil.Process],
    chunks: Iterable[Any],
    has_text: Callable[[Any], Any],
    usage_tokens: Callable[[Any], int | None],
) -> DecodeRun:
    """Clock each chunk with text as it arrives; the CPU ``processes`` use meanwhile."""
    arrivals: list[float] = []
    generated = 0
    for chunk in chunks:
        if has_text(chunk):
            if not arrivals:
                cpu_at_first = sum(map(cpu_seconds, processes))
            arrivals.append(time.perf_counter())
        if (reported := usage_tokens(chunk)) is not None:
            generated = reported
    cpu = sum(map(cpu_seconds, processes)) - cpu_at_first
    return DecodeRun(generated, arrivals[-1] - arrivals[0], cpu)


def time_baseline(model, tokenizer, tokens: int) -> DecodeRun:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    prompt = list(completion_prompt_tokens(tokenizer, PROMPT))  # the very tokens our API generates from
    responses = stream_generate(model, tokenizer, prompt, max_tokens=tokens, sampler=make_sampler(0.0))
    return timed_stream([psutil.Process()], responses, lambda _: True, lambda r: r.generation_tokens)


def median_rate(runs: list[DecodeRun]) -> float:
    return statistics.median(run.tokens_per_second for run in runs)


def paired_ratios(ours: list[float], baseline: list[float]) -> str:
    """The median and range of the rounds' ratios, ours over the baseline of the same round."""
    ratios = sorted(o / b for o, b in zip(ours, baseline, strict=True))
    return f"{statistics.median(ratios):.3f} (rounds {ratios[0]:.3f}-{ratios[-1]:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    add_dequantize_option(parser)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per generation")
    parser.add_argument("--rounds", type=int, default=5, help="timed generations per side")
    options = parser.parse_args()
    from mlx_lm import load

    with model_directory(options.model, options.shape) as model_dir, tempfile.TemporaryDirectory() as work:
        model, tokenizer = load(str(model_dir))
        with our_dispatcher(model_dir, Path(work), dequantize_flags(options, model_dir)) as server:
            sides = {
                "ours, lean client": lambda n: time_ours(server, n),
                "ours, openai client": lambda n: time_ours_openai(server, n),
                "mlx-lm stream_generate": lambda n: time_baseline(model, tokenizer, n),
            }
            for timed in sides.values():
                timed(16)  # warm-up: compiled kernels, caches, connections
            runs: dict[str, list[DecodeRun]] = {name: [] for name in sides}
            for _ in range(options.rounds):
                for name, timed in sides.items():
                    runs[name].append(timed(options.tokens))
    report(model_dir, runs)


def report(model_dir: Path, runs: dict[str, list[DecodeRun]]) -> None:
    *ours_names, baseline_name = runs
    baseline = runs[baseline_name]
    print(f"model: {model_dir}")
    print("tokens per run: " + "; ".join(f"{name} {[r.tokens for r in rs]}" for name, rs in runs.items()))
    for name, side in runs.items():
        print(f"{name:<24}: {median_rate(side):8.1f} decode tokens/s (median)")
    for name in ours_names:
        rates = ([r.tokens_per_second for r in runs[name]], [r.tokens_per_second for r in baseline])
        print(f"ratio {name} / mlx-lm: {paired_ratios(*rates)}")
    # On a machine with few cores, the baseline alone may keep most of them busy (MLX computes on
    # its own thread while Python builds the next step), leaving little for a server and a client.
    print("CPU cores busy while decoding (ours: server and client), median:")
    for name, side in runs.items():
        print(f"  {name:<24}: {statistics.median(r.cores_busy for r in side):.2f}")
    print(f"this machine has {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
