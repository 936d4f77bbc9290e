"""Link verification, from one end and as the master reports it. A real agent checks a link end
on loopback (its probe read from another real agent, signed both ways), says what is wrong at its
end before sending anything, and refuses probes from outside the cluster; the report of each
cabled link is up, down or unchecked from its two ends' last checks, and warns, with the numbers,
where a link carries less than its ports are rated for."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from agent_harness import call, start_agent
from builders import manifest, node, observed

from genmlx.master.planning.link_status import link_reports
from genmlx.master.planning.mesh import MeshNode, plan_links
from genmlx.master.runtime.link_checks import LinkChecks
from genmlx.wire.agent_state import NetworkInterface, NodeFacts
from genmlx.wire.links import LinkCheck, LinkCheckRequest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def two_agents(spawn, tmp_path, token):
    return [start_agent(spawn, token, name, (tmp_path / name,)) for name in ("a", "b")]


def test_an_agent_checks_its_end_with_a_round_trip_and_a_probe_from_the_peer_agent(two_agents, token):
    a, b = two_agents
    request = {"localAddress": "127.0.0.1", "peerAddress": "127.0.0.1", "peerPort": b.port, "interface": "lo"}
    reply = a.call("POST", "/api/v1/links/check", {**request, "probeBytes": 64 << 20, "probeSeconds": 5})
    assert reply.status == 200, reply.body
    check = LinkCheck.from_json(reply.json())
    assert check.up and check.interface == "lo" and check.detail == ""
    assert 0 < check.rtt_ms < 1000
    # Every byte but those of the first read, which starts the clock.
    assert (63 << 20) <= check.probe_bytes < 64 << 20
    assert check.gbit_s > 0


def test_what_is_wrong_at_this_end_is_said_before_anything_is_sent(two_agents):
    a, b = two_agents
    base = {"localAddress": "127.0.0.1", "peerAddress": "127.0.0.1", "peerPort": b.port}
    cases = [  # (what the request says instead, what the check says, whether the address is there)
        ({"interface": "en9"}, "en9 is not an interface of this node", True),
        (
            {"interface": "lo", "localAddress": "192.168.200.1"},
            "lo does not have 192.168.200.1 (genmlx mesh apply",
            False,
        ),
        ({"peerPort": 1}, "127.0.0.1:1 unreachable over lo", True),
    ]
    for change, detail, addressed in cases:
        check = LinkCheck.from_json(
            a.call("POST", "/api/v1/links/check", {**base, "interface": "lo", **change}).json()
        )
        assert not check.up and detail in check.detail, (change, check)
        assert check.addressed is addressed, (change, check)
    bad = a.call("POST", "/api/v1/links/check", {**base, "probeBytes": 2 << 30})
    assert bad.status == 400 and "probeBytes" in bad.json()["error"]["message"]


def test_the_probe_answers_only_the_cluster_and_stays_bounded(two_agents, token):
    a, _ = two_agents
    assert call("GET", f"{a.url}/api/v1/links/probe?bytes=1048576", None).status == 401
    assert call("GET", f"{a.url}/api/v1/links/probe?bytes=1048576", "another-clusters-token").status == 401
    streamed = call("GET", f"{a.url}/api/v1/links/probe?bytes=3000000", token)
    assert streamed.status == 200 and streamed.body == bytes(3000000)
    too_much = call("GET", f"{a.url}/api/v1/links/probe?bytes={(1 << 30) + 1}", token)
    assert too_much.status == 400


# ----------------------------------------------------------------------------------------------
# The report of each link


def mac(name: str, host: str, gbps: float | None) -> MeshNode:
    port = NetworkInterface(
        "en2", "thunderbolt", (), True, f"{name}/en2", f"{'b' if name == 'a' else 'a'}/en2", None, gbps
    )
    return MeshNode(name, host, NodeFacts(name, "Darwin", "arm64", 8, 1 << 36, 1 << 35, interfaces=(port,)))


PAIR = {"a": mac("a", "10.0.0.1", 80.0), "b": mac("b", "10.0.0.2", 40.0)}
PLAN = plan_links(list(PAIR.values()), "full-mesh")
SUBNET = "192.168.200.0/30"


def check(
    up: bool = True, gbit_s: float | None = 20.0, detail: str = "", addressed: bool = True
) -> LinkCheck:
    rtt = 0.2 if up else None
    return LinkCheck(
        "192.168.200.1", "192.168.200.2", up, 100.0, "en2", detail, rtt, gbit_s, addressed=addressed
    )


@pytest.mark.parametrize(
    ("checks", "state", "warning"),
    [
        ({}, "unchecked", ""),
        ({"a": check()}, "unchecked", ""),
        ({"a": check(), "b": check()}, "up", ""),
        ({"a": check(), "b": check(False, None, "en2 is down")}, "down", ""),
        (
            {"a": check(False, None, "unreachable"), "b": check(False, None, "no address", False)},
            "unaddressed",
            "",
        ),
        (
            {"a": check(gbit_s=1.5), "b": check()},
            "up",
            "slower than a Thunderbolt link should be: a measured 1.5 Gbit/s; expected at least 4 Gbit/s",
        ),
    ],
)
def test_a_link_is_up_only_from_both_ends_and_slow_against_a_tenth_of_its_slower_port(checks, state, warning):
    (report,) = link_reports(PLAN, {(SUBNET, node): c for node, c in checks.items()}, PAIR)
    assert (report.subnet, report.state, report.warning) == (SUBNET, state, warning)
    assert report.expected_gbit_s == 4.0, "a tenth of the slower end's 40 Gb/s"
    assert [(e.node, e.address, e.interface) for e in report.ends] == [
        ("a", "192.168.200.1", "en2"),
        ("b", "192.168.200.2", "en2"),
    ]


def test_unrated_ports_are_held_to_a_floor_and_uncabled_links_are_not_reported():
    unrated = {
        n: replace(m, facts=replace(m.facts, interfaces=(replace(m.facts.interfaces[0], link_gbps=None),)))
        for n, m in PAIR.items()
    }
    (report,) = link_reports(plan_links(list(unrated.values()), "full-mesh"), {}, unrated)
    assert report.expected_gbit_s == 2.0
    bare = {n: MeshNode(n, m.agent_host) for n, m in PAIR.items()}
    assert link_reports(plan_links(list(bare.values()), "full-mesh"), {}, bare) == ()


# ----------------------------------------------------------------------------------------------
# The master's schedule


class RecordingAgent:
    """An agent client that answers link checks with what the test says, and counts them."""

    def __init__(self, answer: LinkCheck):
        self.answer = answer
        self.asked: list[LinkCheckRequest] = []

    async def check_link(self, request: LinkCheckRequest) -> LinkCheck:
        self.asked.append(request)
        return replace(self.answer, checked_at=time.time())


def test_the_master_checks_each_end_when_due_and_plans_around_a_cable_found_down():
    async def scenario():
        checks = LinkChecks(interval_s=3600, probe_bytes=1 << 20, probe_seconds=0.5)
        agents = {"a": RecordingAgent(check()), "b": RecordingAgent(check(False, None, "en2 is down"))}
        seen = observed(node("a"), node("b"))
        checks.follow(manifest(), PAIR, seen, agents)
        await checks.settled(5)
        (request,) = agents["a"].asked
        assert (request.local_address, request.peer_address, request.peer_port) == (
            "192.168.200.1",
            "192.168.200.2",
            6790,
        )
        assert (request.interface, request.probe_bytes, request.probe_seconds) == ("en2", 1 << 20, 0.5)
        assert agents["b"].asked[0].local_address == "192.168.200.2"
        assert checks.down() == {("a", "b"): "from b: en2 is down"}
        (report,) = checks.follow(manifest(), PAIR, seen, agents)
        assert report.state == "down" and len(agents["a"].asked) == 1, "not due again within the interval"
        checks.ask()
        checks.follow(manifest(), PAIR, seen, agents)
        await checks.settled(5)
        assert len(agents["a"].asked) == 2, "asked for: due at once"
        agents["b"].answer = check(False, None, "lo does not have 192.168.200.2", addressed=False)
        checks.ask()
        checks.follow(manifest(), PAIR, seen, agents)
        await checks.settled(5)
        assert checks.down() == {}, "an end without its address proves nothing broken"

    asyncio.run(scenario())


def test_checks_fall_due_and_start_between_passes_until_the_master_stops():
    """A pass can take seconds (ranks starting, an agent slow to answer); the checks of the links
    the last pass planned start when due all the same."""

    async def scenario():
        checks = LinkChecks(interval_s=0.2, probe_bytes=1 << 20, probe_seconds=0.5)
        agents = {"a": RecordingAgent(check()), "b": RecordingAgent(check())}
        checks.follow(manifest(), PAIR, observed(node("a"), node("b")), agents)  # one pass, then none
        await asyncio.sleep(1.5)
        assert len(agents["a"].asked) >= 3 and len(agents["b"].asked) >= 3, "due every 0.2 s, started"
        checks.stop()
        await checks.settled(5)
        asked = len(agents["a"].asked)
        await asyncio.sleep(0.6)
        assert len(agents["a"].asked) == asked, "none once the master stops"

    asyncio.run(scenario())


def test_the_links_reported_are_the_latest_checks_not_the_last_passs():
    """Status reads each link as its ends' latest checks have it, while a pass may still be under
    way (one waiting on an agent behind the very cable that was cut)."""

    async def scenario():
        checks = LinkChecks(interval_s=0.2, probe_bytes=1 << 20, probe_seconds=0.5)
        assert checks.reports() is None, "before a pass"
        agents = {"a": RecordingAgent(check()), "b": RecordingAgent(check())}
        checks.follow(manifest(), PAIR, observed(node("a"), node("b")), agents)
        await checks.settled(5)
        (report,) = checks.reports()
        assert report.state == "up"
        agents["b"].answer = check(False, None, "en2 is down")  # the cable is cut; no pass comes
        await asyncio.sleep(1)
        (report,) = checks.reports()
        assert report.state == "down"
        checks.stop()

    asyncio.run(scenario())
