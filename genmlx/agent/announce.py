"""Announcing the agent on the local network with zeroconf, so the master finds it by name.

The agent registers ``<node name>._genmlx._tcp.local.`` with its port, the addresses it listens
on, and a TXT record: ``name``, ``version``, ``id`` (the node's stable id) and ``api``. Stopping
sends goodbye packets, so the master forgets it at once; a killed agent is caught by the
master's next poll instead. The node id lives in ``GENMLX_HOME/node-id`` and survives restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import uuid
from pathlib import Path

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

import genmlx
from genmlx.core.errors import PermanentError
from genmlx.core.home import genmlx_home
from genmlx.core.mdns import API_VERSION, SERVICE_TYPE, service_name, zeroconf_addresses

log = logging.getLogger(__name__)

NODE_ID_FILE = "node-id"
NAME_CHECK_MS = 1000  # mDNS responders answer within about 120 ms; Wi-Fi may take longer
ADDRESS_CHECK_S = 5.0  # how often the agent looks for addresses come or gone


def load_node_id(home: Path | None = None) -> str:
    """This node's stable id: the uuid in ``GENMLX_HOME/node-id``, created on first use."""
    path = (home or genmlx_home()) / NODE_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        existing = path.read_text().strip()
        if existing:
            return existing
    return write_node_id(path)


def write_node_id(path: Path) -> str:
    """Write a fresh uuid whole or not at all; agents sharing a home agree on the first one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{NODE_ID_FILE}.{os.getpid()}")
    draft.write_text(f"{uuid.uuid4()}\n")
    try:
        if path.exists():
            os.replace(draft, path)  # an empty file: replace it
        else:
            os.link(draft, path)  # atomic, and fails if another agent linked its id first
    except FileExistsError:
        pass
    finally:
        draft.unlink(missing_ok=True)
    return path.read_text().strip()


class Announcement:
    """The agent's registered service, kept to the addresses the machine has (a cable plugged in,
    a new lease on Wi-Fi: each is announced within ``ADDRESS_CHECK_S``, so the master has every
    address to reach the agent at); ``withdraw()`` says goodbye and closes the sockets."""

    def __init__(self, zeroconf: AsyncZeroconf, info: AsyncServiceInfo, broadcast: asyncio.Future, host: str):
        self._zeroconf = zeroconf
        self.info = info
        self._broadcast = broadcast  # the repeated announcements, kept referenced until they finish
        self._host = host
        self._following = asyncio.ensure_future(self._follow_addresses())

    async def withdraw(self) -> None:
        """Send the goodbye packets (the master forgets us at once) and close zeroconf."""
        self._following.cancel()
        await self._zeroconf.async_close()  # unregisters everything first: the goodbye packets
        log.info("withdrew the announcement of %s", self.info.name)

    async def _follow_addresses(self) -> None:
        while True:
            await asyncio.sleep(ADDRESS_CHECK_S)
            addresses = zeroconf_addresses(self._host)
            if set(addresses) == set(self.info.parsed_addresses(IPVersion.V4Only)):
                continue
            properties = self.info.decoded_properties
            info = agent_service_info(
                properties["name"] or "", self.info.port or 0, addresses, properties["id"] or ""
            )
            try:
                await self._zeroconf.async_update_service(info)
            except Exception as e:  # the old announcement stands; the next look tries again
                log.warning(
                    "could not announce %s on its new addresses %s: %s", info.name, ", ".join(addresses), e
                )
                continue
            self.info = info
            log.info("announced %s on %s now (its addresses changed)", info.name, ", ".join(addresses))


async def announce_agent(name: str, host: str, port: int, node_id: str) -> Announcement:
    """Register the agent ``name`` listening on ``host:port``; returns once the name is ours.

    Raises ``PermanentError`` when another agent on the network already announces that name.
    """
    addresses = zeroconf_addresses(host)
    zeroconf = AsyncZeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
    info = agent_service_info(name, port, addresses, node_id)
    try:
        await refuse_a_taken_name(zeroconf, name)
        # That question was our probe: zeroconf's own probing only notices a conflict when the
        # other side's PTR record happens to be cached, so it would add a second and little else.
        broadcast = await zeroconf.async_register_service(info, cooperating_responders=True)
    except BaseException:
        await zeroconf.async_close()
        raise
    log.info("announced %s on %s port %d (node id %s)", info.name, ", ".join(addresses), port, node_id)
    return Announcement(zeroconf, info, broadcast, host)


async def refuse_a_taken_name(zeroconf: AsyncZeroconf, name: str) -> None:
    """Ask the network for our service name: whoever answers is another live agent of that name
    (responders answer only for their own records, and a dead agent answers nothing)."""
    other = await zeroconf.async_get_service_info(SERVICE_TYPE, service_name(name), NAME_CHECK_MS)
    if other is None:
        return
    where = ", ".join(f"{a}:{other.port}" for a in other.parsed_addresses(IPVersion.V4Only)) or "?"
    raise PermanentError(
        f"another agent on this network already announces the node name {name!r} "
        f"(node id {other.decoded_properties.get('id') or '?'}, at {where}): "
        "stop it, or start this one with another --name"
    )


def agent_service_info(name: str, port: int, addresses: list[str], node_id: str) -> AsyncServiceInfo:
    properties = {"name": name, "version": genmlx.__version__, "id": node_id, "api": API_VERSION}
    return AsyncServiceInfo(
        SERVICE_TYPE,
        service_name(name),
        port=port,
        properties=properties,
        server=f"genmlx-{host_label(node_id)}.local.",
        parsed_addresses=addresses,
    )


def host_label(node_id: str) -> str:
    """The node id as a DNS label for the service's host record (unique per node, not per name)."""
    return re.sub(r"[^a-z0-9-]", "-", node_id.lower())[:50] or "node"
