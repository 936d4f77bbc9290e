"""How fast the cluster acts: from `genmlx apply` to the first token, and from a killed rank to the
first token again, each over the time a bare dispatcher takes from its start to its first token.

    python benchmarks/rollout_latency.py [--model DIR] [--rounds 3] [--nodes 1]

Everything runs as real processes on 127.0.0.1: a master and ``--nodes`` agents (loopback, declared
addresses), the model (the demo model unless ``--model``) already in the first agent's storage, so
no copy is timed when ``--nodes`` is 1 (with 2, the first apply also syncs it to the second agent,
and only later rounds, which find it there, are timed alike).

- baseline: ``python -m genmlx.dispatcher`` started by hand; timed from the spawn to the first
  streamed token of a completion sent as soon as ``/health`` says 200. It is the floor: process
  start, imports, loading the weights.
- apply: the manifest gains the model, `genmlx apply` runs; timed from just before `apply` to the
  first streamed token through the master's ``/v1``. The master must notice, plan, ask the agent
  to start the rank(s), see them load, pass the canary, then route. Between rounds the model is
  removed again and its ranks are gone before the next round starts.
- kill: with the model served, rank 0's process gets SIGKILL; timed from the kill to the first
  streamed token through the master again (requests are retried until one streams a token).

Rounds alternate between the three so background load reaches each alike; medians are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
from decode_throughput import TOKEN, free_port, model_directory, running_process

MODEL = "bench"
POLL_S = 0.05


class Cluster:
    """A master and agents on loopback, driven through the real CLI."""

    def __init__(self, work: Path, model_dir: Path, nodes: int, serving: str = ""):
        """``serving``: more of the model's ``serving`` fields, as YAML flow text (``maxBatch: 4``)."""
        self.work = work
        self.serving_fields = f", {serving}" if serving else ""
        self.home = work / "home"
        self.home.mkdir()
        (self.home / "token").write_text(TOKEN + "\n")
        (self.home / "token").chmod(0o600)
        self.env = {
            **os.environ,
            "GENMLX_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
        }
        self.env.update(GENMLX_DISCOVERY="off", GENMLX_CANARY_INTERVAL_S="30")
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.ports = {name: free_port() for name in ["master", *self.names]}
        # Where the ranks' HTTP and ring ports start: free, so a test run beside the bench never clashes.
        self.serving_port, self.mesh_port = free_port(), free_port()
        self.storage = {name: work / f"storage-{name}" for name in self.names}
        for path in self.storage.values():
            path.mkdir()
        shutil.copytree(model_dir, self.storage[self.names[0]] / MODEL)
        self.manifest = work / "cluster.yaml"
        self.write_manifest(serving=False)
        self.procs: list[subprocess.Popen] = []
        for name in self.names:
            storage, port = str(self.storage[name]), str(self.ports[name])
            self.spawn("agent", "--name", name, "--storage", storage, "--port", port, "--host", "127.0.0.1")
        self.spawn("master", "-f", str(self.manifest), "--host", "127.0.0.1")
        self.url = f"http://127.0.0.1:{self.ports['master']}"
        wait_for(lambda: self.status() is not None, 60, "the master")

    def spawn(self, *args: str) -> None:
        with open(self.work / f"{args[0]}-{len(self.procs)}.log", "wb") as log:
            command = [sys.executable, "-m", "genmlx", *args]
            self.procs.append(subprocess.Popen(command, stdout=log, stderr=log, env=self.env))

    def write_manifest(self, serving: bool) -> None:
        nodes = "".join(
            f"    - {{name: {n}, address: '127.0.0.1:{self.ports[n]}', "
            f"storage: [{{path: '{self.storage[n]}'}}]}}\n"
            for n in self.names
        )
        source = self.storage[self.names[0]] / MODEL
        model = (
            f"    - {{name: {MODEL}, source: 'file://{source}', nodes: [{', '.join(self.names)}], "
            f"serving: {{port: {self.serving_port}{self.serving_fields}}}}}\n"
        )
        models = model if serving else "    []\n"
        self.manifest.write_text(
            "apiVersion: genmlx/v1\nkind: Cluster\nmetadata: {name: bench}\nspec:\n"
            f"  master: {{node: n1, port: {self.ports['master']}}}\n  nodes:\n{nodes}"
            f"  mesh: {{port: {self.mesh_port}}}\n  models:\n{models}"
        )

    def apply(self, serving: bool) -> None:
        self.write_manifest(serving)
        command = [sys.executable, "-m", "genmlx", "apply", "-f", str(self.manifest), "--master", self.url]
        subprocess.run(command, env=self.env, check=True, capture_output=True, timeout=60)

    def status(self) -> dict | None:
        request = urllib.request.Request(
            f"{self.url}/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def ranks(self) -> list[dict]:
        document = self.status() or {"nodes": []}
        return [
            r for node in document["nodes"] for r in node.get("ranks", []) if r["launch"]["model"] == MODEL
        ]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            proc.wait(60)


def first_token(base_url: str, deadline_s: float = 600) -> float:
    """Stream completions until one yields a token; the time it arrived (``time.monotonic``)."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=TOKEN, max_retries=0, timeout=30)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            stream = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    stream.close()
                    return time.monotonic()
        except openai.APIError:
            pass
        time.sleep(POLL_S)
    sys.exit(f"no token from {base_url} within {deadline_s:.0f}s")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    sys.exit(f"timed out waiting for {what}")


def time_baseline(model_dir: Path, work: Path) -> float:
    port = free_port()
    args = [sys.executable, "-m", "genmlx.dispatcher", "--model", str(model_dir), "--name", MODEL]
    started = time.monotonic()
    with running_process([*args, "--port", str(port)], f"http://127.0.0.1:{port}/health", work / "bare.log"):
        return first_token(f"http://127.0.0.1:{port}") - started


def time_apply(cluster: Cluster) -> float:
    wait_for(lambda: not cluster.ranks(), 120, "the model's ranks to be gone")
    started = time.monotonic()
    cluster.apply(serving=True)
    return first_token(cluster.url) - started


def time_kill(cluster: Cluster) -> float:
    first_token(cluster.url)  # serving now
    rank0 = next(r for r in cluster.ranks() if r["launch"]["rank"] == 0 and r["state"] == "running")
    started = time.monotonic()
    os.kill(rank0["pid"], signal.SIGKILL)
    wait_for(lambda: all(r["pid"] != rank0["pid"] for r in cluster.ranks()), 120, "the master to notice")
    return first_token(cluster.url) - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model directory (default: the demo model)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each")
    parser.add_argument("--nodes", type=int, default=1, choices=(1, 2), help="agents the model spans")
    options = parser.parse_args()
    with model_directory(options.model) as model_dir, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cluster = Cluster(work, model_dir, options.nodes)
        try:
            if options.nodes > 1:  # the first apply also copies the model: not what is timed
                time_apply(cluster)
                cluster.apply(serving=False)
            times: dict[str, list[float]] = {"baseline": [], "apply": [], "kill": []}
            for _ in range(options.rounds):
                times["baseline"].append(time_baseline(model_dir, work))
                times["apply"].append(time_apply(cluster))
                times["kill"].append(time_kill(cluster))
                cluster.apply(serving=False)
        finally:
            cluster.stop()
    report(model_dir, options.nodes, times)


def report(model_dir: Path, nodes: int, times: dict[str, list[float]]) -> None:
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"model: {model_dir} on {nodes} node(s)")
    for name, values in times.items():
        print(f"{name:<9}: median {median[name]:6.2f}s  runs {', '.join(f'{v:.2f}' for v in values)}")
    print(f"apply to first token / bare start to first token: {median['apply'] / median['baseline']:6.2f}")
    print(f"kill to first token  / bare start to first token: {median['kill'] / median['baseline']:6.2f}")


if __name__ == "__main__":
    main()
