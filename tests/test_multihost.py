"""A cluster of three hosts on the network-namespace bench, found by zeroconf alone: a model on
one host is synced over the bridge to the host it is placed on and served there, through the
master; a killed agent comes back without the model being copied again."""

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
from conftest import wait_until
from netbench import NetBench

from genmlx.core.home import ensure_token, read_token

pytestmark = pytest.mark.e2e  # every test here starts real processes

MASTER_PORT, AGENT_PORT = 6789, 6790


def genmlx(*argv: str) -> list[str]:
    return [sys.executable, "-m", "genmlx", *argv]


def write_home(root: Path, name: str, token: str) -> Path:
    home = root / name
    (home / "models").mkdir(parents=True)
    (home / "token").write_text(token + "\n")
    (home / "token").chmod(0o600)
    return home


def apply_manifest(manifest: Path, url: str, home: Path) -> subprocess.CompletedProcess:
    """``genmlx apply -f manifest`` against the master at ``url``, with the token in ``home``; it
    must succeed."""
    applied = subprocess.run(
        genmlx("apply", "-f", str(manifest), "--master", url),
        env={**os.environ, "GENMLX_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert applied.returncode == 0, applied.stderr
    return applied


def status(url: str, token: str) -> dict | None:
    request = urllib.request.Request(f"{url}/api/v1/status", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return json.loads(response.read())
    except OSError:
        return None


def test_a_model_crosses_hosts_by_peer_sync_and_survives_an_agent_restart(
    netns_hosts, tmp_path, demo_model_dir
):
    bench: NetBench = netns_hosts(2)
    token = read_token(ensure_token(tmp_path / "token")[0])
    homes = {name: write_home(tmp_path, name, token) for name in ("n1", "n2")}
    shutil.copytree(demo_model_dir, homes["n1"] / "models" / "demo")
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(f"""\
apiVersion: genmlx/v1
kind: Cluster
metadata: {{name: bench}}
spec:
  master: {{node: n1}}
  nodes:
    - {{name: n1, storage: [{{path: {homes["n1"] / "models"}}}]}}
    - {{name: n2, storage: [{{path: {homes["n2"] / "models"}}}]}}
  models:
    - {{name: demo, source: "file://{homes["n1"] / "models" / "demo"}", nodes: [n2]}}
""")

    def agent(host: int, name: str):
        env = {"GENMLX_HOME": str(homes[name])}
        return bench.run(
            host, genmlx("agent", "--name", name, "--storage", str(homes[name] / "models")), name, env
        )

    agents = {"n1": agent(0, "n1"), "n2": agent(1, "n2")}
    bench.run(0, genmlx("master", "-f", str(manifest)), "master", {"GENMLX_HOME": str(homes["n1"])})
    url = f"http://{bench.host(0).address}:{MASTER_PORT}"

    def ready() -> dict | None:
        document = status(url, token)
        return document if document and document["conditions"][0]["status"] == "True" else None

    document = wait_until(ready, 120, what="the model to serve on n2")
    (model,) = document["models"]
    assert model["endpoint"] == f"http://{bench.host(1).address}:8100/v1"
    assert {c["node"] for c in model["copies"]} == {"n1", "n2"}
    copied = homes["n2"] / "models" / "demo"
    assert (copied / "model.safetensors").read_bytes() == (demo_model_dir / "model.safetensors").read_bytes()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=60)
    assert client.completions.create(model="demo", prompt="hi", max_tokens=3).usage.completion_tokens == 3

    # Killed, its rank goes with it; restarted, it serves again from the copy it already has.
    published = (copied / ".genmlx-model.json").stat().st_mtime_ns
    agents["n2"].signal(signal.SIGKILL)
    wait_until(
        lambda: (d := status(url, token)) and d["conditions"][0]["status"] == "False",
        30,
        what="the master to notice",
    )
    agents["n2"] = agent(1, "n2")
    document = wait_until(ready, 120, what="the model to serve again")
    node = next(n for n in document["nodes"] if n["name"] == "n2")
    assert node["transfers"] == []
    assert (copied / ".genmlx-model.json").stat().st_mtime_ns == published
    assert client.completions.create(model="demo", prompt="again", max_tokens=2).usage.completion_tokens == 2


def test_three_hosts_serve_a_tensor_parallel_pair_and_a_single_and_follow_the_manifest(
    netns_hosts, tmp_path, demo_model_dir
):
    bench: NetBench = netns_hosts(3)
    token = read_token(ensure_token(tmp_path / "token")[0])
    names = ("n1", "n2", "n3")
    homes = {name: write_home(tmp_path, name, token) for name in names}
    shutil.copytree(demo_model_dir, homes["n1"] / "models" / "demo")
    manifest = tmp_path / "cluster.yaml"
    source = f"file://{homes['n1'] / 'models' / 'demo'}"

    def write_manifest(models: str) -> None:
        nodes = "".join(f"    - {{name: {n}, storage: [{{path: {homes[n] / 'models'}}}]}}\n" for n in names)
        manifest.write_text(
            "apiVersion: genmlx/v1\nkind: Cluster\nmetadata: {name: bench}\nspec:\n"
            f"  master: {{node: n1}}\n  nodes:\n{nodes}  models:\n{models}"
        )

    pair = f'    - {{name: pair, source: "{source}", nodes: [n1, n2], parallelism: tensor}}\n'
    write_manifest(pair + f'    - {{name: solo, source: "{source}", nodes: [n3]}}\n')
    agents = {
        name: bench.run(
            i,
            genmlx("agent", "--name", name, "--storage", str(homes[name] / "models")),
            name,
            {"GENMLX_HOME": str(homes[name])},
        )
        for i, name in enumerate(names)
    }
    master_env = {"GENMLX_HOME": str(homes["n1"]), "GENMLX_CANARY_INTERVAL_S": "2"}
    master = bench.run(0, genmlx("master", "-f", str(manifest)), "master", master_env)
    url = f"http://{bench.host(0).address}:{MASTER_PORT}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=60)

    def models_serving(**wanted: str) -> dict | None:
        """The status once every model named is Serving on the nodes given ("n1,n2")."""
        document = status(url, token)
        models = {m["name"]: m for m in document["models"]} if document else {}
        for name, nodes in wanted.items():
            model = models.get(name)
            if not model or model["conditions"][0]["reason"] != "Serving":
                return None
            if [r["node"] for r in model["ranks"]] != nodes.split(","):
                return None
        return document

    def ask(model: str) -> int:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
        )
        return reply.usage.completion_tokens

    document = wait_until(lambda: models_serving(pair="n1,n2", solo="n3"), 240, what="both models")
    assert ask("pair") == ask("solo") == 3
    pair_ranks = next(m for m in document["models"] if m["name"] == "pair")["ranks"]
    assert {r["launch"]["parallelism"] for r in pair_ranks} == {"tensor"}
    hostfile = pair_ranks[0]["launch"]["hostfile"]
    assert hostfile == [f"{bench.host(0).address}:32323", f"{bench.host(1).address}:32323"]

    # A killed rank (on n2): its whole group is started again and serves.
    killed = next(r["pid"] for r in pair_ranks if r["node"] == "n2")
    os.kill(killed, signal.SIGKILL)

    def pair_restarted() -> dict | None:
        document = models_serving(pair="n1,n2")
        ranks = next(m for m in document["models"] if m["name"] == "pair")["ranks"] if document else []
        return document if ranks and killed not in {r["pid"] for r in ranks} else None

    wait_until(pair_restarted, 180, what="the pair to serve again")
    assert ask("pair") == 3

    # Moved in the manifest, solo follows to n2 (synced there from n1); removed, pair stops.
    write_manifest(f'    - {{name: solo, source: "{source}", nodes: [n2]}}\n')
    applied = apply_manifest(manifest, url, homes["n1"])
    assert "pair" in applied.stdout and "solo" in applied.stdout

    # The master is killed mid-rollout and started again: it converges from what agents report.
    master.signal(signal.SIGKILL)
    master = bench.run(0, genmlx("master"), "master-again", master_env)

    def converged() -> dict | None:
        # Serving on n2 comes first (make before break); the rank left on n3 is stopped after.
        document = models_serving(solo="n2")
        nodes = document["nodes"] if document else []
        running = {(n["name"], r["launch"]["model"]) for n in nodes for r in n["ranks"]}
        return document if running == {("n2", "solo")} else None

    document = wait_until(converged, 240, what="solo on n2 and nothing else running")
    assert [m["name"] for m in document["models"]] == ["solo"]
    running = {(n["name"], r["launch"]["model"]) for n in document["nodes"] for r in n["ranks"]}
    assert running == {("n2", "solo")}
    assert ask("solo") == 3
    assert agents["n3"].popen.poll() is None
