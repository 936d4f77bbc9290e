"""Single-stream decode speed: our dispatcher over HTTP against mlx-lm's ``stream_generate`` in-process.

    python benchmarks/decode_throughput.py [--model DIR | --shape demo|benchmark] [--tokens 256] [--rounds 5]

Both generate the same prompt tokens at temperature 0 for ``--tokens`` tokens on the same model
(the demo model, written to a temporary directory, unless ``--model`` names one; ``--shape
benchmark`` writes a larger random-weight one, where computing a token outweighs serving it as it
does for any real model). What is timed is
decode only, from the first generated token to the last, so prefill is left out of both:

- ours: a real dispatcher process (``python -m genmlx.dispatcher``), a streaming ``/v1/completions``
  request through the ``openai`` client; the clock reads when each text chunk reaches the client, and
  the token count is the request's ``usage.completion_tokens``. Rate = (tokens - 1) / (last - first).
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
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai

from genmlx.dispatcher.prompts import completion_prompt_tokens

SERVED_NAME = "bench-model"
PROMPT = "The river ran past the old mill and into the valley, where"
TOKEN = "benchmark-token"


@dataclass(frozen=True)
class DecodeRun:
    """One timed generation: tokens generated and seconds from the first to the last."""

    tokens: int
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens - 1) / self.decode_seconds


@dataclass(frozen=True)
class Server:
    """An OpenAI-compatible server started for a benchmark: where it listens and what to call it."""

    base_url: str
    model: str
    api_key: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, max_retries=0, timeout=600)


SHAPES = ("demo", "benchmark")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model directory (default: a random-weight model, see --shape)")
    parser.add_argument(
        "--shape",
        choices=SHAPES,
        default="demo",
        help="without --model: the demo model (2 layers, hidden size 64: serving costs more than "
        "computing a token) or a larger random-weight one (12 layers, hidden size 512)",
    )


@contextmanager
def model_directory(requested: str | None, shape: str = "demo") -> Iterator[Path]:
    """``--model`` as given, or a random-weight model of ``shape`` written to a temporary directory."""
    if requested:
        yield Path(requested).expanduser()
        return
    from genmlx.demo_model import BENCHMARK_SHAPE, DEMO_SHAPE, write_demo_model

    with tempfile.TemporaryDirectory(prefix="genmlx-bench-") as work:
        model_shape = BENCHMARK_SHAPE if shape == "benchmark" else DEMO_SHAPE
        yield write_demo_model(Path(work) / f"{shape}-llama", shape=model_shape)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_process(args: list[str], health_url: str, log_path: Path) -> Iterator[None]:
    """Run ``args`` until the block ends; returns once ``health_url`` answers 200."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GENMLX_API_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(health_url, process, log_path)
            yield
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
    with running_process(args, base_url + "/health", log_path):
        yield Server(base_url, SERVED_NAME, TOKEN)


def time_ours(server: Server, tokens: int) -> DecodeRun:
    stream = server.client().completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals: list[float] = []
    generated = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
        if chunk.usage is not None:
            generated = chunk.usage.completion_tokens
    return DecodeRun(generated, arrivals[-1] - arrivals[0])


def time_baseline(model, tokenizer, tokens: int) -> DecodeRun:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    prompt = list(completion_prompt_tokens(tokenizer, PROMPT))  # the very tokens our API generates from
    arrivals: list[float] = []
    generated = 0
    for response in stream_generate(model, tokenizer, prompt, max_tokens=tokens, sampler=make_sampler(0.0)):
        arrivals.append(time.perf_counter())
        generated = response.generation_tokens
    return DecodeRun(generated, arrivals[-1] - arrivals[0])


def median_rate(runs: list[DecodeRun]) -> float:
    return statistics.median(run.tokens_per_second for run in runs)


def paired_ratios(ours: list[float], baseline: list[float]) -> str:
    """The median and range of the rounds' ratios, ours over the baseline of the same round."""
    ratios = sorted(o / b for o, b in zip(ours, baseline, strict=True))
    return f"{statistics.median(ratios):.3f} (rounds {ratios[0]:.3f}-{ratios[-1]:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per generation")
    parser.add_argument("--rounds", type=int, default=5, help="timed generations per side")
    options = parser.parse_args()
    from mlx_lm import load

    with model_directory(options.model, options.shape) as model_dir, tempfile.TemporaryDirectory() as work:
        model, tokenizer = load(str(model_dir))
        with our_dispatcher(model_dir, Path(work)) as server:
            time_ours(server, 16)  # warm-up: compiled kernels, caches, connections
            time_baseline(model, tokenizer, 16)
            ours: list[DecodeRun] = []
            baseline: list[DecodeRun] = []
            for _ in range(options.rounds):
                ours.append(time_ours(server, options.tokens))
                baseline.append(time_baseline(model, tokenizer, options.tokens))
    report(model_dir, ours, baseline)


def report(model_dir: Path, ours: list[DecodeRun], baseline: list[DecodeRun]) -> None:
    print(f"model: {model_dir}")
    print(f"tokens per run: ours {[r.tokens for r in ours]}, mlx-lm {[r.tokens for r in baseline]}")
    print(f"ours (HTTP, streamed)        : {median_rate(ours):8.1f} decode tokens/s (median)")
    print(f"mlx-lm stream_generate       : {median_rate(baseline):8.1f} decode tokens/s (median)")
    rates = ([r.tokens_per_second for r in ours], [r.tokens_per_second for r in baseline])
    print(f"ratio ours / mlx-lm          : {paired_ratios(*rates)}")


if __name__ == "__main__":
    main()
