"""Two Macs cabled by Thunderbolt, on the namespace bench: each host has a real point-to-point link
(a veth pair named like a Mac's port, addressed as ``genmlx mesh plan`` plans it) and its agent
reports a Mac's Thunderbolt ports and RDMA devices from recorded command output
(``GENMLX_FACTS_REPLAY``). So the master plans jaccl for a model on both, and its ranks really
start on MLX's jaccl backend, which fails here as on a Mac without RDMA: the group comes back on
ring over the cable, serving through the master, Degraded with the reason and the rank's error.
Asked for explicitly, jaccl is not fallen back from: the model is Stalled, its ranks stopped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import wait_until
from mac_recordings import Port, write_recording
from netbench import NetBench
from test_multihost import MASTER_PORT, apply_manifest, genmlx, status, write_home

from genmlx.core.home import ensure_token, read_token

pytestmark = pytest.mark.e2e

CABLE = ("192.168.200.1/30", "192.168.200.2/30")  # the first /30 of mesh plan's block


def manifest_text(homes: dict[str, Path], source: str, backend: str) -> str:
    nodes = "".join(
        f"    - {{name: {n}, storage: [{{path: {home / 'models'}}}]}}\n" for n, home in homes.items()
    )
    return (
        "apiVersion: genmlx/v1\nkind: Cluster\nmetadata: {name: desk}\nspec:\n"
        f"  master: {{node: n1}}\n  nodes:\n{nodes}  mesh: {{backend: {backend}}}\n  models:\n"
        f'    - {{name: pair, source: "{source}", nodes: [n1, n2], parallelism: tensor}}\n'
    )


@pytest.fixture
def cabled_desk(netns_hosts, tmp_path, demo_model_dir):
    """Two hosts cabled on en2, agents reporting Macs' facts, and the master on the first."""
    bench: NetBench = netns_hosts(2)
    bench.cable(0, 1, "en2", CABLE)
    token = read_token(ensure_token(tmp_path / "token")[0])
    homes = {name: write_home(tmp_path, name, token) for name in ("n1", "n2")}
    shutil.copytree(demo_model_dir, homes["n1"] / "models" / "demo")
    source = f"file://{homes['n1'] / 'models' / 'demo'}"
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(manifest_text(homes, source, "auto"))
    peers = {"n1": ("n2", 1), "n2": ("n1", 1)}
    for host, name in enumerate(homes):
        recording = write_recording(tmp_path / f"{name}-mac", name, [Port(1, "en2", peers[name])])
        env = {"GENMLX_HOME": str(homes[name]), "GENMLX_FACTS_REPLAY": str(recording)}
        bench.run(host, genmlx("agent", "--name", name, "--storage", str(homes[name] / "models")), name, env)
    master_env = {"GENMLX_HOME": str(homes["n1"]), "GENMLX_CANARY_INTERVAL_S": "2"}
    bench.run(0, genmlx("master", "-f", str(manifest)), "master", master_env)
    url = f"http://{bench.host(0).address}:{MASTER_PORT}"
    return bench, url, token, manifest, homes, source


def get_json(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def model_status(url: str, token: str) -> dict | None:
    document = status(url, token)
    return document["models"][0] if document and document["models"] else None


def condition(model: dict, kind: str) -> dict:
    return next(c for c in model["conditions"] if c["type"] == kind)


def test_a_jaccl_group_that_cannot_join_comes_back_on_ring_degraded_and_jaccl_asked_for_stalls(cabled_desk):
    bench, url, token, manifest, homes, source = cabled_desk

    def serving_on_ring() -> dict | None:
        model = model_status(url, token)
        if not model or condition(model, "Ready")["status"] != "True":
            return None
        return model if {r["launch"]["backend"] for r in model["ranks"]} == {"ring"} else None

    model = wait_until(serving_on_ring, 240, what="the pair to serve on ring after jaccl failed")
    degraded = condition(model, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RDMAUnavailable")
    assert "jaccl failed to start on n" in degraded["message"]
    assert "Cannot initialize jaccl distributed backend" in degraded["message"], "the rank's own error"
    hostfile = model["ranks"][0]["launch"]["hostfile"]
    assert [entry.split(":")[0] for entry in hostfile] == ["192.168.200.1", "192.168.200.2"], "over the cable"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=60)
    reply = client.chat.completions.create(
        model="pair", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert reply.usage.completion_tokens == 3
    events = get_json(f"{url}/api/v1/events?kind=Model&name=pair", token)
    warned = [e for e in events["events"] if e["reason"] == "RDMAUnavailable"]
    assert warned and "Cannot initialize jaccl" in warned[0]["message"], "the fallback is an event"

    # Asked for explicitly, jaccl is tried again (the manifest asks), fails, and is not fallen back from.
    manifest.write_text(manifest_text(homes, source, "jaccl"))
    apply_manifest(manifest, url, homes["n1"])

    def stalled() -> dict | None:
        model = model_status(url, token)
        return (
            model
            if model and condition(model, "Stalled")["status"] == "True" and not model["ranks"]
            else None
        )

    model = wait_until(stalled, 180, what="the pair to stall on jaccl")
    stalled_condition = condition(model, "Stalled")
    assert stalled_condition["reason"] == "RDMAUnavailable"
    assert "mesh.backend is jaccl, but jaccl failed to start" in stalled_condition["message"]
    assert "Cannot initialize jaccl distributed backend" in stalled_condition["message"]
    assert condition(model, "Ready")["status"] == "False"


def test_facts_replayed_on_the_bench_show_the_cable_and_its_rdma_device(cabled_desk):
    bench, url, token, *_ = cabled_desk
    document = wait_until(
        lambda: (d := status(url, token)) and all(n.get("facts") for n in d["nodes"]) and d,
        60,
        what="both agents' facts",
    )
    for node in document["nodes"]:
        (port,) = [i for i in node["facts"]["interfaces"] if i["kind"] == "thunderbolt"]
        assert (port["name"], port["rdmaDevice"], port["linked"]) == ("en2", "rdma_en2", True)
        assert port["addresses"][0] in ("192.168.200.1", "192.168.200.2")
    plan = subprocess.run(
        [sys.executable, "-m", "genmlx", "mesh", "plan", "-f", str(cabled_desk[3]), "--master", url],
        env={**os.environ, "GENMLX_HOME": str(cabled_desk[4]["n1"])},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plan.returncode == 0, plan.stderr
    assert "192.168.200.0/30" in plan.stdout and "n1 192.168.200.1 on en2" in plan.stdout
    assert 'devices (MLX_IBV_DEVICES): [[null, "rdma_en2"], ["rdma_en2", null]]' in plan.stdout
