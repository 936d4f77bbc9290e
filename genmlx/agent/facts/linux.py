"""Linux node facts: the OS from os-release, the chip from /proc/cpuinfo, and each network
interface's kind and carrier from /sys/class/net.

An interface's kind comes from what the kernel exposes for it: ``type`` 772 is loopback, a
``wireless`` (or ``phy80211``) entry is Wi-Fi, a device bound to the ``thunderbolt-net`` driver is
a Thunderbolt link, any other Ethernet-type interface backed by a device is Ethernet, and virtual
ones (bridges, veth, tunnels) are "other". Reading them takes well under a millisecond, so they are
read fresh each time.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from genmlx.agent.facts.platform import InterfacePort
from genmlx.wire.agent_state import InterfaceKind

log = logging.getLogger(__name__)

ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
THUNDERBOLT_NET_DRIVER = "thunderbolt-net"


@dataclass(frozen=True)
class LinuxProbe:
    """Facts of the Linux machine whose /proc and /sys these paths are."""

    sys_class_net: Path = Path("/sys/class/net")
    cpuinfo: Path = Path("/proc/cpuinfo")

    def os_version(self) -> str:
        try:
            return platform.freedesktop_os_release().get("PRETTY_NAME", "")
        except OSError as e:
            log.warning("no os-release file, reporting no OS version: %s", e)
            return ""

    def chip(self) -> str:
        try:
            return cpu_model_name(self.cpuinfo.read_text(errors="replace"))
        except OSError as e:
            log.warning("cannot read %s, reporting no chip: %s", self.cpuinfo, e)
            return ""

    def interface_ports(self) -> dict[str, InterfacePort]:
        try:
            names = sorted(os.listdir(self.sys_class_net))
        except OSError as e:
            log.warning("cannot list %s, reporting no interface kinds: %s", self.sys_class_net, e)
            return {}
        return {name: read_interface_port(self.sys_class_net / name) for name in names}


def cpu_model_name(cpuinfo: str) -> str:
    """The first "model name" in /proc/cpuinfo's text; "" where there is none (many ARM boards)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip()
    return ""


def read_interface_port(path: Path) -> InterfacePort:
    """Kind and carrier of the interface whose /sys/class/net entry is ``path``."""
    return InterfacePort(interface_kind(path), carrier(path))


def interface_kind(path: Path) -> InterfaceKind:
    link_type = read_int(path / "type")
    if link_type == ARPHRD_LOOPBACK:
        return "loopback"
    if (path / "wireless").exists() or (path / "phy80211").exists():
        return "wifi"
    if driver_name(path) == THUNDERBOLT_NET_DRIVER:
        return "thunderbolt"
    if link_type == ARPHRD_ETHER and (path / "device").exists():
        return "ethernet"
    return "other"


def driver_name(path: Path) -> str:
    """The name of the driver bound to the interface's device, "" for a virtual interface."""
    try:
        return os.path.basename(os.readlink(path / "device" / "driver"))
    except OSError:
        return ""


def carrier(path: Path) -> bool | None:
    """Whether the link is up at the physical layer; None while the interface is down (the kernel
    then refuses to say)."""
    value = read_int(path / "carrier")
    return None if value is None else value == 1


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
