"""The mesh planner (pure: facts in, plans out) and `genmlx mesh plan` (a real subprocess, with and
without a real master on loopback).

Desks of Macs are built as ``NodeFacts`` whose Thunderbolt ports name their own domain and their
peer's, as ``platform_macos`` reads them from system_profiler; one test starts from the recorded
output of a real Mac's commands (tests/data/macos)."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from agent_harness import start_agent
from conftest import free_port, free_ports, wait_until

import genmlx.agent.facts.macos as macos
import genmlx.master.planning.groups as groups
from genmlx.agent.facts.collect import NodeFactsCollector
from genmlx.cli.master_client import call_master
from genmlx.cli.mesh_report import FactsSource, format_mesh_plan, mesh_document, mesh_nodes, running_hostfile
from genmlx.core.errors import GenMLXError
from genmlx.manifest.types import Manifest, Master, Mesh, ModelSpec, Node, Serving, Source
from genmlx.master.planning.backends import (
    BackendChoice,
    JacclConfig,
    JacclPlan,
    backend_fingerprint,
    choose_backend,
    jaccl_config,
    plan_jaccl,
    plan_model_mesh,
    plan_nccl,
    rdma_matrix,
    standing_failure,
)
from genmlx.master.planning.mesh import (
    MESH_BLOCK,
    Link,
    LinkAddress,
    MeshNode,
    MeshPlanError,
    RankEndpoint,
    cabled_interface,
    cabled_pairs,
    mesh_address,
    observed_mesh_nodes,
    plan_links,
    rank_endpoints,
    ring_hostfile,
)
from genmlx.master.planning.observed import BackendFailure, Observed, ObservedNode
from genmlx.wire.agent_state import AgentState, NetworkInterface, NodeFacts, RankInfo
from genmlx.wire.rank_launch import RankLaunch
from genmlx.wire.status import ClusterStatus, ConditionReport, ModelRank, ModelStatus, NodeStatus

RECORDINGS = Path(__file__).parent / "data" / "macos"


def facts(*interfaces: NetworkInterface) -> NodeFacts:
    return NodeFacts("mac", "Darwin 25.2.0", "arm64", 24, 192 << 30, 180 << 30, interfaces=interfaces)


def ethernet(address: str) -> NetworkInterface:
    return NetworkInterface("en0", "ethernet", (address,))


def desk(
    names: Sequence[str],
    cables: Sequence[tuple[int, int]],
    rdma: bool = True,
    addresses: dict[tuple[str, str], str] | None = None,
) -> list[MeshNode]:
    """Macs on a LAN (10.0.0.1, .2, ...), one Thunderbolt port en2, en3, ... per cable in cable
    order, each port's domain "<node>/<port>"; ``addresses[(node, port)]`` puts an IPv4 on a port."""
    ports: dict[str, list[NetworkInterface]] = {name: [] for name in names}
    for a, b in cables:
        a_name, b_name = names[a], names[b]
        a_port, b_port = f"en{len(ports[a_name]) + 2}", f"en{len(ports[b_name]) + 2}"
        for node, port, peer in (
            (a_name, a_port, f"{b_name}/{b_port}"),
            (b_name, b_port, f"{a_name}/{a_port}"),
        ):
            ip = (addresses or {}).get((node, port))
            ports[node].append(
                NetworkInterface(
                    port,
                    "thunderbolt",
                    (ip,) if ip else (),
                    True,
                    domain=f"{node}/{port}",
                    peer_domain=peer,
                    rdma_device=f"rdma_{port}" if rdma else None,
                )
            )
    return [
        MeshNode(name, f"10.0.0.{i + 1}", facts(ethernet(f"10.0.0.{i + 1}"), *ports[name]))
        for i, name in enumerate(names)
    ]


# ----------------------------------------------------------------------------------------------
# Ring hostfile and ports


def test_the_ring_hostfile_gives_each_rank_its_own_ring_port_in_rank_order():
    ranks = [RankEndpoint(node, "127.0.0.1") for node in ("a", "b", "c")]
    assert ring_hostfile(ranks, [32323, 32325, 32324]) == (
        "127.0.0.1:32323",
        "127.0.0.1:32325",
        "127.0.0.1:32324",
    )
    with pytest.raises(ValueError):
        ring_hostfile(ranks, [32323])


def spec(name: str, *nodes: str, port: int | None = None) -> ModelSpec:
    return ModelSpec(name, Source("hf", f"org/{name}"), tuple(nodes), serving=Serving(port=port))


def cluster(*models: ModelSpec, **mesh) -> Manifest:
    return Manifest("desk", Master("a"), tuple(Node(n) for n in "abc"), models, mesh=Mesh(**mesh))


def on_hosts(*hosts: str, ranks: dict[str, tuple[RankInfo, ...]] | None = None) -> Observed:
    """Nodes a, b, c, ... whose agents answer on ``hosts``, ``ranks[node]`` running there."""
    nodes = [
        ObservedNode(
            name,
            f"{host}:6790",
            "ready",
            state=AgentState(name, "1", facts(), ranks=(ranks or {}).get(name, ())),
        )
        for name, host in zip("abcdefgh"[: len(hosts)], hosts, strict=True)
    ]
    return Observed(0.0, {n.name: n for n in nodes})


def running(model: str, rank: int, port: int, ring: Sequence[int] = ()) -> RankInfo:
    """A rank of a two-rank group on loopback; ``ring``: the ring ports of its launch's hostfile."""
    hostfile = tuple(f"127.0.0.1:{p}" for p in ring)
    return RankInfo(RankLaunch(model, f"/m/{model}", rank, 2, port, "h", hostfile), 1, "running", 0.0)


def ring_ports_of(manifest: Manifest, observed: Observed) -> dict[str, list[int]]:
    """Each model's ring ports as the master assigns them."""
    return {name: list(p.ring) for name, p in groups.assign_rank_ports(manifest, observed).items()}


LOOPBACK = ("127.0.0.1", "127.0.0.1", "127.0.0.1")
APART = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
# (manifest, observed) -> each model's (HTTP ports, ring ports), rank order.
PORT_CASES = {
    "ranks sharing a host take the next free HTTP and ring ports": (
        cluster(spec("pair", "a", "b")),
        on_hosts(*LOOPBACK),
        {"pair": ((8100, 8101), (32323, 32324))},
    ),
    "ranks on hosts of their own may share ports": (
        cluster(spec("pair", "a", "b")),
        on_hosts(*APART),
        {"pair": ((8100, 8100), (32323, 32323))},
    ),
    "serving.port is where every rank's HTTP ports start, ring ports stay at mesh.port": (
        cluster(spec("pair", "a", "b", port=9000), spec("wide", "c", "a", "b", port=9100)),
        on_hosts("127.0.0.1", "127.0.0.1", "10.0.0.3"),
        {"pair": ((9000, 9001), (32323, 32324)), "wide": ((9100, 9100, 9101), (32323, 32325, 32326))},
    ),
    "two models on one host: the second takes the ports after the first's": (
        cluster(spec("one", "a", "b"), spec("two", "a", "b"), port=40000),
        on_hosts(*LOOPBACK),
        {"one": ((8100, 8101), (40000, 40001)), "two": ((8102, 8103), (40002, 40003))},
    ),
    "a one-rank model has no ring port and holds none": (
        cluster(spec("solo", "a"), spec("pair", "a", "b")),
        on_hosts(*LOOPBACK),
        {"solo": ((8100,), ()), "pair": ((8101, 8102), (32323, 32324))},
    ),
    "ring ports skip the HTTP ports of ranks on the same host": (
        cluster(spec("pair", "a", "b"), port=8100),
        on_hosts(*LOOPBACK),
        {"pair": ((8100, 8101), (8102, 8103))},
    ),
    "a running group keeps its HTTP and ring ports when a model is added before it": (
        cluster(spec("new", "a", "b"), spec("pair", "a", "b")),
        on_hosts(
            *LOOPBACK,
            ranks={
                "a": (running("pair", 0, 8100, (32330, 32331)),),
                "b": (running("pair", 1, 8101, (32330, 32331)),),
            },
        ),
        {"pair": ((8100, 8101), (32330, 32331)), "new": ((8102, 8103), (32323, 32324))},
    ),
    "another model's running ranks keep their ports: a newcomer goes around them": (
        cluster(spec("new", "a", "b")),
        on_hosts(*LOOPBACK, ranks={"a": (running("old", 0, 8100, (32323, 32324)),)}),
        {"new": ((8101, 8102), (32324, 32325))},
    ),
    "a running group below a raised mesh.port or serving.port moves up to it": (
        cluster(spec("pair", "a", "b", port=9000), port=40000),
        on_hosts(
            *LOOPBACK,
            ranks={
                "a": (running("pair", 0, 8100, (32323, 32324)),),
                "b": (running("pair", 1, 8101, (32323, 32324)),),
            },
        ),
        {"pair": ((9000, 9001), (40000, 40001))},
    ),
}


@pytest.mark.parametrize(("manifest", "observed", "expected"), PORT_CASES.values(), ids=PORT_CASES.keys())
def test_rank_ports(manifest, observed, expected):
    ports = groups.assign_rank_ports(manifest, observed)
    assert {name: (p.http, p.ring) for name, p in ports.items()} == expected


def test_ranks_sharing_a_host_never_share_a_ring_port():
    models = [spec("big", "a", "b"), spec("solo", "c"), spec("wide", "a", "b", "c"), spec("pair", "b", "c")]
    ports = ring_ports_of(cluster(*models), on_hosts(*LOOPBACK))
    assert ports["big"] == [32323, 32324] and ports["solo"] == []
    assert len({p for m in ports.values() for p in m}) == 7
    apart = ring_ports_of(cluster(*models), on_hosts(*APART))
    assert apart["wide"] == [32324, 32324, 32323], "one host each: counted per host"


def test_a_running_model_keeps_its_ring_ports_when_another_is_added_before_it():
    observed = on_hosts(
        "127.0.0.1",
        "127.0.0.1",
        ranks={
            "a": (running("pair", 0, 8100, (32323, 32324)),),
            "b": (running("pair", 1, 8101, (32323, 32324)),),
        },
    )
    before = ring_ports_of(cluster(spec("pair", "a", "b")), observed)
    after = ring_ports_of(cluster(spec("new", "a", "b"), spec("pair", "a", "b")), observed)
    assert before["pair"] == after["pair"] == [32323, 32324]
    assert after["new"] == [32325, 32326]


# ----------------------------------------------------------------------------------------------
# Mesh addresses


def thunderbolt(*addresses: str, name: str = "en2") -> NetworkInterface:
    return NetworkInterface(name, "thunderbolt", addresses, True)


@pytest.mark.parametrize(
    ("own", "peer", "expected"),
    [
        # No facts, or no Thunderbolt address: the address the master reaches the agent at.
        (None, None, "10.0.0.1"),
        (facts(ethernet("192.168.1.20")), facts(ethernet("192.168.1.21")), "10.0.0.1"),
        # On a /30 plan the two ends of the same link share the longest prefix.
        (
            facts(thunderbolt("192.168.200.1"), thunderbolt("192.168.200.5", name="en3")),
            facts(thunderbolt("192.168.200.2"), thunderbolt("192.168.200.9", name="en3")),
            "192.168.200.1",
        ),
        (
            facts(thunderbolt("192.168.200.1"), thunderbolt("192.168.200.5", name="en3")),
            facts(thunderbolt("192.168.200.6")),
            "192.168.200.5",
        ),
        # Thunderbolt Bridge with macOS's self-assigned link-local addresses.
        (
            facts(thunderbolt("169.254.12.7", name="bridge0")),
            facts(thunderbolt("169.254.200.3")),
            "169.254.12.7",
        ),
        # Thunderbolt addresses with nothing in common with the peer's, or the very same address.
        (facts(thunderbolt("192.168.200.1")), facts(thunderbolt("10.20.0.2")), "10.0.0.1"),
        (facts(thunderbolt("192.168.200.1")), facts(thunderbolt("192.168.200.1")), "10.0.0.1"),
        # IPv6 is not used for the ring.
        (facts(thunderbolt("fe80::1")), facts(thunderbolt("fe80::2")), "10.0.0.1"),
    ],
)
def test_mesh_address_prefers_a_thunderbolt_address_on_a_peers_subnet(own, peer, expected):
    assert mesh_address(own, "10.0.0.1", [peer]) == expected


def test_mesh_address_asks_peers_in_order():
    own = facts(thunderbolt("192.168.200.1"), thunderbolt("192.168.200.5", name="en3"))
    first, second = facts(thunderbolt("192.168.200.6")), facts(thunderbolt("192.168.200.2"))
    assert mesh_address(own, "lan", [first, second]) == "192.168.200.5"
    assert mesh_address(own, "lan", [None, second, first]) == "192.168.200.1"


def addressed_by_plan(names: Sequence[str], topology) -> list[MeshNode]:
    """A desk cabled as ``topology`` says, each port addressed as the /30 plan says."""
    cables = cabled_pairs(len(names), topology)
    bare = desk(names, cables)
    plan = plan_links(bare, topology)
    addresses = {(end.node, end.interface): end.address for link in plan.links for end in link.ends}
    return desk(names, cables, addresses=addresses)


def test_on_a_thunderbolt_ring_each_rank_listens_on_its_link_to_the_previous_rank():
    nodes = addressed_by_plan(["a", "b", "c", "d"], "ring")
    plan = plan_links(nodes, "ring")
    ranks = rank_endpoints(nodes)
    for r, rank in enumerate(ranks):
        previous = nodes[r - 1].name
        link = next(link for link in plan.links if {e.node for e in link.ends} == {rank.node, previous})
        assert rank.address == next(e.address for e in link.ends if e.node == rank.node)
        assert ipaddress.ip_address(rank.address) in ipaddress.ip_network(link.subnet)


def test_without_thunderbolt_every_rank_listens_on_its_agents_host():
    nodes = [MeshNode(n, f"10.1.0.{i}") for i, n in enumerate("abc")]
    assert rank_endpoints(nodes) == tuple(RankEndpoint(n.name, n.agent_host) for n in nodes)


# ----------------------------------------------------------------------------------------------
# Thunderbolt address plan


@pytest.mark.parametrize(
    ("count", "topology", "pairs"),
    [
        (4, "full-mesh", [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]),
        (4, "ring", [(0, 1), (1, 2), (2, 3), (0, 3)]),
        (3, "ring", [(0, 1), (1, 2), (0, 2)]),
        (2, "ring", [(0, 1)]),
        (2, "full-mesh", [(0, 1)]),
        (1, "ring", []),
        (1, "full-mesh", []),
    ],
)
def test_which_pairs_a_topology_cables(count, topology, pairs):
    assert cabled_pairs(count, topology) == pairs


def test_a_full_mesh_of_three_gets_a_slash_30_per_link_with_the_ports_the_facts_show():
    nodes = desk(["a", "b", "c"], [(0, 1), (0, 2), (1, 2)])
    plan = plan_links(nodes, "full-mesh")
    assert plan.block == "192.168.200.0/24"
    assert plan.links == (
        Link(
            "192.168.200.0/30",
            (LinkAddress("a", "192.168.200.1", "en2"), LinkAddress("b", "192.168.200.2", "en2")),
            True,
        ),
        Link(
            "192.168.200.4/30",
            (LinkAddress("a", "192.168.200.5", "en3"), LinkAddress("c", "192.168.200.6", "en2")),
            True,
        ),
        Link(
            "192.168.200.8/30",
            (LinkAddress("b", "192.168.200.9", "en3"), LinkAddress("c", "192.168.200.10", "en3")),
            True,
        ),
    )
    assert plan.links[0].netmask == "255.255.255.252"
    assert [e.address for e in plan.addresses_of("c")] == ["192.168.200.6", "192.168.200.10"]


def test_a_missing_cable_shows_where_facts_tell_and_is_unknown_where_they_do_not():
    a, b = desk(["a", "b"], [(0, 1)])
    bare_port = NetworkInterface("en2", "thunderbolt", (), False, domain="c/en2")  # a port, no cable
    c = MeshNode("c", "10.0.0.3", facts(ethernet("10.0.0.3"), bare_port))
    links = plan_links([a, b, c], "full-mesh").links
    assert [link.cabled for link in links] == [True, False, False]
    assert links[1].ends == (LinkAddress("a", "192.168.200.5"), LinkAddress("c", "192.168.200.6"))
    without_facts = [MeshNode(n, n) for n in "abc"]
    assert [link.cabled for link in plan_links(without_facts, "full-mesh").links] == [None] * 3


def test_the_address_block_runs_out_past_64_links():
    assert len(plan_links([MeshNode(str(i), "h") for i in range(11)], "full-mesh").links) == 55
    assert len(plan_links([MeshNode(str(i), "h") for i in range(64)], "ring").links) == 64
    with pytest.raises(MeshPlanError, match=r"full-mesh of 12 nodes has 66 .* holds only 64"):
        plan_links([MeshNode(str(i), "h") for i in range(12)], "full-mesh")
    all_links = plan_links([MeshNode(str(i), "h") for i in range(64)], "ring").links
    addresses = [e.address for link in all_links for e in link.ends]
    assert len(set(addresses)) == 128
    assert all(ipaddress.ip_address(a) in MESH_BLOCK for a in addresses)


# ----------------------------------------------------------------------------------------------
# jaccl and the backend choice


def test_the_jaccl_device_matrix_names_each_ranks_port_towards_each_other_rank():
    nodes = desk(["a", "b", "c"], [(0, 1), (0, 2), (1, 2)])
    config = jaccl_config(nodes, 32327)
    assert config == JacclConfig(
        (
            (None, "rdma_en2", "rdma_en3"),
            ("rdma_en2", None, "rdma_en3"),
            ("rdma_en2", "rdma_en3", None),
        ),
        "10.0.0.1:32327",
    )
    # The shape MLX's launcher writes into MLX_IBV_DEVICES.
    assert json.loads(config.devices_json()) == [
        [None, "rdma_en2", "rdma_en3"],
        ["rdma_en2", None, "rdma_en3"],
        ["rdma_en2", "rdma_en3", None],
    ]
    # Rank order follows the nodes given, not the cabling.
    reordered = rdma_matrix([nodes[2], nodes[0]])
    assert reordered == ((None, "rdma_en2"), ("rdma_en3", None))


def without_rdma(node: MeshNode, port: str) -> MeshNode:
    interfaces = tuple(
        NetworkInterface(i.name, i.kind, i.addresses, i.linked, i.domain, i.peer_domain, None)
        if i.name == port
        else i
        for i in node.facts.interfaces
    )
    return MeshNode(node.name, node.agent_host, facts(*interfaces))


FULL = desk(["a", "b", "c"], [(0, 1), (0, 2), (1, 2)])
HALF_DOWN = [FULL[0], FULL[1], without_rdma(FULL[2], "en3")]  # b-c: RDMA at b's end only
RING_ONLY = desk(["a", "b", "c"], [(0, 1), (1, 2)])  # no cable a-c: a line, not a ring
RING_OF_FOUR = desk(["a", "b", "c", "d"], [(0, 1), (1, 2), (2, 3), (0, 3)])  # no a-c, no b-d
LINUX = [MeshNode(n, f"10.0.0.{i}", facts(ethernet(f"10.0.0.{i}"))) for i, n in enumerate("ab")]
NO_FACTS = [MeshNode("a", "10.0.0.1"), FULL[1]]


EVERY_PAIR = "every pair of ranks has an active RDMA device at both ends"
AROUND = (
    "each rank and the next have an active RDMA device at both ends (a ring of RDMA links; none "
    "between a-c, b-d)"
)
CUDA = [
    MeshNode(n, f"10.0.0.{i}", dataclasses.replace(facts(ethernet(f"10.0.0.{i}")), gpu="CUDA"))
    for i, n in enumerate("ab")
]
HALF_CUDA = [CUDA[0], LINUX[1]]
NO_RDMA_OR_CUDA_ON_B = "no RDMA link between a-b; no CUDA GPU on b"


def with_mlx(nodes: list[MeshNode], *versions: str) -> list[MeshNode]:
    return [
        MeshNode(n.name, n.agent_host, dataclasses.replace(n.facts, mlx_version=v))
        for n, v in zip(nodes, versions, strict=True)
    ]


def failed(backend: str, nodes: list[MeshNode]) -> BackendFailure:
    return BackendFailure(backend, backend_fingerprint(nodes), "b", "Cannot initialize jaccl", "h1")


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        (FULL, JacclPlan(True, EVERY_PAIR, jaccl_config(FULL, 32323), "jaccl")),
        (
            RING_OF_FOUR,
            JacclPlan(True, AROUND, JacclConfig(rdma_matrix(RING_OF_FOUR), "10.0.0.1:32323"), "jaccl-ring"),
        ),
        (HALF_DOWN, JacclPlan(False, "no RDMA link between b-c")),
        (RING_ONLY, JacclPlan(False, "no RDMA link between a-c")),
        (LINUX, JacclPlan(False, "no RDMA link between a-b")),
        (NO_FACTS, JacclPlan(False, "RDMA links unknown: no facts from a")),
    ],
)
def test_jaccl_needs_an_rdma_link_between_every_pair_and_jaccl_ring_between_neighbours(nodes, expected):
    assert plan_jaccl(nodes, 32323) == expected


JACCL_FAILED = "jaccl failed to start on b: Cannot initialize jaccl"
NCCL_FAILED = "nccl failed to start on b: Cannot initialize jaccl"
ON_RING_UNTIL = "running on ring until the nodes' facts change or the manifest is applied again"
FULL_JACCL = jaccl_config(FULL, 32323)
RING_JACCL = JacclConfig(rdma_matrix(RING_OF_FOUR), "10.0.0.1:32323")
OLD_MLX = with_mlx(FULL, "0.32.4", "0.32.4", "0.31.0")
MLX_DIFFERS = "the nodes run different MLX versions (0.32.4 on a, 0.32.4 on b, 0.31.0 on c)"
NO_CUDA = "no CUDA GPU on a, b, c"
CUDA_EVERYWHERE = "every node has a CUDA GPU"
NCCL_AT = "10.0.0.0:32323"
JACCL_ASKED, NCCL_ASKED = "mesh.backend is jaccl", "mesh.backend is nccl"
UNKNOWN = "RDMA links unknown: no facts from a"


def fell_back(failure: str, reason: str) -> BackendChoice:
    message = f"{failure}; {ON_RING_UNTIL}"
    return BackendChoice("ring", message, (reason, message))


@pytest.mark.parametrize(
    ("requested", "nodes", "failure", "expected"),
    [
        ("ring", FULL, None, BackendChoice("ring", "mesh.backend is ring")),
        # auto: the fastest the facts allow
        ("auto", FULL, None, BackendChoice("jaccl", f"{EVERY_PAIR}, so auto starts jaccl", jaccl=FULL_JACCL)),
        (
            "auto",
            RING_OF_FOUR,
            None,
            BackendChoice("jaccl-ring", f"{AROUND}, so auto starts jaccl-ring", jaccl=RING_JACCL),
        ),
        (
            "auto",
            CUDA,
            None,
            BackendChoice("nccl", f"{CUDA_EVERYWHERE}, so auto starts nccl", nccl_coordinator=NCCL_AT),
        ),
        ("auto", HALF_CUDA, None, BackendChoice("ring", NO_RDMA_OR_CUDA_ON_B)),
        ("auto", HALF_DOWN, None, BackendChoice("ring", f"no RDMA link between b-c; {NO_CUDA}")),
        (
            "auto",
            NO_FACTS,
            None,
            BackendChoice("ring", f"{UNKNOWN}; no CUDA GPU on a, b"),
        ),
        ("auto", OLD_MLX, None, BackendChoice("ring", f"{MLX_DIFFERS}; {NO_CUDA}")),
        # auto after a failed start on the same facts: ring, Degraded with the failure
        ("auto", FULL, failed("jaccl", FULL), fell_back(JACCL_FAILED, "RDMAUnavailable")),
        ("auto", CUDA, failed("nccl", CUDA), fell_back(NCCL_FAILED, "NCCLUnavailable")),
        # asked for: that backend, or nothing (the model is held back)
        (
            "jaccl",
            FULL,
            None,
            BackendChoice("jaccl", f"{JACCL_ASKED}, and {EVERY_PAIR}", jaccl=FULL_JACCL),
        ),
        (
            "jaccl",
            RING_OF_FOUR,
            None,
            BackendChoice("jaccl-ring", f"mesh.backend is jaccl, and {AROUND}", jaccl=RING_JACCL),
        ),
        (
            "jaccl",
            RING_ONLY,
            None,
            BackendChoice(None, f"{JACCL_ASKED}, but no RDMA link between a-c"),
        ),
        (
            "jaccl",
            NO_FACTS,
            None,
            BackendChoice(None, "mesh.backend is jaccl, but RDMA links unknown: no facts from a"),
        ),
        (
            "jaccl",
            FULL,
            failed("jaccl", FULL),
            BackendChoice(None, f"{JACCL_ASKED}, but {JACCL_FAILED}"),
        ),
        (
            "nccl",
            CUDA,
            None,
            BackendChoice("nccl", f"{NCCL_ASKED}, and {CUDA_EVERYWHERE}", nccl_coordinator=NCCL_AT),
        ),
        ("nccl", HALF_CUDA, None, BackendChoice(None, "mesh.backend is nccl, but no CUDA GPU on b")),
    ],
)
def test_the_backend_is_the_fastest_the_facts_allow_unless_it_failed_or_another_is_asked_for(
    requested, nodes, failure, expected
):
    port = 32323
    assert choose_backend(requested, plan_jaccl(nodes, port), plan_nccl(nodes, port), failure) == expected


def test_a_failure_stands_only_while_the_facts_it_was_planned_from_do():
    failure = failed("jaccl", FULL)
    assert standing_failure(failure, FULL) == failure
    port_changed = [FULL[0], FULL[1], without_rdma(FULL[2], "en3")]
    assert standing_failure(failure, port_changed) is None
    assert standing_failure(failure, with_mlx(FULL, "0.32.4", "0.32.4", "0.32.4")) is None, "MLX upgraded"
    assert standing_failure(None, FULL) is None


def test_launch_fields_carry_each_backends_wiring():
    jaccl = choose_backend("auto", plan_jaccl(FULL, 32323), plan_nccl(FULL, 32323))
    assert jaccl.launch_fields() == {
        "backend": "jaccl",
        "rdma_devices": jaccl_config(FULL, 32323).devices_json(),
        "coordinator": "10.0.0.1:32323",
    }
    nccl = choose_backend("auto", plan_jaccl(CUDA, 32323), plan_nccl(CUDA, 32323))
    assert nccl.launch_fields() == {"backend": "nccl", "coordinator": "10.0.0.0:32323"}
    assert choose_backend("ring", plan_jaccl(FULL, 1), plan_nccl(FULL, 1)).launch_fields() == {}


def test_a_jaccl_config_where_a_pair_lacks_rdma_is_an_error_that_names_the_pair():
    with pytest.raises(MeshPlanError, match="no RDMA link between b-c"):
        jaccl_config(HALF_DOWN, 32323)


def test_a_model_mesh_carries_the_choice_hostfile_and_the_planned_jaccl_config():
    mesh = plan_model_mesh("big", "auto", FULL, [32325, 32323, 32324])
    assert mesh.choice.backend == "jaccl"
    assert mesh.hostfile == ("10.0.0.1:32325", "10.0.0.2:32323", "10.0.0.3:32324")
    assert mesh.jaccl == JacclPlan(True, EVERY_PAIR, jaccl_config(FULL, 32325), "jaccl"), "rank 0's port"
    linux = plan_model_mesh("big", "auto", LINUX, [32323, 32323])
    assert (linux.choice.backend, linux.jaccl.config) == ("ring", None)
    asked = plan_model_mesh("big", "jaccl", FULL, [32323, 32323, 32323])
    assert (asked.choice.backend, asked.jaccl.possible) == ("jaccl", True)


def test_a_ring_port_past_65535_is_an_error_that_says_what_to_lower():
    with pytest.raises(
        MeshPlanError, match=r"rank 1's ring port would be 65536, outside 1-65535.*lower mesh.port"
    ):
        plan_model_mesh("big", "auto", LINUX, [65535, 65536])


def test_the_plan_is_deterministic():
    nodes = addressed_by_plan(["a", "b", "c"], "full-mesh")
    first = [plan_model_mesh("m", "auto", order, [32323] * 3) for order in itertools.permutations(nodes)]
    again = [plan_model_mesh("m", "auto", order, [32323] * 3) for order in itertools.permutations(nodes)]
    assert first == again


# ----------------------------------------------------------------------------------------------
# From a real Mac's recorded command output


def recorded_studio() -> NodeFacts:
    files = {
        macos.SW_VERS: "sw_vers-productVersion.txt",
        macos.CHIP_SYSCTL: "sysctl-machdep.cpu.brand_string.txt",
        macos.HARDWARE_PORTS: "networksetup-listallhardwareports.txt",
        macos.THUNDERBOLT_PROFILE: "system_profiler-SPThunderboltDataType.json",
        macos.RDMA_DEVICES: "ibv_devinfo.txt",
    }
    probe = macos.MacOSProbe(lambda argv: (RECORDINGS / files[tuple(argv)]).read_text())
    addresses = {"en0": ("192.168.1.20",), **{f"en{n}": () for n in range(1, 9)}, "bridge0": ()}
    return NodeFactsCollector(probe, gpu=lambda: "Metal", interface_addresses=lambda: addresses).collect()


def test_the_recorded_mac_is_cabled_with_rdma_to_the_mac_on_its_first_port():
    studio = MeshNode("studio-a", "192.168.1.20", recorded_studio())
    # The other Mac Studio, as its own facts would show it: its port's domain is the one the
    # recording lists as the peer on port 1, and that port's peer is studio-a's port 1.
    peer_port = NetworkInterface(
        "en5",
        "thunderbolt",
        (),
        True,
        domain="2D6F8B41-C03E-4957-A1B8-E7940D5C263F",
        peer_domain="A9C3E7F2-4B18-4D6A-9F05-83E2D1B6C47A",
        rdma_device="rdma_en5",
    )
    other = MeshNode("studio-b", "192.168.1.21", facts(ethernet("192.168.1.21"), peer_port))
    assert (cabled_interface(studio, other), cabled_interface(other, studio)) == ("en2", "en5")
    assert jaccl_config([studio, other], 32323) == JacclConfig(
        ((None, "rdma_en2"), ("rdma_en5", None)), "192.168.1.20:32323"
    )
    link = plan_links([studio, other], "ring").links[0]
    assert link.ends == (
        LinkAddress("studio-a", "192.168.200.1", "en2"),
        LinkAddress("studio-b", "192.168.200.2", "en5"),
    )


# ----------------------------------------------------------------------------------------------
# `genmlx mesh plan`, as a subprocess


def manifest_text(master_port: int, addresses: dict[str, str], models: str, mesh: str = "{}") -> str:
    nodes = "".join(
        f"    - name: {name}\n      storage: [{{path: /tmp/genmlx-mesh/{name}}}]\n"
        + (f"      address: {address}\n" if address else "")
        for name, address in addresses.items()
    )
    return (
        "apiVersion: genmlx/v1\nkind: Cluster\nmetadata: {name: desk}\nspec:\n"
        f"  master: {{node: a, port: {master_port}}}\n  nodes:\n{nodes}  mesh: {mesh}\n{models}"
    )


PAIR_MODEL = "  models:\n    - {name: pair, source: 'hf://org/pair', nodes: [a, b]}\n"


def mesh_plan(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "genmlx", "mesh", "plan", "-f", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.e2e
def test_mesh_plan_without_a_master_plans_from_the_manifest_alone(tmp_path, genmlx_home):
    path = tmp_path / "cluster.yaml"
    models = PAIR_MODEL + "    - {name: solo, source: 'hf://org/solo', nodes: [c]}\n"
    path.write_text(manifest_text(free_port(), {"a": "10.0.0.1:6790", "b": None, "c": None}, models))
    nobody = f"http://127.0.0.1:{free_port()}"
    done = mesh_plan(path, "-o", "json", "--master", nobody)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["facts"]["fromMaster"] is False
    assert "no master answers" in document["facts"]["detail"]
    assert document["factsMissing"] == ["a", "b", "c"]
    assert [link["subnet"] for link in document["thunderbolt"]["links"]] == [
        "192.168.200.0/30",
        "192.168.200.4/30",
        "192.168.200.8/30",
    ]
    assert [m["name"] for m in document["models"]] == ["pair"], "a one-node model needs no mesh"
    pair = document["models"][0]
    # No master: no ranks are known to run, and a and b are counted as different hosts.
    assert "fresh cluster" in document["ports"]
    assert (pair["httpPorts"], pair["ringPorts"]) == ([8100, 8100], [32323, 32323])
    assert pair["hostfile"] == [["10.0.0.1:32323"], ["b.local:32323"]]
    assert (pair["backend"], pair["reason"]) == (
        "ring",
        "RDMA links unknown: no facts from a, b; no CUDA GPU on a, b",
    )

    text = mesh_plan(path, "--master", nobody)
    assert text.returncode == 0, text.stderr
    assert "node facts: unavailable: no master answers" in text.stdout
    assert "ports: as a fresh cluster would get them: no master answered" in text.stdout
    assert 'ring hostfile: [["10.0.0.1:32323"], ["b.local:32323"]]' in text.stdout
    assert "sudo ifconfig <the Thunderbolt port cabled to b> inet 192.168.200.1 netmask 255.255.255.252" in (
        text.stdout
    )


@pytest.mark.e2e
def test_mesh_plan_exits_1_when_jaccl_is_asked_for(tmp_path, genmlx_home):
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest_text(free_port(), {"a": None, "b": None}, PAIR_MODEL, "{backend: jaccl}"))
    done = mesh_plan(path, "--master", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert "error: mesh.backend is jaccl, but RDMA links unknown: no facts from a, b" in done.stdout
    assert "jaccl would not be possible either: RDMA links unknown: no facts from a, b" in done.stdout


@pytest.mark.e2e
def test_mesh_plan_refuses_an_invalid_manifest_as_validate_does(tmp_path, genmlx_home):
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest_text(free_port(), {"a": None, "b": None}, PAIR_MODEL, "{topology: star}"))
    done = mesh_plan(path)
    validate = subprocess.run(
        [sys.executable, "-m", "genmlx", "validate", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == validate.stderr
    assert "spec.mesh.topology" in done.stderr


@pytest.mark.e2e
def test_mesh_plan_exits_1_when_the_address_block_runs_out(tmp_path, genmlx_home):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        manifest_text(free_port(), {f"n{i}": None for i in range(12)}, "").replace("node: a", "node: n0")
    )
    done = mesh_plan(path)
    assert done.returncode == 1
    assert "error: a full-mesh of 12 nodes has 66 Thunderbolt links" in done.stdout


@pytest.mark.e2e
def test_mesh_plan_takes_addresses_and_facts_from_the_master(tmp_path, genmlx_home, token, spawn):
    agents = [start_agent(spawn, token, name, (tmp_path / name,)) for name in ("a", "b")]
    master_port = free_port()
    applied = tmp_path / "applied.yaml"
    applied.write_text(manifest_text(master_port, {a.name: a.address for a in agents}, ""))
    spawn(["-m", "genmlx", "master", "-f", str(applied), "--host", "127.0.0.1"], "master")
    url = f"http://127.0.0.1:{master_port}"

    def facts_of_both() -> bool:
        try:
            status = call_master(url, token, "GET", "/api/v1/status", timeout=5)
        except GenMLXError:
            return False
        return all(node.get("facts") for node in status["nodes"]) and len(status["nodes"]) == 2

    wait_until(facts_of_both, timeout=60, what="the master to report both agents' facts")
    # The file planned declares no addresses: they come from the master, with the facts.
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest_text(master_port, {"a": None, "b": None}, PAIR_MODEL))
    done = mesh_plan(path, "-o", "json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["facts"] == {"fromMaster": True, "detail": f"from the master at {url}"}
    assert (document["factsMissing"], document["addressesGuessed"]) == ([], [])
    pair = document["models"][0]
    # Both agents answer on 127.0.0.1: one host, so the ranks take HTTP ports 8100 and 8101.
    assert document["ports"].startswith("as the master assigns them")
    assert pair["hostfile"] == [["127.0.0.1:32323"], ["127.0.0.1:32324"]]
    assert (pair["backend"], pair["reason"]) == ("ring", "no RDMA link between a-b; no CUDA GPU on a, b")
    assert (pair["jaccl"]["possible"], pair["jaccl"]["devices"]) == (False, None)
    assert pair["runningHostfile"] is None, "the master runs no model"
    # Linux nodes report no Thunderbolt ports: which port a cable would go in stays unknown.
    link = document["thunderbolt"]["links"][0]
    assert (link["cabled"], [e["interface"] for e in link["ends"]]) == (None, [None, None])


def test_two_cables_between_a_pair_address_both_ends_of_one_and_use_rdma_where_both_ends_have_it():
    a, b = desk(["a", "b"], [(0, 1), (0, 1)])  # a.en2-b.en2 and a.en3-b.en3
    b = without_rdma(b, "en2")
    link = plan_links([a, b], "ring").links[0]
    assert [(e.node, e.interface) for e in link.ends] == [("a", "en2"), ("b", "en2")]
    assert rdma_matrix([a, b]) == ((None, "rdma_en3"), ("rdma_en3", None))


def test_a_port_whose_peer_does_not_point_back_is_no_cable():
    a, b = desk(["a", "b"], [(0, 1)])
    stale = NetworkInterface("en2", "thunderbolt", (), True, domain="b/en2", peer_domain="x/en9")
    b = MeshNode("b", b.agent_host, facts(stale))
    assert (cabled_interface(a, b), cabled_interface(b, a)) == (None, None)
    assert plan_links([a, b], "ring").links[0].cabled is False


# ----------------------------------------------------------------------------------------------
# The planned hostfiles, used by real MLX ranks

JOIN_AND_SUM = """
import json
import mlx.core as mx
group = mx.distributed.init(strict=True, backend="ring")
total = mx.distributed.all_sum(mx.array([float(group.rank() + 1)]), group=group)
print(json.dumps([group.rank(), group.size(), total.item()]))
"""


@pytest.mark.e2e
def test_two_models_ranks_sharing_one_host_form_two_rings_at_once(tmp_path):
    models = [spec("one", "a", "b"), spec("two", "a", "b")]
    # Two agents on one host, as the master would see them: four ranks, four ring ports from base.
    ports = ring_ports_of(cluster(*models, port=free_ports(4)), on_hosts("127.0.0.1", "127.0.0.1"))
    loopback = [MeshNode("a", "127.0.0.1"), MeshNode("b", "127.0.0.1")]
    procs = []
    for m in models:
        mesh = plan_model_mesh(m.name, "auto", loopback, ports[m.name])
        hostfile = tmp_path / f"{m.name}.json"
        hostfile.write_text(json.dumps([[entry] for entry in mesh.hostfile]))  # as the agent writes it
        for rank in range(2):
            env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", JOIN_AND_SUM], env=env, stdout=subprocess.PIPE, text=True
                )
            )
    try:
        results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert results == [[0, 2, 3.0], [1, 2, 3.0]] * 2


def test_observed_nodes_give_the_planner_their_agents_host_and_facts():
    mac = FULL[0].facts
    observed = {
        "a": ObservedNode("a", "10.0.0.1:6790", "ready", state=AgentState("a", "1", mac)),
        "b": ObservedNode("b", "10.0.0.2:6790", "unreachable"),
    }
    assert observed_mesh_nodes(["b", "a"], observed) == [
        MeshNode("b", "10.0.0.2"),
        MeshNode("a", "10.0.0.1", mac),
    ]


def test_the_hostfile_a_running_group_was_started_with_comes_from_rank_0_in_the_status():
    hostfile = ("10.0.0.1:32323", "10.0.0.2:32324")
    pair = (ranked("b", launched("pair", 1, hostfile)), ranked("a", launched("pair", 0, hostfile)))
    status = status_with_models(
        model_status("other", ranked("a", launched("other", 0, ("x:1", "y:2")))),
        model_status("pair", *pair),
        model_status("solo", ranked("c", launched("solo", 0))),
    )
    assert running_hostfile(status, "pair") == [["10.0.0.1:32323"], ["10.0.0.2:32324"]]
    assert running_hostfile(status, "solo") is None, "one rank: no hostfile"
    assert running_hostfile(status, "absent") is None
    assert running_hostfile(None, "pair") is None


READY = ConditionReport("Ready", "True", "Serving", "")


def launched(model: str, rank: int, hostfile: tuple[str, ...] = ()) -> RankInfo:
    world = max(1, len(hostfile))
    return RankInfo(RankLaunch(model, f"/m/{model}", rank, world, 8100, "h", hostfile), 1, "running", 0.0)


def ranked(node: str, info: RankInfo) -> ModelRank:
    return ModelRank(**vars(info), node=node)


def model_status(name: str, *ranks: ModelRank) -> ModelStatus:
    nodes = tuple(rank.node for rank in ranks)
    return ModelStatus(name, f"hf://org/{name}", "main", nodes, "auto", "Ready", (READY,), ranks=ranks)


def status_with_models(*models: ModelStatus) -> ClusterStatus:
    return ClusterStatus(1, 1, (READY,), name="test", models=models)


def status_of(observed: Observed) -> ClusterStatus:
    """The nodes of the master's status document, as ``report.node_document`` writes them."""
    nodes = tuple(
        NodeStatus(
            node.name,
            (READY,),
            node.address,
            facts=node.state.facts if node.state else None,
            storage=node.state.storage if node.state else (),
            ranks=node.ranks,
        )
        for node in observed.nodes.values()
    )
    return ClusterStatus.from_json(ClusterStatus(1, 1, (READY,), name="test", nodes=nodes).to_json())


def plan_document(manifest: Manifest, status: ClusterStatus | None) -> dict:
    source = FactsSource(status is not None, "test")
    return mesh_document(manifest, mesh_nodes(manifest, status), source, status)


def test_the_plan_shows_the_hostfile_the_master_would_start_the_group_with():
    other = (running("other", 0, 8100),)  # another model's rank holds 8100 on a's host
    kept = running("pair", 1, 8104, (40000, 40004))  # pair's rank 1 runs: it keeps its ports
    observed = on_hosts("127.0.0.1", "127.0.0.1", "10.0.0.3", ranks={"a": other, "b": (kept,)})
    manifest = cluster(spec("solo", "c"), spec("pair", "a", "b"), spec("tri", "c", "b", "a"), port=40000)
    document = plan_document(manifest, status_of(observed))
    ports = groups.assign_rank_ports(manifest, observed)
    for model in document["models"]:
        model_spec = manifest.model(model["name"])
        master = groups.ring_hostfile(model_spec, observed, ports[model_spec.name].ring)
        assert model["hostfile"] == [[entry] for entry in master]
    pair = document["models"][0]
    assert (pair["httpPorts"], pair["ringPorts"]) == ([8101, 8104], [40000, 40004])
    assert [m["name"] for m in document["models"]] == ["pair", "tri"]


def test_a_node_the_master_could_not_reach_is_planned_without_facts_at_its_address():
    observed = on_hosts("10.0.0.1", "10.0.0.2")
    status = status_of(replace_node(observed, ObservedNode("b", "10.0.0.2:6790", "unreachable", "refused")))
    document = plan_document(cluster(spec("pair", "a", "b")), status)
    assert document["factsMissing"] == ["b", "c"]
    assert document["addressesGuessed"] == ["c"]
    assert document["models"][0]["hostfile"] == [["10.0.0.1:32323"], ["10.0.0.2:32323"]]


def replace_node(observed: Observed, node: ObservedNode) -> Observed:
    return Observed(observed.now, {**observed.nodes, node.name: node})


def test_where_every_pair_has_rdma_auto_starts_jaccl_and_prints_how_it_is_wired():
    nodes = {n.name: n for n in FULL}
    observed = Observed(
        0.0,
        {
            n: ObservedNode(n, f"{m.agent_host}:6790", "ready", state=AgentState(n, "1", m.facts))
            for n, m in nodes.items()
        },
    )
    document = plan_document(cluster(spec("big", "a", "b", "c")), status_of(observed))
    (big,) = document["models"]
    assert (big["backend"], big["error"]) == ("jaccl", None)
    assert big["jaccl"]["coordinator"] == "10.0.0.1:32323"
    text = format_mesh_plan(document)
    assert f"backend jaccl: {EVERY_PAIR}, so auto starts jaccl" in text
    assert "    jaccl (the ranks start on it):\n      devices (MLX_IBV_DEVICES): [[null, " in text
    assert "coordinator (MLX_JACCL_COORDINATOR): 10.0.0.1:32323" in text
