"""Observe: ask every declared node's agent for its state, and each served model's rank 0 for
its health, concurrently. Failures become data (a node that is unreachable), never exceptions,
so one bad node never hides the others."""

from __future__ import annotations

import asyncio

from tornado.httpclient import AsyncHTTPClient

from genmlx.errors import AuthError, GenMLXError
from genmlx.manifest.types import DEFAULT_AGENT_PORT, Manifest, Node
from genmlx.reconciler.agent_client import AgentClient, check_endpoint
from genmlx.reconciler.observed import EndpointHealth, Observed, ObservedNode, RolloutRecord


def agent_address(node: Node) -> str:
    """Where the node's agent listens: its declared address, else this machine's default port."""
    return node.address or f"127.0.0.1:{DEFAULT_AGENT_PORT}"


async def observe(
    manifest: Manifest,
    clients: dict[str, AgentClient],
    http: AsyncHTTPClient,
    rollouts: dict[str, RolloutRecord],
    now: float,
) -> Observed:
    nodes = await asyncio.gather(*(observe_node(n.name, clients[n.name]) for n in manifest.nodes))
    by_name = {n.name: n for n in nodes}
    endpoints = await observe_endpoints(manifest, by_name, http)
    return Observed(now=now, nodes=by_name, endpoints=endpoints, rollouts=dict(rollouts))


async def observe_node(name: str, client: AgentClient) -> ObservedNode:
    try:
        state = await client.state()
    except AuthError as e:
        return ObservedNode(name, client.address, "unauthorized", str(e))
    except GenMLXError as e:
        return ObservedNode(name, client.address, "unreachable", str(e))
    if state.name != name:
        detail = f"the agent at {client.address} calls itself {state.name!r}, not {name!r}"
        return ObservedNode(name, client.address, "unreachable", detail)
    return ObservedNode(name, client.address, "ready", "", state)


async def observe_endpoints(
    manifest: Manifest, nodes: dict[str, ObservedNode], http: AsyncHTTPClient
) -> dict[str, EndpointHealth]:
    """Health of rank 0 for each model whose rank 0 is running on the node it is placed on."""
    checks: dict[str, asyncio.Future] = {}
    for spec in manifest.models:
        node = nodes[spec.nodes[0]]
        for info in node.ranks:
            if info.launch.model == spec.name and info.launch.rank == 0 and info.state == "running":
                checks[spec.name] = asyncio.ensure_future(check_endpoint(http, node.host, info.launch.port))
    return {model: await check for model, check in checks.items()}
