"""A cluster of three hosts on the network-namespace bench, found by zeroconf alone: a model on
one host is synced over the bridge to the host it is placed on and served there, through the
master; a killed agent comes back without the model being copied again."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import urllib.request
from pathlib import Path

import openai
from conftest import wait_until
from netbench import NetBench

from genmlx.home import ensure_token, read_token

MASTER_PORT, AGENT_PORT = 6789, 6790


def genmlx(*argv: str) -> list[str]:
    return [sys.executable, "-m", "genmlx", *argv]


def write_home(root: Path, name: str, token: str) -> Path:
    home = root / name
    (home / "models").mkdir(parents=True)
    (home / "token").write_text(token + "\n")
    (home / "token").chmod(0o600)
    return home


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
