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
from agent_harness import call
from conftest import wait_until
from mac_recordings import Port, write_recording
from netbench import NetBench
from test_multihost import MASTER_PORT, apply_manifest, genmlx, status, write_home
from test_ui_page import WAIT_MS, keep_screenshot
from test_ui_page import browser as browser  # a fixture, used by name

from genmlx.core.home import ensure_token, read_token

pytestmark = pytest.mark.e2e

CABLE = ("192.168.200.1/30", "192.168.200.2/30")  # the first /30 of mesh plan's block
CHECK_INTERVAL_S = 3.0
LINK_CHECKS = {  # often and small: two cores run the whole desk
    "GENMLX_LINK_CHECK_INTERVAL_S": str(CHECK_INTERVAL_S),
    "GENMLX_LINK_PROBE_BYTES": str(32 << 20),
    "GENMLX_LINK_PROBE_SECONDS": "0.5",
}
# What a check may add to its interval before it shows: three connects that time out (1 s each),
# the probe, and the pass that reports it.
CHECK_MARGIN_S = 6.0


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
        # Rated 10 Gb/s, so one stream is expected to carry 1 Gbit/s: what the bench's veth does.
        port = Port(1, "en2", peers[name], gbps=10)
        recording = write_recording(tmp_path / f"{name}-mac", name, [port])
        env = {"GENMLX_HOME": str(homes[name]), "GENMLX_FACTS_REPLAY": str(recording)}
        bench.run(host, genmlx("agent", "--name", name, "--storage", str(homes[name] / "models")), name, env)
    master_env = {"GENMLX_HOME": str(homes["n1"]), "GENMLX_CANARY_INTERVAL_S": "2", **LINK_CHECKS}
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


def link_state(url: str, token: str) -> dict | None:
    document = status(url, token)
    return document["links"][0] if document and document.get("links") else None


def test_links_are_verified_from_both_ends_and_a_cut_shows_within_one_check_interval(
    cabled_desk, browser, tmp_path
):
    bench, url, token, manifest, homes, _ = cabled_desk
    link = wait_until(
        lambda: (found := link_state(url, token)) and found["state"] == "up" and found,
        60,
        what="the cable to be verified from both ends",
    )
    assert link["subnet"] == "192.168.200.0/30" and link["expectedGbitS"] == 1.0
    for end in link["ends"]:
        check = end["lastCheck"]
        assert check["up"] and check["interface"] == "en2"
        assert 0 < check["rttMs"] < 1000 and check["gbitS"] > 0 and check["probeBytes"] > 1 << 20
    print("measured on the bench:", [(e["node"], e["lastCheck"]["gbitS"]) for e in link["ends"]])
    login = call("POST", f"{url}/api/v1/ui/login", token, {})
    page = browser.new_page()
    page.goto(url + login.json()["url"])
    page.wait_for_selector("#links table", timeout=WAIT_MS)
    table = page.locator("#links table").inner_text()
    assert "192.168.200.0/30" in table and "Round trip" in table and "Gbit/s" in table, table
    assert "n1 192.168.200.1 on en2" in table and "n2 192.168.200.2 on en2" in table
    shown = subprocess.run(
        genmlx("status", "--master", url),
        env={**os.environ, "GENMLX_HOME": str(homes["n1"])},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "192.168.200.0/30  up" in shown.stdout and "n1 en2 <-> n2 en2" in shown.stdout, shown.stdout

    bench.set_link(1, "en2", up=False)  # n2's end of the cable pulled

    def pulled_end_down() -> dict | None:
        found = link_state(url, token)
        ends = {end["node"]: end["lastCheck"] for end in found["ends"]} if found else {}
        return found if found and found["state"] == "down" and not ends["n2"]["up"] else None

    cut = wait_until(
        pulled_end_down, CHECK_INTERVAL_S + CHECK_MARGIN_S, what="the cut to show within one check interval"
    )
    details = {end["node"]: end["lastCheck"]["detail"] for end in cut["ends"] if not end["lastCheck"]["up"]}
    page.wait_for_selector("#links caption >> text=down", timeout=WAIT_MS)  # followed live, no reload
    assert "down: en2 is down or has no carrier" in page.locator("#links table").inner_text()
    keep_screenshot(page, tmp_path, "thunderbolt-link-down.png")
    assert details, cut
    # n2 says its port lost its carrier: where the master reached n2's agent at its address on
    # this cable (mDNS announces both), it goes on at n2's other address, and n2 stays Ready.
    assert "en2 is down or has no carrier" in details["n2"], details
    n2 = next(node for node in status(url, token)["nodes"] if node["name"] == "n2")
    assert not n2["address"].startswith("192.168.200."), n2
    assert next(c for c in n2["conditions"] if c["type"] == "Ready")["status"] == "True", n2
    bench.set_link(1, "en2", up=True)
    wait_until(
        lambda: (found := link_state(url, token)) and found["state"] == "up",
        CHECK_INTERVAL_S + CHECK_MARGIN_S + 5,
        what="the link to come back",
    )

    # Slowed to 100 Mbit/s both ways, the link is up but warned about, with the numbers.
    for host in (0, 1):
        bench.shape(host, "en2", "100mbit")
    plan = subprocess.run(
        genmlx("mesh", "plan", "-f", str(manifest), "--master", url, "--verify"),
        env={**os.environ, "GENMLX_HOME": str(homes["n1"])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plan.returncode == 0, plan.stderr
    assert "slower than a Thunderbolt link should be" in plan.stdout, plan.stdout
    assert "expected at least 1 Gbit/s" in plan.stdout
    slow = link_state(url, token)
    assert slow["state"] == "up" and "Gbit/s" in slow["warning"]
    assert all(end["lastCheck"]["gbitS"] < 0.2 for end in slow["ends"]), slow
