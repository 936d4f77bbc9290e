"""Observe: ask every declared node's agent for its state, and each served model's rank 0 for
its health, concurrently. Failures become data (a node that is unreachable), never exceptions,
so one bad node never hides the others.

A node may have several candidates: everything that announces its name. Each is asked, with a
signed request that is of no use anywhere else; the one whose answer is signed with the cluster
token's key is the node, and whatever answers unsigned is an impostor (``Impostor``)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from tornado.httpclient import AsyncHTTPClient

from genmlx.core.errors import AuthError, GenMLXError, ImpostorError
from genmlx.manifest.types import Manifest, Node
from genmlx.master.planning.observed import EndpointHealth, Impostor, Observed, ObservedNode, RolloutRecord
from genmlx.master.runtime.agent_client import AgentClient, ClockSkew, check_endpoint
from genmlx.master.runtime.canary import Canaries
from genmlx.master.runtime.discovery import DiscoveredAgent


def agent_addresses(
    node: Node, announced: Mapping[str, tuple[DiscoveredAgent, ...]]
) -> list[tuple[str, ...]]:
    """Where the node's agent may listen: its declared address, else wherever something of that
    name announced itself (perhaps more than one thing: all are asked), each announcement's
    addresses with the preferred one first."""
    if node.address:
        return [(node.address,)]
    return sorted({agent.addresses for agent in announced.get(node.name, ())})


def not_announced(name: str) -> str:
    return (
        f"no agent named {name} has announced itself (is `genmlx agent --name {name}` running? "
        "set nodes[].address where multicast cannot reach)"
    )


async def observe(
    manifest: Manifest,
    candidates: dict[str, list[AgentClient]],
    http: AsyncHTTPClient,
    rollouts: dict[str, RolloutRecord],
    now: float,
    canaries: Canaries | None = None,
) -> Observed:
    found = await asyncio.gather(*(observe_node(n.name, candidates.get(n.name, [])) for n in manifest.nodes))
    by_name = {node.name: node for node, _ in found}
    impostors = tuple(impostor for _, seen in found for impostor in seen)
    endpoints = await observe_endpoints(manifest, by_name, http, canaries)
    return Observed(now=now, nodes=by_name, endpoints=endpoints, rollouts=dict(rollouts), impostors=impostors)


PREFERRED = (
    "ready",
    "clock-skew",
    "unauthorized",
    "unreachable",
)  # of several candidates, the first that answered


async def observe_node(name: str, candidates: list[AgentClient]) -> tuple[ObservedNode, list[Impostor]]:
    """The node as its proven agent reports it, and whatever else answered for it unproven."""
    if not candidates:
        return ObservedNode(name, "", "unreachable", not_announced(name)), []
    answers = await asyncio.gather(*(observe_candidate(name, client) for client in candidates))
    impostors = [Impostor(name, node.address, node.detail) for node, unproven in answers if unproven]
    proven = [node for node, unproven in answers if not unproven]
    ranked = sorted(proven, key=lambda node: PREFERRED.index(node.reachability))
    if ranked:
        return ranked[0], impostors
    addresses = ", ".join(impostor.address for impostor in impostors)
    detail = f"what announces {name} (at {addresses}) cannot prove it holds the cluster token: an impostor"
    return ObservedNode(name, "", "unreachable", detail), impostors


async def observe_candidate(name: str, client: AgentClient) -> tuple[ObservedNode, bool]:
    """What the candidate at ``client.address`` said, and whether it answered without proof."""
    try:
        state = await client.state()
    except ImpostorError as e:
        return ObservedNode(name, client.address, "unreachable", str(e)), True
    except ClockSkew as e:
        return ObservedNode(name, client.address, "clock-skew", str(e)), False
    except AuthError as e:
        return ObservedNode(name, client.address, "unauthorized", str(e)), False
    except GenMLXError as e:
        return ObservedNode(name, client.address, "unreachable", str(e)), False
    if state.name != name:
        detail = f"the agent at {client.address} calls itself {state.name!r}, not {name!r}"
        return ObservedNode(name, client.address, "unreachable", detail), False
    return ObservedNode(name, client.address, "ready", "", state), False


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
