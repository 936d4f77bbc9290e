"""A one-node cluster on this machine's NVIDIA GPU, as a user runs one: ``genmlx up`` on a manifest
that serves ``--model`` from this node, then a completion through the master.

    python benchmarks/gpu/cluster_check.py --model DIR [--work DIR]

Checks, printing each: the agent reports MLX on CUDA and the GPU (name, memory, driver) through
NVML; placement counted the GPU's memory and derived the batch from it (``models[].batching``);
the model becomes Ready; the master answers a chat completion through the ``openai`` client; and
the rank runs on the GPU (NVML lists its process, or, where the GPU's process list is hidden from
this container, the GPU's memory in use grew by at least the weights' size once it loaded).
Exits 1 at the first check that fails.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import pynvml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fail(what: str) -> None:
    print(f"FAILED: {what}", flush=True)
    sys.exit(1)


def status(port: int, token: str) -> dict | None:
    """The master's status document, as `genmlx status` asks for it (signed); None until it answers."""
    from genmlx.cli.master_client import MasterUnreachable, call_master

    try:
        return call_master(f"http://127.0.0.1:{port}", token, "GET", "/api/v1/status", timeout=5)
    except MasterUnreachable:
        return None


def gpu_memory_used() -> int:
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used


def gpu_pids() -> set[int]:
    device = pynvml.nvmlDeviceGetHandleByIndex(0)
    return {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(device)}


def manifest(port: int, serving_port: int, storage: Path, model: Path) -> str:
    return f"""\
apiVersion: genmlx/v1
kind: Cluster
metadata: {{name: gpu-check}}
spec:
  master: {{node: gpu, port: {port}}}
  nodes:
    - {{name: gpu, storage: [{{path: {storage}}}]}}
  models:
    - {{name: {model.name}, source: "file://{model}", nodes: [gpu], serving: {{port: {serving_port}}}}}
"""


def run(model: Path, work: Path) -> None:
    from genmlx.core.home import ensure_token, read_token

    storage = model.parent  # a file:// source is served from a storage path that holds it
    os.environ.update(GENMLX_HOME=str(work / "home"), GENMLX_DISCOVERY="off", PYTHONUNBUFFERED="1")
    ensure_token()
    token = read_token()
    port = free_port()
    (work / "cluster.yaml").write_text(manifest(port, free_port(), storage, model))
    pynvml.nvmlInit()
    before = gpu_memory_used()
    command = [sys.executable, "-m", "genmlx", "up", "-f", str(work / "cluster.yaml")]
    with open(work / "up.log", "wb") as log:
        up = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            report(wait_ready(port, token, up), model, port, token, before)
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(60)
            print("--- genmlx up's log (last 40 lines) ---")
            print("\n".join((work / "up.log").read_text(errors="replace").splitlines()[-40:]))


def wait_ready(port: int, token: str, up: subprocess.Popen) -> dict:
    started, last = time.monotonic(), ""
    while time.monotonic() - started < 420:
        if up.poll() is not None:
            fail(f"genmlx up exited with {up.returncode}")
        document = status(port, token)
        models = document["models"] if document else []
        if models:
            ready = models[0]["conditions"][0]
            line = f"{ready['status']} {ready['reason']}: {ready['message']}"
            if line != last:
                print(f"[{time.monotonic() - started:5.1f}s] {models[0]['name']}: {line}", flush=True)
                last = line
            if ready["status"] == "True":
                return document
        time.sleep(1)
    fail("the model was not Ready within 7 minutes")


def report(document: dict, model: Path, port: int, token: str, before: int) -> None:
    (node,) = document["nodes"]
    facts = node["facts"]
    print(f"node facts: gpu={facts.get('gpu')!r}, mlx {facts.get('mlxVersion')}, gpus={facts.get('gpus')}")
    if facts.get("gpu") != "CUDA" or not facts.get("gpus"):
        fail("the agent does not report MLX on CUDA with its GPU")
    (served,) = document["models"]
    print(f"batching: {served['batching']['reason']}")
    rank = served["ranks"][0]
    print(f"rank 0: pid {rank['pid']}, serving {rank['launch']['serving']}")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0)
    reply = client.chat.completions.create(
        model=served["name"], messages=[{"role": "user", "content": "Hello"}], max_tokens=16, temperature=0
    )
    print(f"through the master: {reply.usage.completion_tokens} tokens: {reply.choices[0].message.content!r}")
    if reply.usage.completion_tokens < 1:
        fail("no tokens through the master")
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    grown, pids = gpu_memory_used() - before, gpu_pids()
    print(f"GPU memory in use grew by {grown / 1e9:.2f} GB (weights {weights / 1e9:.2f} GB)")
    print(f"NVML lists GPU processes {sorted(pids)}")
    if rank["pid"] not in pids and grown < weights:
        fail("the rank does not run on the GPU")
    print("OK: a one-node cluster on the GPU, Ready, serving through the master")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="the model directory to serve")
    parser.add_argument(
        "--work", type=Path, help="where the cluster keeps its files (default: a temporary one)"
    )
    options = parser.parse_args()
    if options.work:
        options.work.mkdir(parents=True, exist_ok=True)
        run(options.model.resolve(), options.work)
        return
    with tempfile.TemporaryDirectory(prefix="genmlx-gpu-") as work:
        run(options.model.resolve(), Path(work))


if __name__ == "__main__":
    main()
