"""A two-rank group whose ranks run on different MLX builds, over MLX's ring backend: rank 0 on the
CUDA GPU, rank 1 on MLX's CPU build, as a Linux GPU node and a node without CUDA (a Mac's ranks
meet a Linux node's the same way: over the ring, the only backend both have). Checks that the
group loads, serves greedy completions through the real ``openai`` client, and stays in step, in
a pipeline and in a tensor split, greedy and sampled (where every rank samples each token and the
group compares them), and prints its answers beside one rank's on each build alone.

    python benchmarks/gpu/mixed_group.py --cuda-path SITE --cpu-path SITE [--work DIR]

``--cuda-path`` and ``--cpu-path`` are what each rank's ``PYTHONPATH`` adds after this repository:
a directory with MLX and its CUDA build (and GenMLX's other dependencies), and one with MLX and its
CPU build alone, put first so that rank's ``mlx`` comes from it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import openai

from genmlx.demo.pipeline_model import write_demo_pipeline_model
from genmlx.demo.random_model import write_demo_model

REPOSITORY = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY / "benchmarks"))  # the benchmarks' shared helpers
from decode_throughput import free_port, wait_healthy  # noqa: E402

TOKEN = "mixed-group-check"
PROMPTS = ("Rivers", "The sea at night", "Copper is", "Once upon a time")


def environment(path: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPOSITORY}:{path}", "GENMLX_API_TOKEN": TOKEN}


def device_of(path: str) -> str:
    probe = "import mlx.core as mx; print(mx.default_device())"
    return subprocess.run(
        [sys.executable, "-c", probe], env=environment(path), capture_output=True, text=True, check=True
    ).stdout.strip()


@contextmanager
def rank(model: Path, path: str, log: Path, flags: list[str]):
    port = free_port()
    args = [sys.executable, "-m", "genmlx.dispatcher", "--model", str(model), "--name", "demo"]
    with log.open("w") as out:
        process = subprocess.Popen(
            [*args, "--port", str(port), *flags], env=environment(path), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield port, process
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def answers(port: int) -> list[str]:
    """Each prompt's greedy completion, then a seeded sampled one (every rank samples each step and
    the group compares their tokens: a rank whose sampling rounded differently would break it)."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    greedy = {"temperature": 0, "max_tokens": 24}
    return [
        client.completions.create(model="demo", prompt=prompt, **settings).choices[0].text
        for settings in (greedy, {"temperature": 1, "top_p": 0.9, "seed": 7, "max_tokens": 48})
        for prompt in PROMPTS
    ]


def alone(model: Path, path: str, work: Path) -> list[str]:
    with rank(model, path, work / "alone.log", []) as (port, process):
        wait_healthy(f"http://127.0.0.1:{port}/health", process, work / "alone.log")
        return answers(port)


def group(model: Path, paths: list[str], work: Path, flags: list[str]) -> list[str]:
    hostfile = work / "hostfile.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in paths]))
    with ExitStack() as stack:
        ranks = []
        for r, path in enumerate(paths):
            log = work / f"rank{r}.log"
            group_flags = ["--rank", str(r), "--world-size", str(len(paths)), "--hostfile", str(hostfile)]
            ranks.append((*stack.enter_context(rank(model, path, log, [*group_flags, *flags])), log))
        for port, process, log in ranks:
            wait_healthy(f"http://127.0.0.1:{port}/health", process, log)
        replies = answers(ranks[0][0])
        for r, (_, process, log) in enumerate(ranks):
            if process.poll() is not None:
                sys.exit(
                    f"rank {r} exited with {process.returncode} while serving:\n{log.read_text()[-3000:]}"
                )
        return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-path", required=True, help="PYTHONPATH entries of the CUDA rank")
    parser.add_argument(
        "--cpu-path", required=True, help="PYTHONPATH entries of the CPU rank (MLX's CPU build first)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/genmlx-mixed"))
    options = parser.parse_args()
    paths = [options.cuda_path, options.cpu_path]
    print("rank 0:", device_of(paths[0]), "| rank 1:", device_of(paths[1]))
    models = {
        "pipeline": write_demo_pipeline_model(options.work / "models" / "demo-qwen2"),
        "tensor": write_demo_model(options.work / "models" / "demo-llama"),
    }
    failed = False
    for parallelism, model in models.items():
        work = options.work / parallelism
        work.mkdir(parents=True, exist_ok=True)
        on_gpu, on_cpu = alone(model, paths[0], work), alone(model, paths[1], work)
        started = time.monotonic()
        together = group(model, paths, work, ["--parallelism", parallelism])
        took = time.monotonic() - started
        print(f"== {parallelism}: the group served {len(together)} completions in {took:.0f} s")
        labels = [f"{p!r}, {how}" for how in ("greedy", "sampled") for p in PROMPTS]
        for label, mixed, gpu, cpu in zip(labels, together, on_gpu, on_cpu, strict=True):
            same = {"GPU": mixed == gpu, "CPU": mixed == cpu}
            print(f"{label}: " + ", ".join(f"{'=' if s else '≠'} {d} alone" for d, s in same.items()))
        failed |= not all(t.strip() for t in together)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
