"""Discovery: the agents that announce ``_genmlx._tcp.local.`` on the master's networks.

``AgentDiscovery`` browses with zeroconf, resolves each service as it appears or changes, and
keeps every ``DiscoveredAgent`` by service; every add, change or removal calls ``on_change`` (the
reconciler's ``wake``), so a new agent is observed by the very next pass. Announcing is not
proof: anything on the network can announce a node's name, and the master believes only what
answers with the cluster token's signature (``genmlx.master.runtime.observe``). An agent that stops
sends goodbye packets and is forgotten at once; one that is killed, once it stops answering. Which of them the
master uses is the manifest's business: agents it does not declare are reported as unmanaged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from genmlx.core.mdns import API_VERSION, SERVICE_TYPE, local_networks, zeroconf_addresses
from genmlx.wire.status import AnnouncedAgent

log = logging.getLogger("genmlx.master")

RESOLVE_TIMEOUT_MS = 3000
# A killed agent sends no goodbye, and zeroconf keeps its PTR record for at least 19 minutes.
# So every known agent is re-resolved this often: from the cache while its address records
# live (120 s), then by asking the network; one that no longer answers is forgotten.
RECHECK_S = 10.0


@dataclass(frozen=True)
class DiscoveredAgent:
    """An agent as its announcement describes it."""

    name: str  # the node name it announces
    address: str  # "ip:port" of its API, the announced address the master prefers
    node_id: str
    version: str
    last_seen: float = field(compare=False)  # unix time of its latest announcement
    storage: tuple[str, ...] = field(default=(), compare=False)  # where known (a node that joined)
    alternates: tuple[str, ...] = ()  # its other announced "ip:port", tried where address fails

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every "ip:port" of its announcement the master may use, the preferred first."""
        return (self.address, *self.alternates)

    def report(self) -> AnnouncedAgent:
        return AnnouncedAgent(self.name, self.address, self.node_id, self.version, self.storage)


def with_known(announced: tuple[DiscoveredAgent, ...], known: DiscoveredAgent) -> tuple[DiscoveredAgent, ...]:
    """What announces a node's name, together with an agent known without announcing (this
    process's own, a node that joined): the known one where nothing announces the name, else the
    announcements, the one at the known agent's address with what the master knows of it (a
    joined node's storage paths, which no announcement carries)."""
    if not announced:
        return (known,)
    return tuple(
        replace(agent, storage=known.storage) if agent.address == known.address and known.storage else agent
        for agent in announced
    )


class AgentDiscovery:
    """Browses for agents on the interfaces that ``listen_host`` puts the master on."""

    def __init__(self, listen_host: str):
        self._listen_host = listen_host
        self._by_service: dict[str, DiscoveredAgent] = {}
        self._resolving: dict[str, asyncio.Task] = {}
        self._on_change: Callable[[], None] = lambda: None
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._rechecks: asyncio.Task | None = None

    @property
    def announcers(self) -> dict[str, tuple[DiscoveredAgent, ...]]:
        """What announces each node name now: one agent, or more where something else claims the
        same name (the master asks each which of them holds the cluster token)."""
        found: dict[str, list[DiscoveredAgent]] = {}
        for agent in self._by_service.values():
            found.setdefault(agent.name, []).append(agent)
        return {name: tuple(sorted(agents, key=lambda a: a.address)) for name, agents in found.items()}

    async def start(self, on_change: Callable[[], None]) -> None:
        """Start browsing; ``on_change()`` is called on the event loop after every change."""
        self._on_change = on_change
        addresses = zeroconf_addresses(self._listen_host)
        self._zeroconf = AsyncZeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(
            self._zeroconf.zeroconf, [SERVICE_TYPE], handlers=[self._service_changed]
        )
        self._rechecks = asyncio.ensure_future(self._recheck_forever())
        log.info("browsing for agents (%s) on %s", SERVICE_TYPE, ", ".join(addresses))

    async def stop(self) -> None:
        """Stop browsing and close zeroconf's sockets."""
        for task in [*self._resolving.values(), self._rechecks]:
            if task is not None:
                task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zeroconf is not None:
            await self._zeroconf.async_close()

    def _service_changed(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        previous = self._resolving.pop(name, None)
        if previous is not None:
            previous.cancel()
        if state_change is ServiceStateChange.Removed:
            self._forget(name, "it said goodbye")
        else:
            self._start_resolving(zeroconf, name)

    def _start_resolving(self, zeroconf: Zeroconf, name: str) -> None:
        self._resolving[name] = asyncio.ensure_future(self._resolve(zeroconf, name))

    async def _recheck_forever(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_S)
            assert self._zeroconf is not None
            for name in list(self._by_service):
                if name not in self._resolving:
                    self._start_resolving(self._zeroconf.zeroconf, name)

    async def _resolve(self, zeroconf: Zeroconf, name: str) -> None:
        try:
            agent = await resolve_agent(zeroconf, name)
        except Exception:
            log.exception("resolving the agent service %s failed", name)
            return
        finally:
            if self._resolving.get(name) is asyncio.current_task():
                del self._resolving[name]
        if agent is None:
            self._forget(name, "nothing answers for it any more")
            return
        known = self._by_service.get(name)
        self._by_service[name] = agent  # last_seen moves on; a pass is due only when more changed
        if known != agent:
            log.info("discovered agent %s at %s (node id %s)", agent.name, agent.address, agent.node_id)
            self._on_change()

    def _forget(self, name: str, why: str) -> None:
        gone = self._by_service.pop(name, None)
        if gone is not None:
            log.info("forgot agent %s at %s: %s", gone.name, gone.address, why)
            self._on_change()


async def resolve_agent(zeroconf: Zeroconf, name: str) -> DiscoveredAgent | None:
    """Resolve an agent's service: from the cache while it holds the records, else by asking."""
    info = AsyncServiceInfo(SERVICE_TYPE, name)
    if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS):
        log.info("the service %s does not resolve (no agent answers for it)", name)
        return None
    return agent_from_service(info, name)


def agent_from_service(info: AsyncServiceInfo, service: str) -> DiscoveredAgent | None:
    """The agent a resolved service describes, or None (logged) when it cannot be used."""
    txt = info.decoded_properties
    if txt.get("api") != API_VERSION:
        log.warning(
            "ignoring %s: it speaks agent API %r, this master %r", service, txt.get("api"), API_VERSION
        )
        return None
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses or info.port is None:
        log.warning("ignoring %s: its announcement carries no IPv4 address and port", service)
        return None
    name = txt.get("name") or service.removesuffix(f".{SERVICE_TYPE}")
    preferred, *others = (f"{address}:{info.port}" for address in usable(addresses))
    return DiscoveredAgent(
        name, preferred, txt.get("id") or "", txt.get("version") or "", time.time(), alternates=tuple(others)
    )


def usable(addresses: list[str]) -> list[str]:
    """The addresses of an agent's announcement the master may talk to it at: those on a network
    this machine is on, else the first (whatever announces may name any address: the master does
    not go looking for it beyond its own networks)."""
    try:
        networks = local_networks()
        local = [a for a in addresses if any(ipaddress.IPv4Address(a) in n for n in networks)]
    except ValueError:
        local = []
    return local or addresses[:1]
