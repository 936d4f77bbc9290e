"""What the agent announces and the master browses for with zeroconf (mDNS / DNS-SD): the service
type, the TXT keys, the on/off switch, and which interfaces a listen address puts zeroconf on.

Shared by ``genmlx.agent.announce`` (which registers the service) and
``genmlx.master.runtime.discovery`` (which browses for it). Nothing here sends a packet.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import psutil

SERVICE_TYPE = "_genmlx._tcp.local."
API_VERSION = "v1"  # the agent API the TXT record's ``api`` key promises
DISCOVERY_ENV = "GENMLX_DISCOVERY"
OFF_VALUES = frozenset({"off", "0", "false", "no"})
ANY_ADDRESSES = frozenset({"", "0.0.0.0", "::"})


def discovery_enabled() -> bool:
    """False where ``GENMLX_DISCOVERY`` says off (tests set it, so no multicast leaves the machine)."""
    return os.environ.get(DISCOVERY_ENV, "").strip().lower() not in OFF_VALUES


def service_name(node_name: str) -> str:
    """The DNS-SD instance name an agent registers: ``<node name>._genmlx._tcp.local.``."""
    return f"{node_name}.{SERVICE_TYPE}"


def zeroconf_addresses(listen_host: str) -> list[str]:
    """The IPv4 addresses zeroconf should use for a process that listens on ``listen_host``.

    A specific address (loopback included) means that address alone, so a process bound to
    127.0.0.1 never multicasts beyond this machine. The wildcard means every non-loopback IPv4
    address of an interface that is up, or loopback where the machine has none.
    """
    if listen_host not in ANY_ADDRESSES:
        return [ipv4_of(listen_host)]
    return non_loopback_ipv4_addresses() or ["127.0.0.1"]


def ipv4_of(host: str) -> str:
    """``host`` as an IPv4 literal (a name is resolved once, here)."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return socket.gethostbyname(host)


def non_loopback_ipv4_addresses() -> list[str]:
    """IPv4 addresses of the interfaces that are up, loopback left out (link-local kept: a
    Thunderbolt bridge between Macs often has only a 169.254 address)."""
    stats = psutil.net_if_stats()
    found = []
    for interface, addresses in psutil.net_if_addrs().items():
        if interface not in stats or not stats[interface].isup:
            continue
        for address in addresses:
            if address.family == socket.AF_INET and not ipaddress.IPv4Address(address.address).is_loopback:
                found.append(address.address)
    return found


def interface_addresses() -> set[str]:
    """Every IP address of this machine's interfaces (IPv6 without its zone)."""
    return {
        address.address.split("%", 1)[0]
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family in (socket.AF_INET, socket.AF_INET6)
    }


def local_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks this machine's interfaces sit on, to prefer a peer's address on one."""
    networks = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and address.netmask:
                networks.append(ipaddress.IPv4Network(f"{address.address}/{address.netmask}", strict=False))
    return networks
