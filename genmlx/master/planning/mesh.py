"""The mesh planner: how the ranks of a multi-node model reach each other, and how the Thunderbolt
cables of the desk are addressed. Pure: node facts in, frozen plans out; no I/O, no clock.

- **Ring backend** (TCP, MLX's ``MLX_HOSTFILE``): one ``"ip:port"`` per rank. A rank listens on its
  mesh address, which its previous rank connects to (as ``mlx.distributed_config`` lays out a
  Thunderbolt ring): an IPv4 address on a Thunderbolt interface that shares a subnet with one of the
  previous rank's, else the address the master reaches the node's agent at. Ring ports are
  assigned as HTTP ports are (``groups.assign_ring_ports``): per host, the first port from
  ``mesh.port`` that no other rank there uses, a running group keeping its own, so ranks sharing a
  host (tests run several agents on loopback) never collide and a model keeps its ring ports when
  others are added or reordered.
- Which backend a model's ranks start on (jaccl, nccl or ring) is ``backends``' to say.
- **Thunderbolt addressing**: for the manifest's topology (``full-mesh``: every pair of nodes cabled;
  ``ring``: node i to node i+1, in manifest order), a /30 per link out of ``MESH_BLOCK``, with each
  end's address and, where the facts tell which port the cable is in, its interface.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from genmlx.core.errors import PermanentError
from genmlx.manifest.types import Topology
from genmlx.master.planning.observed import ObservedNode
from genmlx.wire.agent_state import NetworkInterface, NodeFacts

# 192.168.200.0/24 split into /30s: 64 links, enough for a full mesh of 11 nodes or a ring of 64.
MESH_BLOCK = ipaddress.IPv4Network("192.168.200.0/24")
LINK_PREFIX = 30
# Two Thunderbolt addresses share a subnet when they agree on at least this many leading bits, or
# are both link-local (macOS self-assigns 169.254/16 on Thunderbolt Bridge). Prefix lengths are not
# in the facts, so the longest shared prefix wins: on a /30 plan, the two ends of one link.
MIN_SHARED_PREFIX = 24
LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")


class MeshPlanError(PermanentError):
    """The mesh cannot be planned as the manifest asks: too many links for the address block, a
    ring port outside 1-65535, or a backend asked for that the nodes cannot run
    (``backends.BackendUnavailable``)."""

    reason = "MeshUnplannable"


@dataclass(frozen=True)
class MeshNode:
    """A node as the mesh planner sees it: its name, the host its agent is reached at, its facts."""

    name: str
    agent_host: str  # "10.0.0.2", from the agent's "host:port"
    facts: NodeFacts | None = None  # None where the agent has not reported


@dataclass(frozen=True)
class RankEndpoint:
    node: str
    address: str  # the IP the rank listens on for the ring backend


@dataclass(frozen=True)
class LinkAddress:
    """One end of a Thunderbolt link."""

    node: str
    address: str  # "192.168.200.1"
    interface: str | None = None  # "en2", where the facts tell which port the cable is in


@dataclass(frozen=True)
class Link:
    subnet: str  # "192.168.200.0/30"
    ends: tuple[LinkAddress, LinkAddress]
    # True where both nodes' facts show this cable, False where both report their Thunderbolt ports
    # and neither is cabled to the other, None where facts are missing.
    cabled: bool | None = None

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(self.subnet).netmask)


@dataclass(frozen=True)
class MeshPlan:
    """The /30-per-link address plan of the Thunderbolt cabling."""

    topology: Topology
    block: str  # the private block the links are cut from
    links: tuple[Link, ...]

    def addresses_of(self, node: str) -> tuple[LinkAddress, ...]:
        return tuple(end for link in self.links for end in link.ends if end.node == node)


# ----------------------------------------------------------------------------------------------
# Thunderbolt address plan


def cabled_pairs(count: int, topology: Topology) -> list[tuple[int, int]]:
    """Index pairs of the nodes the topology cables: every pair, or i with i+1 around the ring
    (two nodes: one cable)."""
    if topology == "full-mesh":
        return list(itertools.combinations(range(count), 2))
    if count < 3:
        return [(0, 1)] if count == 2 else []
    return [(i, i + 1) for i in range(count - 1)] + [(0, count - 1)]


def plan_links(nodes: Sequence[MeshNode], topology: Topology) -> MeshPlan:
    """A /30 out of ``MESH_BLOCK`` for each cabled pair, in pair order: the lower-indexed node
    takes the first host address. Raises ``MeshPlanError`` when the block runs out."""
    pairs = cabled_pairs(len(nodes), topology)
    subnets = list(MESH_BLOCK.subnets(new_prefix=LINK_PREFIX))
    if len(pairs) > len(subnets):
        raise MeshPlanError(
            f"a {topology} of {len(nodes)} nodes has {len(pairs)} Thunderbolt links, but {MESH_BLOCK} "
            f"holds only {len(subnets)} /{LINK_PREFIX} links: use topology ring"
        )
    links = tuple(
        plan_link(nodes[i], nodes[j], subnet)
        for (i, j), subnet in zip(pairs, subnets[: len(pairs)], strict=True)
    )
    return MeshPlan(topology, str(MESH_BLOCK), links)


def plan_link(a: MeshNode, b: MeshNode, subnet: ipaddress.IPv4Network) -> Link:
    first, second = list(subnet.hosts())
    ports = cable_between(a, b)
    a_port, b_port = (ports[0].name, ports[1].name) if ports else (None, None)
    ends = (LinkAddress(a.name, str(first), a_port), LinkAddress(b.name, str(second), b_port))
    known = has_thunderbolt_domains(a.facts) and has_thunderbolt_domains(b.facts)
    return Link(str(subnet), ends, True if ports else False if known else None)


def cabled_interface(node: MeshNode, peer: MeshNode) -> str | None:
    """The name of ``node``'s Thunderbolt port cabled to ``peer``."""
    ports = cable_between(node, peer)
    return ports[0].name if ports else None


def cable_between(node: MeshNode, peer: MeshNode) -> tuple[NetworkInterface, NetworkInterface] | None:
    """The two ports of a cable from ``node`` to ``peer``; of several, the first of ``cables_between``."""
    return next(iter(cables_between(node, peer)), None)


def cables_between(node: MeshNode, peer: MeshNode) -> list[tuple[NetworkInterface, NetworkInterface]]:
    """(``node``'s port, ``peer``'s port) of each cable between them (each port's peer domain is
    the other's domain), by the name of ``node``'s port."""
    ports_by_domain = {i.domain: i for i in thunderbolt_interfaces(peer.facts) if i.domain}
    cables = [
        (port, ports_by_domain[port.peer_domain])
        for port in thunderbolt_interfaces(node.facts)
        if port.peer_domain in ports_by_domain
        and ports_by_domain[port.peer_domain].peer_domain == port.domain
    ]
    return sorted(cables, key=lambda cable: cable[0].name)


def thunderbolt_interfaces(facts: NodeFacts | None) -> list[NetworkInterface]:
    return [i for i in facts.interfaces if i.kind == "thunderbolt"] if facts else []


def has_thunderbolt_domains(facts: NodeFacts | None) -> bool:
    return any(i.domain for i in thunderbolt_interfaces(facts))


# ----------------------------------------------------------------------------------------------
# Ring backend


def mesh_address(facts: NodeFacts | None, agent_host: str, peers: Sequence[NodeFacts | None] = ()) -> str:
    """The address a node's rank listens on: a Thunderbolt IPv4 address of the node that shares a
    subnet with a Thunderbolt address of the first peer (in the order given) it shares one with;
    otherwise ``agent_host``, the address the master reaches its agent at."""
    own = thunderbolt_ipv4(facts)
    for peer in peers:
        shared = [
            (length, mine)
            for mine in own
            for theirs in thunderbolt_ipv4(peer)
            if (length := shared_prefix(mine, theirs)) is not None
        ]
        if shared:  # the longest shared prefix, then the lowest address: deterministic
            return str(max(shared, key=lambda pair: (pair[0], -int(pair[1])))[1])
    return agent_host


def thunderbolt_ipv4(facts: NodeFacts | None) -> list[ipaddress.IPv4Address]:
    found = []
    for interface in thunderbolt_interfaces(facts):
        for address in interface.addresses:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                continue
            if ip.version == 4:
                found.append(ip)
    return found


def shared_prefix(a: ipaddress.IPv4Address, b: ipaddress.IPv4Address) -> int | None:
    """How many leading bits ``a`` and ``b`` share, if that puts them in one subnet; else None."""
    if a == b:
        return None  # the same address on two nodes is a conflict, not a link
    length = 32 - (int(a) ^ int(b)).bit_length()
    if length >= MIN_SHARED_PREFIX or (a in LINK_LOCAL and b in LINK_LOCAL):
        return length
    return None


def rank_endpoints(nodes: Sequence[MeshNode]) -> tuple[RankEndpoint, ...]:
    """Each rank's mesh address, rank r on ``nodes[r]``. The previous rank is asked first, since
    it is the one that connects to rank r; then the next, then the rest."""
    count = len(nodes)
    endpoints = []
    for rank, node in enumerate(nodes):
        order = [(rank - 1) % count, (rank + 1) % count, *range(count)]
        peers = [nodes[i].facts for i in dict.fromkeys(order) if i != rank]
        endpoints.append(RankEndpoint(node.name, mesh_address(node.facts, node.agent_host, peers)))
    return tuple(endpoints)


def ring_hostfile(ranks: Sequence[RankEndpoint], ports: Sequence[int]) -> tuple[str, ...]:
    """MLX's ring hostfile as ``RankLaunch.hostfile`` carries it: ``"ip:port"`` per rank, with
    rank r's ring port ``ports[r]`` (the agent writes each entry as a one-address list)."""
    return tuple(f"{rank.address}:{port}" for rank, port in zip(ranks, ports, strict=True))


def observed_mesh_nodes(names: Sequence[str], observed: Mapping[str, ObservedNode]) -> list[MeshNode]:
    """The planner's view of the nodes ``names`` (rank order) as a pass observed them: the host
    their agent answers at and the facts it reported. Every name must have been observed."""
    return [
        MeshNode(name, observed[name].host, observed[name].state.facts if observed[name].state else None)
        for name in names
    ]
