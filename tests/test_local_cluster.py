"""The one-command clusters, as a user runs them: `genmlx demo` and `genmlx up`, then Ctrl-C."""

from __future__ import annotations

import json
import signal
import urllib.request

import openai
import psutil
import pytest
from conftest import free_port, wait_until

pytestmark = pytest.mark.e2e  # every test here starts real processes


def status(port: int, token: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/status", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def rank_pid(document: dict) -> int:
    return document["models"][0]["ranks"][0]["pid"]


def test_demo_serves_answers_and_stops_cleanly_on_ctrl_c(spawn, genmlx_home, token):
    port, agent_port = free_port(), free_port()
    demo = spawn(["-m", "genmlx", "demo", "--port", str(port), "--agent-port", str(agent_port)], "demo")
    wait_until(lambda: "Ctrl-C stops the cluster" in demo.output(), 180, what="the demo to serve")
    output = demo.output()
    assert "its answers are noise" in output
    assert "The demo model answered through the master:" in output
    assert f"OpenAI-compatible API: http://127.0.0.1:{port}/v1" in output

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0)
    reply = client.chat.completions.create(
        model="genmlx-demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.usage.completion_tokens == 4
    document = status(port, token)
    pid = rank_pid(document)
    assert psutil.pid_exists(pid)
    # The demo sets no maxBatch: placement derived it from this machine's memory, said why, and
    # the rank runs with it.
    (model,) = document["models"]
    batching, serving = model["batching"], model["ranks"][0]["launch"]["serving"]
    assert batching["reason"].startswith(f"maxBatch {batching['maxBatch']}: the ")
    assert (serving["maxBatch"], serving["maxQueue"]) == (batching["maxBatch"], batching["maxQueue"])
    assert batching["maxBatch"] > 8, "a tiny model on this machine has room for far more than 8"

    demo.signal(signal.SIGINT)
    assert demo.popen.wait(30) == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_up_runs_master_and_agent_from_a_manifest(spawn, genmlx_home, token, demo_model_dir, tmp_path):
    port, serving_port = free_port(), free_port()
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(f"""\
apiVersion: genmlx/v1
kind: Cluster
metadata: {{name: one}}
spec:
  master: {{node: solo, port: {port}}}
  nodes:
    - {{name: solo, storage: [{{path: {demo_model_dir.parent}}}]}}
  models:
    - {{name: tiny, source: "file://{demo_model_dir}", nodes: [solo], serving: {{port: {serving_port}}}}}
""")
    # No address and no discovery (tests turn it off): `up` knows its own agent.
    up = spawn(["-m", "genmlx", "up", "-f", str(manifest)], "up")

    def ready() -> dict | None:
        try:
            document = status(port, token)
        except OSError:
            return None
        return document if document["conditions"][0]["status"] == "True" else None

    pid = rank_pid(wait_until(ready, 120, what="the one-node cluster to be Ready"))
    up.signal(signal.SIGTERM)
    assert up.popen.wait(30) == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
