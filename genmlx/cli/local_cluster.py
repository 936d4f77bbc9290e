"""One-command clusters on this machine: ``genmlx up`` (master and the master node's agent in
one process) and ``genmlx demo`` (the same, on a freshly written demo model, with a first chat
completion sent through the master)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from genmlx.agent.run import AgentConfig, start_agent
from genmlx.core.home import genmlx_home
from genmlx.core.signing import Keys, signed_headers
from genmlx.core.tokens import TokenSource
from genmlx.demo.random_model import write_demo_model
from genmlx.manifest import load_manifest
from genmlx.manifest.types import DEFAULT_AGENT_PORT, DEFAULT_MASTER_PORT, Manifest
from genmlx.master.run import MasterConfig, serve_until_signalled, start_master

log = logging.getLogger("genmlx")

DEMO_MODEL = "genmlx-demo"
READY_TIMEOUT_S = 300.0


def local_agent_config(manifest: Manifest, token: TokenSource, host: str) -> AgentConfig:
    """The agent of the master's node, as the manifest declares it."""
    node = manifest.node(manifest.master.node)
    port = int(node.address.rsplit(":", 1)[1]) if node.address else DEFAULT_AGENT_PORT
    return AgentConfig(
        name=node.name, storage=tuple(s.path for s in node.storage), port=port, host=host, token=token
    )


async def start_local_cluster(manifest_file: Path, token: TokenSource, host: str):
    """Start the master node's agent, then the master; returns both, master last."""
    manifest = load_manifest(manifest_file)
    config = local_agent_config(manifest, token, host)
    agent = await start_agent(config)
    reach = "127.0.0.1" if host in ("0.0.0.0", "") else host
    local = ((config.name, f"{reach}:{config.port}"),)
    master_config = MasterConfig(
        token, genmlx_home() / "master", manifest_file, host=host, local_agents=local
    )
    master = await start_master(master_config)
    return agent, master


def run_up(manifest_file: Path, token: TokenSource, host: str) -> None:
    async def main() -> None:
        agent, master = await start_local_cluster(manifest_file, token, host)
        print(
            f"GenMLX is up: master on http://{host}:{master.port}, agent {agent.config.name}. Ctrl-C stops."
        )
        await serve_until_signalled(master, agent)

    asyncio.run(main())


def write_demo_manifest(folder: Path, model_dir: Path, master_port: int, agent_port: int) -> Path:
    """A one-node manifest serving the demo model from this machine's storage."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cluster.yaml"
    path.write_text(
        "# Written by `genmlx demo`: one node serving the built-in demo model.\n"
        "apiVersion: genmlx/v1\n"
        "kind: Cluster\n"
        "metadata: {name: demo}\n"
        "spec:\n"
        f"  master: {{node: local, port: {master_port}}}\n"
        "  nodes:\n"
        f"    - name: local\n"
        f"      address: 127.0.0.1:{agent_port}\n"
        f"      storage: [{{path: {json.dumps(str(model_dir.parent))}}}]\n"
        "  models:\n"
        f"    - name: {DEMO_MODEL}\n"
        f"      source: {json.dumps('file://' + str(model_dir))}\n"
        "      nodes: [local]\n"
    )
    return path


def run_demo(
    token: TokenSource, master_port: int = DEFAULT_MASTER_PORT, agent_port: int = DEFAULT_AGENT_PORT
) -> None:
    home = genmlx_home()
    model_dir = write_demo_model(home / "models" / DEMO_MODEL)
    print(f"Demo model at {model_dir}: random weights, so its answers are noise; the serving path is real.")
    manifest_file = write_demo_manifest(home / "demo", model_dir, master_port, agent_port)

    async def main() -> None:
        agent, master = await start_local_cluster(manifest_file, token, "127.0.0.1")
        base = f"http://127.0.0.1:{master.port}/v1"
        try:
            await wait_until_ready(master.reconciler)
            answer = await first_chat_completion(base, token.token)
        except Exception:
            await master.stop()
            await agent.stop()
            raise
        print(f"\nThe demo model answered through the master:\n  {answer!r}\n")
        print(f"OpenAI-compatible API: {base}  (model {DEMO_MODEL!r}; API key: `genmlx token --show`)")
        print("Status: `genmlx status`. Ctrl-C stops the cluster.")
        await serve_until_signalled(master, agent)

    asyncio.run(main())


async def wait_until_ready(reconciler, timeout: float = READY_TIMEOUT_S) -> None:
    """Print the cluster's Ready message as it changes until it is True; fail after ``timeout``."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        snapshot = reconciler.snapshot
        if snapshot is not None:
            if snapshot.cluster.status == "True":
                print(f"Ready: {snapshot.cluster.message}")
                return
            if snapshot.cluster.message != last:
                last = snapshot.cluster.message
                print(f"waiting: {last}")
        await asyncio.sleep(0.25)
    raise TimeoutError(f"the cluster was not Ready after {timeout:.0f}s: {last}")


async def first_chat_completion(base: str, token: str) -> str:
    body = {
        "model": DEMO_MODEL,
        "messages": [{"role": "user", "content": "Hello! Who are you?"}],
        "max_tokens": 24,
    }
    url, payload = f"{base}/chat/completions", json.dumps(body).encode()
    signed, _ = signed_headers(Keys.of(token), "POST", url, payload)
    try:
        response = await AsyncHTTPClient().fetch(
            url,
            method="POST",
            body=payload,
            headers={**signed, "Content-Type": "application/json"},
            request_timeout=120,
        )
    except HTTPClientError as e:
        detail = e.response.body.decode(errors="replace") if e.response else str(e)
        raise RuntimeError(f"the first chat completion failed: {detail}") from None
    return json.loads(response.body)["choices"][0]["message"]["content"]
