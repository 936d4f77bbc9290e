"""Where each cabled Thunderbolt link of the mesh plan stands, from the last check made at each of
its ends: a pure reading of the plan, the checks and the node facts, for status, the page and
``genmlx mesh plan``.

A link is expected to carry, in one TCP stream, a tenth of the speed its ports report
(system_profiler rates a Thunderbolt 4 link "40 Gb/s", Thunderbolt 5 "80 Gb/s"): far below that,
the cable, a port or a hub in between is at fault. Where the port reports no speed, a Thunderbolt
link is expected to carry at least ``THUNDERBOLT_FLOOR_GBIT_S``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from genmlx.master.planning.backends import LinksDown, link_key
from genmlx.master.planning.mesh import Link, MeshNode, MeshPlan, thunderbolt_interfaces
from genmlx.wire.links import LinkCheck
from genmlx.wire.status import LinkEndStatus, LinkStatus

EXPECTED_SHARE = 0.1  # of the rated link speed, in one stream
THUNDERBOLT_FLOOR_GBIT_S = 2.0

LinkChecksByEnd = Mapping[tuple[str, str], LinkCheck]  # (subnet, node) -> last check from that end


def checked_links(plan: MeshPlan) -> list[Link]:
    """The links worth checking: those the node facts show a cable for."""
    return [link for link in plan.links if link.cabled]


def link_reports(
    plan: MeshPlan, checks: LinkChecksByEnd, nodes: Mapping[str, MeshNode]
) -> tuple[LinkStatus, ...]:
    """Every cabled link of ``plan`` with its ends' last checks, its state and any warning."""
    return tuple(link_report(link, checks, nodes) for link in checked_links(plan))


def link_report(link: Link, checks: LinkChecksByEnd, nodes: Mapping[str, MeshNode]) -> LinkStatus:
    ends = tuple(
        LinkEndStatus(end.node, end.address, end.interface, checks.get((link.subnet, end.node)))
        for end in link.ends
    )
    found = [end.last_check for end in ends if end.last_check is not None]
    state = link_state(found, len(ends))
    expected = expected_gbit_s(link, nodes)
    return LinkStatus(link.subnet, state, ends, expected, slow_warning(ends, expected))


def link_state(checks: Sequence[LinkCheck], ends: int) -> str:
    if any(not c.addressed for c in checks):
        return "unaddressed"
    if any(not c.up for c in checks):
        return "down"
    return "up" if len(checks) == ends else "unchecked"


def expected_gbit_s(link: Link, nodes: Mapping[str, MeshNode]) -> float:
    """What one stream over ``link`` should carry: a share of the slower end's rated speed."""
    rated = [
        port.link_gbps
        for end in link.ends
        for port in thunderbolt_interfaces(nodes[end.node].facts if end.node in nodes else None)
        if port.name == end.interface and port.link_gbps
    ]
    return round(min(rated) * EXPECTED_SHARE, 3) if rated else THUNDERBOLT_FLOOR_GBIT_S


def slow_warning(ends: Sequence[LinkEndStatus], expected: float) -> str:
    """A warning naming each end that measured less than ``expected``, with the numbers."""
    slow = [
        f"{end.node} measured {end.last_check.gbit_s:g} Gbit/s"
        for end in ends
        if end.last_check is not None
        and end.last_check.up
        and end.last_check.gbit_s is not None
        and end.last_check.gbit_s < expected
    ]
    if not slow:
        return ""
    return (
        f"slower than a Thunderbolt link should be: {', '.join(slow)}; expected at least {expected:g} Gbit/s"
    )


def links_down(links: Sequence[LinkStatus]) -> LinksDown:
    """The cables found down, and why (from the first end that could not reach the other): what
    the planner takes as no RDMA link. An unaddressed cable is not among them: jaccl needs no
    address on it, so nothing is known to be broken."""
    found = {}
    for link in links:
        failed = [end for end in link.ends if end.last_check is not None and not end.last_check.up]
        if link.state == "down" and failed:
            pair = link_key(link.ends[0].node, link.ends[1].node)
            found[pair] = f"from {failed[0].node}: {failed[0].last_check.detail}"
    return found
