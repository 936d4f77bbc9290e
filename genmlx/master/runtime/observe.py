"""Observe: ask every declared node's agent for its state, and each served model's rank 0 for
its health, concurrently. Failures become data (a node that is unreachable), never exceptions,
so one bad node never hides the others."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from tornado.httpclient import AsyncHTTPClient

from genmlx.core.errors import AuthError, GenMLXError
from genmlx.manifest.types import Manifest, Node
from genmlx.master.planning.observed import EndpointHealth, Observed, ObservedNode, RolloutRecord
from genmlx.master.runtime.agent_client import AgentClient, check_endpoint
from genmlx.master.runtime.canary import Canaries
from genmlx.master.runtime.discovery import DiscoveredAgent


def agent_address(node: Node, discovered: Mapping[str, DiscoveredAgent]) -> str | None:
    """Where the node's agent listens: its declared address, else where an agent of that name
    announced itself, else unknown (None)."""
    if node.address:
        return node.address
    agent = discovered.get(node.name)
    return agent.address if agent else None


def not_announced(name: str) -> str:
    return (
        f"no agent named {name} has announced itself (is `genmlx agent --name {name}` running? "
        "set nodes[].address where multicast cannot reach)"
    )


async def observe(
    manifest: Manifest,
    clients: dict[str, AgentClient],
    http: AsyncHTTPClient,
    rollouts: dict[str, RolloutRecord],
    now: float,
    canaries: Canaries | None = None,
) -> Observed:
    nodes = await asyncio.gather(*(observe_node(n.name, clients.get(n.name)) for n in manifest.nodes))
    by_name = {n.name: n for n in nodes}
    endpoints = await observe_endpoints(manifest, by_name, http, canaries)
    return Observed(now=now, nodes=by_name, endpoints=endpoints, rollouts=dict(rollouts))


async def observe_node(name: str, client: AgentClient | None) -> ObservedNode:
    if client is None:
        return ObservedNode(name, "", "unreachable", not_announced(name))
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
    manifest: Manifest, nodes: dict[str, ObservedNode], http: AsyncHTTPClient, canaries: Canaries | None
) -> dict[str, EndpointHealth]:
    """Health of rank 0 for each model whose rank 0 is running on the node it is placed on, and
    (with ``canaries``) whether its group answered a completion."""
    checks: dict[str, asyncio.Future] = {}
    groups: dict[str, str] = {}  # model -> its running group: spec hash and rank 0's pid
    for spec in manifest.models:
        node = nodes[spec.nodes[0]]
        for info in node.ranks:
            if info.launch.model == spec.name and info.launch.rank == 0 and info.state == "running":
                checks[spec.name] = asyncio.ensure_future(check_endpoint(http, node.host, info.launch.port))
                groups[spec.name] = f"{info.launch.spec_hash}:{info.pid}"
    endpoints = {model: await check for model, check in checks.items()}
    if canaries is None:
        return endpoints
    canaries.forget(set(groups))
    return {model: with_canary(health, canaries, model, groups[model]) for model, health in endpoints.items()}


def with_canary(health: EndpointHealth, canaries: Canaries, model: str, group: str) -> EndpointHealth:
    if health.state != "ready":
        return health
    verdict, detail = canaries.verdict(model, group, health.url)
    if verdict == "passed":
        return health
    return EndpointHealth(health.url, "loading" if verdict == "pending" else "hung", detail)
