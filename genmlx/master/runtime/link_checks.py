"""Link verification on a schedule: every cabled Thunderbolt link of the mesh plan is checked from
both ends (each end's agent reaches the other's planned address, times the round trip and a bounded
probe) every ``interval_s``, and at once when a user asks (``POST /api/v1/links/verify``, ``genmlx
mesh plan --verify``). Checks run in the background; a pass reads the latest verdicts, and each
new verdict wakes the loop so that status shows it without waiting for the next resync. Each pass
hands over the links it plans; between passes a timer of its own starts the checks that fall due
on those, so a long pass (ranks starting, an agent slow to answer) does not delay them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping

from genmlx.core.errors import GenMLXError
from genmlx.manifest.types import Manifest
from genmlx.master.planning.backends import LinksDown
from genmlx.master.planning.link_status import checked_links, link_reports, links_down
from genmlx.master.planning.mesh import MeshNode, MeshPlan, MeshPlanError, plan_links
from genmlx.master.planning.observed import Observed
from genmlx.master.runtime.agent_client import LINK_CHECK_MARGIN_S, AgentClient
from genmlx.wire.links import DEFAULT_PROBE_BYTES, DEFAULT_PROBE_SECONDS, LinkCheck, LinkCheckRequest
from genmlx.wire.status import LinkStatus

log = logging.getLogger("genmlx.master")

DEFAULT_INTERVAL_S = 300.0
TICK_S = 1.0  # how often, between passes, the checks that are due are started
EndKey = tuple[str, str]  # (subnet, node)


class LinkChecks:
    """Runs each link end's check when it is due and remembers the last verdict of each."""

    def __init__(self, interval_s: float, probe_bytes: int, probe_seconds: float):
        self.on_result: Callable[[], None] = lambda: None
        self._interval_s = interval_s
        self._probe = (probe_bytes, probe_seconds)
        self._results: dict[EndKey, LinkCheck] = {}
        self._running: dict[EndKey, asyncio.Task] = {}
        self._asked_at = 0.0  # checks older than a user's request are due at once
        # The last pass's links, the nodes they join, what it observed and its agents' clients.
        self._following: (
            tuple[MeshPlan, Mapping[str, MeshNode], Observed, Mapping[str, AgentClient]] | None
        ) = None
        self._ticking: asyncio.Task | None = None

    @classmethod
    def from_environment(cls) -> LinkChecks:
        """``GENMLX_LINK_CHECK_INTERVAL_S``, ``GENMLX_LINK_PROBE_BYTES``, ``GENMLX_LINK_PROBE_SECONDS``."""
        return cls(
            float(os.environ.get("GENMLX_LINK_CHECK_INTERVAL_S", DEFAULT_INTERVAL_S)),
            int(os.environ.get("GENMLX_LINK_PROBE_BYTES", DEFAULT_PROBE_BYTES)),
            float(os.environ.get("GENMLX_LINK_PROBE_SECONDS", DEFAULT_PROBE_SECONDS)),
        )

    def follow(
        self,
        manifest: Manifest,
        nodes: Mapping[str, MeshNode],
        observed: Observed,
        clients: Mapping[str, AgentClient],
    ) -> tuple[LinkStatus, ...]:
        """Start the checks that are due on the links the manifest's topology plans over ``nodes``
        (every declared node, as the pass observed it), and report each cabled link."""
        try:
            declared = [nodes.get(n.name, MeshNode(n.name, "")) for n in manifest.nodes]
            plan = plan_links(declared, manifest.mesh.topology)
        except MeshPlanError:
            self._following = None
            return ()  # status says why elsewhere (mesh plan); nothing to check
        self._following = (plan, nodes, observed, clients)
        self._start_due()
        if self._ticking is None or self._ticking.done():
            self._ticking = asyncio.ensure_future(self._tick())
        return self.reports() or ()

    def reports(self) -> tuple[LinkStatus, ...] | None:
        """Each cabled link of the last pass's plan as its ends' latest checks have it now (a pass
        may be under way for seconds, its snapshot older than a check); None before a pass."""
        if self._following is None:
            return None
        plan, nodes, *_ = self._following
        return link_reports(plan, self._results, nodes)

    def stop(self) -> None:
        """Stop starting checks between passes (the master is stopping)."""
        if self._ticking is not None:
            self._ticking.cancel()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(min(TICK_S, self._interval_s))
            self._start_due()

    def _start_due(self) -> None:
        """Start the checks that are due on the links the last pass planned."""
        if self._following is None:
            return
        plan, nodes, observed, clients = self._following
        now = time.time()
        for link in checked_links(plan):
            for end, peer in zip(link.ends, reversed(link.ends), strict=True):
                key = (link.subnet, end.node)
                client, peer_node = clients.get(end.node), observed.nodes.get(peer.node)
                if client is None or peer_node is None or not self._due(key, now):
                    continue
                port = int(peer_node.address.rsplit(":", 1)[1])
                request = LinkCheckRequest(end.address, peer.address, port, end.interface, *self._probe)
                self._running[key] = asyncio.ensure_future(self._check(key, client, request))

    def any_planned(self) -> bool:
        """Whether the last pass planned any link to check."""
        return self._following is not None and bool(checked_links(self._following[0]))

    def down(self) -> LinksDown:
        """The cables of the last pass's plan whose latest checks found them down, and why."""
        reports = self.reports()
        return links_down(reports) if reports is not None else {}

    def ask(self) -> None:
        """Make every link due now (the next pass starts their checks)."""
        self._asked_at = time.time()

    async def settled(self, timeout_s: float) -> None:
        """Wait until no check is running (at most ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    @property
    def longest_check_s(self) -> float:
        """How long one check may take: its probe and the margin its agent call allows."""
        return self._probe[1] + LINK_CHECK_MARGIN_S

    def _due(self, key: EndKey, now: float) -> bool:
        if key in self._running:
            return False
        last = self._results.get(key)
        return last is None or last.checked_at < self._asked_at or now - last.checked_at >= self._interval_s

    async def _check(self, key: EndKey, client: AgentClient, request: LinkCheckRequest) -> None:
        try:
            result = await client.check_link(request)
        except GenMLXError as e:
            result = LinkCheck(
                request.local_address, request.peer_address, False, time.time(), request.interface, str(e)
            )
        finally:
            self._running.pop(key, None)
        previous = self._results.get(key)
        self._results[key] = result
        if previous is None or previous.up != result.up:
            log.log(
                logging.INFO if result.up else logging.WARNING,
                "link %s from %s: %s",
                key[0],
                key[1],
                describe(result),
            )
        self.on_result()


def describe(check: LinkCheck) -> str:
    if not check.up:
        return f"down: {check.detail}"
    speed = f", {check.gbit_s:g} Gbit/s" if check.gbit_s is not None else ""
    return f"up, {check.rtt_ms:g} ms{speed}"
