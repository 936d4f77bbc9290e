"""Model rollout across two agents, driven by the master: a model on one node is copied to the
node it is placed on by peer sync, then served there. Real processes on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import Proc, ServingPorts, free_port, free_ports, wait_until

from genmlx.core.home import ensure_token, read_token

pytestmark = pytest.mark.e2e  # every test here starts real processes


class TwoNodes:
    """A master and agents a and b, each agent with its own storage path."""

    def __init__(self, root: Path, models: str, agent_env: dict[str, str] | None = None, preload=None):
        self.root = root
        self.home = root / "home"
        self.token = read_token(ensure_token(self.home / "token")[0])
        self.env = {**os.environ, "GENMLX_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        # A canary every second, hung after 5 s without an answer: self-healing within a test's time.
        self.env.update(GENMLX_CANARY_INTERVAL_S="1", GENMLX_CANARY_TIMEOUT_S="5")
        self.ports = {"master": free_port(), "a": free_port(), "b": free_port()}
        # Ranks start on free ports (both agents share loopback): no clash with another suite.
        self.serving_ports, self.mesh_port = ServingPorts(), free_ports(4)
        self.storage = {n: root / f"storage-{n}" for n in "ab"}
        for path in self.storage.values():
            path.mkdir(parents=True)
        for node, (model_dir, name) in (preload or {}).items():
            shutil.copytree(model_dir, self.storage[node] / name)
        self.procs: list[Proc] = []
        self.manifest = root / "cluster.yaml"
        self.manifest.write_text(
            self.manifest_text(models.format(**{f"storage_{n}": p for n, p in self.storage.items()}))
        )
        agent_env = {**self.env, **(agent_env or {})}
        for name in "ab":
            self.start(
                agent_env,
                "agent",
                "--name",
                name,
                "--storage",
                str(self.storage[name]),
                "--port",
                str(self.ports[name]),
                "--host",
                "127.0.0.1",
            )
        self.start(self.env, "master", "-f", str(self.manifest), "--host", "127.0.0.1")

    def manifest_text(self, models: str) -> str:
        nodes = "".join(
            f"    - {{name: {n}, address: '127.0.0.1:{self.ports[n]}', storage: [{{path: '{path}'}}]}}\n"
            for n, path in self.storage.items()
        )
        return (
            "apiVersion: genmlx/v1\nkind: Cluster\nmetadata: {name: two}\nspec:\n"
            f"  master: {{node: a, port: {self.ports['master']}}}\n  nodes:\n{nodes}"
            f"  mesh: {{port: {self.mesh_port}}}\n  models:\n{self.serving_ports.set_in(models)}"
        )

    def start(self, env: dict[str, str], *args: str) -> Proc:
        log = self.root / f"{args[0]}.{len(self.procs)}.log"
        proc = Proc([sys.executable, "-m", "genmlx", *args], log, env)
        self.procs.append(proc)
        return proc

    def apply(self, models: str) -> subprocess.CompletedProcess:
        """Rewrite the manifest with ``models`` and apply it with `genmlx apply`."""
        self.manifest.write_text(self.manifest_text(models))
        command = [sys.executable, "-m", "genmlx", "apply", "-f", str(self.manifest)]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)

    def status(self) -> dict | None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports['master']}/api/v1/status",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def wait_ready(self, timeout: float = 120) -> dict:
        def ready() -> dict | None:
            document = self.status()
            return document if document and document["conditions"][0]["status"] == "True" else None

        return wait_until(ready, timeout, what="the cluster to be Ready")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.ports['master']}/v1",
            api_key=self.token,
            max_retries=0,
            timeout=60,
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
            print(f"----- {' '.join(proc.args[3:])} -----\n{proc.output()}")


@pytest.fixture
def two_nodes(tmp_path):
    clusters: list[TwoNodes] = []

    def start(models: str, agent_env: dict[str, str] | None = None, preload=None) -> TwoNodes:
        clusters.append(TwoNodes(tmp_path, models, agent_env, preload))
        return clusters[-1]

    yield start
    for cluster in clusters:
        cluster.stop()


def test_a_model_on_one_node_is_synced_to_the_node_it_is_placed_on_and_served_there(
    two_nodes, demo_model_dir
):
    models = "    - {{name: demo, source: 'file://{storage_a}/demo', nodes: [b]}}\n"
    cluster = two_nodes(models, preload={"a": (demo_model_dir, "demo")})
    document = cluster.wait_ready()
    (model,) = document["models"]
    assert model["ranks"][0]["node"] == "b"
    node_b = next(n for n in document["nodes"] if n["name"] == "b")
    (copy,) = [m for s in node_b["storage"] for m in s["models"]]
    assert copy["complete"] and copy["source"] == f"file://{cluster.storage['a']}/demo"
    originals = {
        p.relative_to(demo_model_dir): p.read_bytes() for p in demo_model_dir.rglob("*") if p.is_file()
    }
    copied = cluster.storage["b"] / "demo"
    assert all((copied / rel).read_bytes() == data for rel, data in originals.items())
    reply = cluster.client().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.usage.completion_tokens == 3


@pytest.fixture
def hub(tmp_path):
    from fakehub import FakeHub

    fake = FakeHub().start()
    yield fake
    fake.stop()


def test_a_hub_model_is_downloaded_once_then_copied_between_nodes(two_nodes, hub, demo_model_dir, tmp_path):
    from fakehub import files_from_dir

    files = files_from_dir(demo_model_dir)
    commit = hub.add_commit("genmlx/demo-llama", files)
    hubbed = "    - {{name: hubbed, source: 'hf://genmlx/demo-llama', nodes: [a, b]}}\n"
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
    cluster = two_nodes(hubbed, agent_env=env)

    def model_reason(name: str, reason: str) -> dict | None:
        document = cluster.status()
        models = {m["name"]: m for m in document["models"]} if document else {}
        return document if name in models and models[name]["conditions"][0]["reason"] == reason else None

    # Downloaded once, copied to the other node, then served by a two-rank group across both.
    document = wait_until(lambda: model_reason("hubbed", "Serving"), 120, what="a group across a and b")
    copies = {(n["name"], m["name"]): m for n in document["nodes"] for s in n["storage"] for m in s["models"]}
    assert set(copies) == {("a", "hubbed"), ("b", "hubbed")}
    assert all(m["complete"] and m["commit"] == commit for m in copies.values())
    weights = [name for name in files if name.endswith(".safetensors")]
    assert weights and all(hub.bytes_served[name] == len(files[name]) for name in weights)
    (model,) = [m for m in document["models"] if m["name"] == "hubbed"]
    assert [(r["node"], r["launch"]["rank"], r["launch"]["worldSize"]) for r in model["ranks"]] == [
        ("a", 0, 2),
        ("b", 1, 2),
    ]
    reply = cluster.client().chat.completions.create(
        model="hubbed", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert reply.usage.completion_tokens == 3

    # A second model of the same repo and revision uses the copy already on its node.
    solo = "    - {{name: solo, source: 'hf://genmlx/demo-llama', nodes: [b]}}\n"
    applied = cluster.apply((hubbed + solo).format())
    assert applied.returncode == 0, applied.stderr
    assert "+ start solo" in applied.stdout and "download" not in applied.stdout
    wait_until(lambda: model_reason("solo", "Serving"), 120, what="solo to serve")
    reply = cluster.client().completions.create(model="solo", prompt="hi", max_tokens=2)
    assert reply.usage.completion_tokens == 2
    assert all(hub.bytes_served[name] == len(files[name]) for name in weights)


def test_a_new_revision_replaces_the_copy_and_restarts_the_group(two_nodes, hub, demo_model_dir, tmp_path):
    from fakehub import files_from_dir

    from genmlx.demo.random_model import write_demo_model

    first = hub.add_commit("genmlx/demo-llama", files_from_dir(demo_model_dir))
    second = hub.add_commit(
        "genmlx/demo-llama", files_from_dir(write_demo_model(tmp_path / "v2", seed=1)), ref="v2"
    )
    model = "    - {{name: solo, source: 'hf://genmlx/demo-llama', revision: {revision}, nodes: [a]}}\n"
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
    cluster = two_nodes(model.replace("{revision}", "main"), agent_env=env)

    def serving(commit: str) -> dict | None:
        document = cluster.status()
        if not document or document["conditions"][0]["status"] != "True":
            return None
        (solo,) = document["models"]
        return solo if [c["commit"] for c in solo["copies"]] == [commit] else None

    before = wait_until(lambda: serving(first), 120, what="main to serve")
    applied = cluster.apply(model.replace("{revision}", "v2").format())
    assert applied.returncode == 0, applied.stderr
    assert "+ download solo" in applied.stdout
    after = wait_until(lambda: serving(second), 120, what="v2 to serve")
    assert after["ranks"][0]["pid"] != before["ranks"][0]["pid"]
    assert after["copies"][0]["path"] == before["copies"][0]["path"]  # replaced in place, once verified


def test_a_group_across_two_nodes_heals_a_killed_rank_and_a_hung_one(two_nodes, demo_model_dir):
    shared = "    - {{name: shared, source: 'file://{storage_a}/demo', nodes: [a, b]}}\n"
    cluster = two_nodes(shared, preload={"a": (demo_model_dir, "demo")})

    def serving_group(other_than: set[int]) -> dict | None:
        document = cluster.status()
        models = {m["name"]: m for m in document["models"]} if document else {}
        model = models.get("shared")
        if not model or model["conditions"][0]["reason"] != "Serving":
            return None
        pids = {r["pid"] for r in model["ranks"]}
        return model if len(pids) == 2 and not pids & other_than else None

    def chat() -> int:
        reply = cluster.client().chat.completions.create(
            model="shared", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
        )
        return reply.usage.completion_tokens

    first = wait_until(lambda: serving_group(set()), 120, what="the group to serve")
    assert chat() == 2
    pids = {r["pid"] for r in first["ranks"]}

    # A killed rank takes its group down; the master starts the whole group again.
    os.kill(next(r["pid"] for r in first["ranks"] if r["launch"]["rank"] == 1), signal.SIGKILL)
    second = wait_until(lambda: serving_group(pids), 120, what="the group to serve again")
    assert chat() == 2
    pids = {r["pid"] for r in second["ranks"]}

    # A stopped rank leaves rank 0 answering /health but generating nothing: the canary notices.
    os.kill(next(r["pid"] for r in second["ranks"] if r["launch"]["rank"] == 1), signal.SIGSTOP)
    wait_until(lambda: serving_group(pids), 120, what="the hung group to be replaced")
    assert chat() == 2
    master = next(proc for proc in cluster.procs if "master" in proc.args)
    assert "shared: canary failed" in master.output()
