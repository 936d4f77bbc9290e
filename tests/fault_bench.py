"""A cluster on the network-namespace bench to break on purpose: a master on host 0, an agent on
every host, the demo model served as a tensor group over hosts 0 and 1 unless told otherwise.

``recovered`` times how long the cluster takes to come back after a fault and records it, with
what the user saw, to the file ``GENMLX_RELIABILITY_OUT`` names (JSON lines), from which
``benchmarks/reliability.py`` writes ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import psutil
from conftest import wait_until
from netbench import NetBench

from genmlx.core.home import ensure_token, read_token

MASTER_PORT = 6789
MODEL = "demo"
RECORD_ENV = "GENMLX_RELIABILITY_OUT"


def genmlx(*argv: str) -> list[str]:
    return [sys.executable, "-m", "genmlx", *argv]


class FaultCluster:
    def __init__(
        self,
        bench: NetBench,
        root: Path,
        model_dir: Path,
        model_nodes: tuple[str, ...] = ("n1", "n2"),
        master_env: dict[str, str] | None = None,
        agent_env: dict[str, str] | None = None,
        before_start=None,
    ):
        """``before_start(cluster)`` runs once the homes exist, before any process starts (to
        mount a small filesystem on a storage path, shape a link)."""
        self.bench = bench
        self.root = root
        self.hub = None  # a FakeHub the agents download from, where the test made one
        self.token = read_token(ensure_token(root / "token")[0])
        self.names = tuple(f"n{i + 1}" for i in range(len(bench.hosts)))
        self.homes = {name: self._home(name) for name in self.names}
        self.model_dir = model_dir
        shutil.copytree(model_dir, self.homes["n1"] / "models" / MODEL)
        self.model_nodes = model_nodes
        self.manifest = root / "cluster.yaml"
        self.write_manifest()
        self.agent_env = agent_env or {}
        if before_start is not None:
            before_start(self)
        self.agents = {name: self.start_agent(name) for name in self.names}
        # A canary every 2 s, hung after 5 s without an answer: self-healing within a test's time.
        self.master_env = {
            "GENMLX_HOME": str(self.homes["n1"]),
            "GENMLX_CANARY_INTERVAL_S": "2",
            "GENMLX_CANARY_TIMEOUT_S": "5",
            **(master_env or {}),
        }
        self.master = self.start_master()
        self.url = f"http://{bench.host(0).address}:{MASTER_PORT}"

    def _home(self, name: str) -> Path:
        home = self.root / name
        (home / "models").mkdir(parents=True)
        (home / "token").write_text(self.token + "\n")
        (home / "token").chmod(0o600)
        return home

    def write_manifest(self, model: str | None = None) -> None:
        nodes = "".join(
            f"    - {{name: {n}, storage: [{{path: {self.homes[n] / 'models'}}}]}}\n" for n in self.names
        )
        source = f"file://{self.homes['n1'] / 'models' / MODEL}"
        nodes_list = ", ".join(self.model_nodes)
        model = model or f'    - {{name: {MODEL}, source: "{source}", nodes: [{nodes_list}]}}\n'
        self.manifest.write_text(
            "apiVersion: genmlx/v1\nkind: Cluster\nmetadata: {name: faults}\nspec:\n"
            f"  master: {{node: n1}}\n  nodes:\n{nodes}  models:\n{model}"
        )

    def apply(self, model: str | None = None) -> str:
        """Rewrite the manifest (as ``write_manifest``) and apply it with `genmlx apply`, as a
        user does; what it printed."""
        self.write_manifest(model)
        command = genmlx("apply", "-f", str(self.manifest), "--master", self.url)
        env = {**os.environ, "GENMLX_HOME": str(self.homes["n1"])}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def start_agent(self, name: str, env: dict[str, str] | None = None, wrapper: tuple[str, ...] = ()):
        index = self.names.index(name)
        argv = [*wrapper, *genmlx("agent", "--name", name, "--storage", str(self.homes[name] / "models"))]
        environment = {"GENMLX_HOME": str(self.homes[name]), **self.agent_env, **(env or {})}
        return self.bench.run(index, argv, f"agent-{name}", environment)

    def stop_agent(self, name: str) -> None:
        """Stop the agent (SIGTERM; its ranks go with it), and whatever a wrapper put around it."""
        proc = self.agents[name]
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.stop()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        psutil.wait_procs(children, timeout=15)

    def start_master(self):
        return self.bench.run(0, genmlx("master", "-f", str(self.manifest)), "master", self.master_env)

    # ----- reading -----

    def status(self) -> dict | None:
        request = urllib.request.Request(
            f"{self.url}/api/v1/status", headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=3) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def model(self) -> dict | None:
        document = self.status()
        return next((m for m in document["models"] if m["name"] == MODEL), None) if document else None

    def serving(self) -> dict | None:
        """The model's status once it serves (Ready, every rank running)."""
        model = self.model()
        if not model or model["conditions"][0]["status"] != "True":
            return None
        return model if all(r["state"] == "running" for r in model["ranks"]) else None

    def client(self, timeout: float = 60) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.token, max_retries=0, timeout=timeout)

    def answer(self, max_tokens: int = 12, model: str = MODEL) -> str:
        """A completion at temperature 0: the same text whenever the whole model serves it."""
        reply = self.client().completions.create(
            model=model, prompt="Rivers carry water", max_tokens=max_tokens, temperature=0
        )
        return reply.choices[0].text

    def answers(self, expected: str) -> bool:
        """Whether the model answers now, and with ``expected``."""
        try:
            return self.answer() == expected
        except openai.APIError:
            return False

    def transfer(self, node: str, model: str = MODEL) -> dict | None:
        """The transfer of ``model`` that ``node``'s agent reports last (running, done or failed)."""
        document = self.status()
        for seen in document["nodes"] if document else ():
            if seen["name"] == node:
                return next((t for t in seen.get("transfers", ()) if t["model"] == model), None)
        return None

    def written(self, node: str, model: str = MODEL) -> int:
        """Bytes a transfer of ``model`` to ``node`` has written so far (read from the disk: the
        status trails by a pass)."""
        partial = self.homes[node] / "models" / ".genmlx-partial" / model
        return sum(f.stat().st_size for f in partial.rglob("*") if f.is_file()) if partial.exists() else 0

    def moving(self, node: str, model: str = MODEL, at_least: float = 0.3) -> bool:
        """Whether a transfer of ``model`` to ``node`` has written ``at_least`` of its bytes."""
        size = sum(f.stat().st_size for f in self.model_dir.rglob("*") if f.is_file())
        return self.written(node, model) >= at_least * size

    def published(self, node: str, model: str = MODEL) -> bool:
        return (self.homes[node] / "models" / model).exists()

    def leftovers(self, node: str, model: str = MODEL) -> list[Path]:
        """Whatever of ``model`` lies on ``node`` besides a published copy: its partial directory,
        directories being deleted. None may stay once the model is in place."""
        models = self.homes[node] / "models"
        partial = models / ".genmlx-partial" / model
        deleting = sorted(models.glob(f".genmlx-deleting-{model}-*"))
        return [partial, *deleting] if partial.exists() else deleting

    def rank_pids(self) -> dict[int, int]:
        model = self.model() or {"ranks": []}
        return {r["launch"]["rank"]: r["pid"] for r in model["ranks"] if r["state"] == "running"}

    def stop(self) -> None:
        self.bench.close()


def cluster_status_of(predicate) -> dict | None:
    """The status of the cluster a recovery predicate reads (a bound method or a closure over it)."""
    owner = getattr(predicate, "__self__", None)
    for cell in getattr(predicate, "__closure__", None) or ():
        if isinstance(cell.cell_contents, FaultCluster):
            owner = cell.cell_contents
    return owner.status() if isinstance(owner, FaultCluster) else None


def recovered(scenario: str, predicate, bound_s: float, seen: str, since: float | None = None) -> float:
    """Wait (at most ``bound_s``) until ``predicate`` holds; the seconds since ``since`` (default:
    now), recorded with the scenario, its bound and what the user saw."""
    started = time.monotonic() if since is None else since
    try:
        wait_until(predicate, bound_s - (time.monotonic() - started), what=f"recovery from {scenario}")
    except BaseException:
        document = cluster_status_of(predicate)
        print("status at the bound:", json.dumps(document, indent=1)[:6000] if document else None)
        raise
    elapsed = time.monotonic() - started
    if os.environ.get(RECORD_ENV):
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        record = {"scenario": scenario, "recovery_s": round(elapsed, 1), "bound_s": bound_s}
        with open(os.environ[RECORD_ENV], "a") as out:
            out.write(json.dumps({**record, "seen": seen, "test": test}) + "\n")
    return elapsed
