"""macOS node facts, read from the commands macOS ships: ``sw_vers``, ``sysctl``,
``networksetup -listallhardwareports``, ``system_profiler -json SPThunderboltDataType`` and, on
macOS 26.2 and later, ``ibv_devinfo``.

Interface kinds come from networksetup's hardware port names ("Thunderbolt Bridge", "Thunderbolt 3",
"Ethernet", "USB 10/100/1000 LAN", "Wi-Fi"). Whether a Thunderbolt port has another computer at the
other end comes from system_profiler: each Thunderbolt bus has one receptacle, whose number is the
N of hardware port "Thunderbolt N", and a computer on it shows as a device with its own Thunderbolt
domain (a drive or a dock has none). Thunderbolt Bridge is linked when any of its ports is.
system_profiler's JSON is read rather than its text, whose labels follow the user's language.

Which two ports a cable joins comes from the same report, as MLX's ``mlx.distributed_config`` reads
it: each bus has its own Thunderbolt domain UUID, and the computer at the other end shows with the
UUID of its port's domain. RDMA over Thunderbolt (jaccl) names the device of port ``enN``
``rdma_enN``; ``ibv_devinfo`` lists those devices once RDMA is enabled (``rdma_ctl enable`` in
Recovery) and says which ports are active.

Every command goes through the injected ``CommandRunner``, so tests answer from recordings.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from genmlx.agent.facts.platform import CommandRunner, InterfacePort, PlatformCommandFailed, run_command
from genmlx.wire.agent_state import InterfaceKind

log = logging.getLogger(__name__)

SW_VERS = ("/usr/bin/sw_vers", "-productVersion")
CHIP_SYSCTL = ("/usr/sbin/sysctl", "-n", "machdep.cpu.brand_string")
HARDWARE_PORTS = ("/usr/sbin/networksetup", "-listallhardwareports")
THUNDERBOLT_PROFILE = ("/usr/sbin/system_profiler", "-json", "SPThunderboltDataType")
RDMA_DEVICES = ("/usr/bin/ibv_devinfo",)

THUNDERBOLT_PORT = re.compile(r"Thunderbolt (\d+)")
ETHERNET_PORT = re.compile(r"\b(Ethernet|LAN)\b")
WIFI_PORTS = ("Wi-Fi", "AirPort")  # AirPort: the name before macOS 10.7
RECEPTACLE_TAG = re.compile(r"receptacle_\d+_tag")
LINK_SPEED = re.compile(r"(\d+(?:\.\d+)?)\s*Gb/s")
LOOPBACK = "lo0"


@dataclass(frozen=True)
class HardwarePort:
    """One block of ``networksetup -listallhardwareports``."""

    name: str  # "Thunderbolt 1"
    device: str  # "en2"


@dataclass(frozen=True)
class MacOSProbe:
    """Facts of this Mac, read through ``run``."""

    run: CommandRunner = run_command

    def os_version(self) -> str:
        version = self._read(SW_VERS, "the macOS version").strip()
        return f"macOS {version}" if version else ""

    def chip(self) -> str:
        return self._read(CHIP_SYSCTL, "the chip").strip()

    def interface_ports(self) -> dict[str, InterfacePort]:
        ports = parse_hardware_ports(self._read(HARDWARE_PORTS, "interface kinds"))
        profile = self._read(THUNDERBOLT_PROFILE, "which Thunderbolt ports have a peer")
        peers = parse_thunderbolt_peers(profile) if profile else None
        domains = parse_thunderbolt_domains(profile) if profile else {}
        rdma = self._active_rdma_devices()
        found = {port.device: interface_port(port, peers, domains, rdma) for port in ports}
        return {LOOPBACK: InterfacePort("loopback"), **found}

    def _active_rdma_devices(self) -> frozenset[str]:
        try:
            return parse_active_rdma_devices(self.run(RDMA_DEVICES))
        except PlatformCommandFailed as e:
            # Before macOS 26.2, or with RDMA not enabled, there is no ibv_devinfo: not worth a warning.
            log.debug("no RDMA devices here: %s", e)
            return frozenset()

    def _read(self, argv: tuple[str, ...], what: str) -> str:
        try:
            return self.run(argv)
        except PlatformCommandFailed as e:
            log.warning("cannot read %s, reporting it unknown: %s", what, e)
            return ""


def parse_hardware_ports(text: str) -> tuple[HardwarePort, ...]:
    """The (port, device) pairs of ``networksetup -listallhardwareports``, in its order."""
    ports: list[HardwarePort] = []
    name: str | None = None
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == "Hardware Port":
            name = value.strip()
        elif key == "Device" and name is not None:
            ports.append(HardwarePort(name, value.strip()))
            name = None
    return tuple(ports)


def hardware_port_kind(name: str) -> InterfaceKind:
    """The interface kind a hardware port's name tells: "Thunderbolt Ethernet Slot 1" (an adapter)
    is Ethernet, "Thunderbolt 2" and "Thunderbolt Bridge" are Thunderbolt."""
    if name == "Thunderbolt Bridge" or THUNDERBOLT_PORT.fullmatch(name):
        return "thunderbolt"
    if name in WIFI_PORTS:
        return "wifi"
    if ETHERNET_PORT.search(name):
        return "ethernet"
    return "other"


@dataclass(frozen=True)
class ThunderboltDomains:
    """The Thunderbolt domain of one port and that of the computer cabled to it."""

    domain: str
    peer: str | None
    gbps: float | None = None  # the receptacle's link speed, where a peer is connected


def interface_port(
    port: HardwarePort,
    peers: dict[int, bool] | None,
    domains: dict[int, ThunderboltDomains],
    rdma: frozenset[str],
) -> InterfacePort:
    """Everything the OS tells about one hardware port."""
    match = THUNDERBOLT_PORT.fullmatch(port.name)
    ends = domains.get(int(match.group(1))) if match else None
    device = f"rdma_{port.device}"
    return InterfacePort(
        hardware_port_kind(port.name),
        port_linked(port.name, peers),
        ends.domain if ends else None,
        ends.peer if ends else None,
        device if match and device in rdma else None,
        ends.gbps if ends and ends.peer else None,
    )


def port_linked(name: str, peers: dict[int, bool] | None) -> bool | None:
    """Whether a Thunderbolt hardware port has a computer at the other end; None for other ports
    and when system_profiler could not be read."""
    if peers is None:
        return None
    if name == "Thunderbolt Bridge":
        return any(peers.values())
    match = THUNDERBOLT_PORT.fullmatch(name)
    return peers.get(int(match.group(1))) if match else None


def parse_thunderbolt_peers(profile_json: str) -> dict[int, bool] | None:
    """Receptacle number -> whether another computer is connected there, from
    ``system_profiler -json SPThunderboltDataType``; None if the JSON is not what it prints."""
    try:
        buses = json.loads(profile_json)["SPThunderboltDataType"]
        return dict(pair for bus in buses for pair in receptacle_peers(bus))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("cannot read system_profiler's Thunderbolt report, links unknown: %r", e)
        return None


def receptacle_peers(bus: dict[str, Any]) -> list[tuple[int, bool]]:
    """(receptacle number, has a peer computer) for the receptacles of one Thunderbolt bus."""
    has_peer = any("domain_uuid_key" in device for device in bus.get("_items", ()))
    receptacles = [value for key, value in bus.items() if RECEPTACLE_TAG.fullmatch(key)]
    return [
        (int(r["receptacle_id_key"]), has_peer and r.get("receptacle_status_key") == "receptacle_connected")
        for r in receptacles
        if "receptacle_id_key" in r
    ]


def parse_thunderbolt_domains(profile_json: str) -> dict[int, ThunderboltDomains]:
    """Receptacle number -> its domain and its peer computer's, from
    ``system_profiler -json SPThunderboltDataType``; empty if the JSON is not what it prints."""
    try:
        buses = json.loads(profile_json)["SPThunderboltDataType"]
        return dict(pair for bus in buses for pair in receptacle_domains(bus))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("cannot read Thunderbolt domains, cabling unknown: %r", e)
        return {}


def receptacle_domains(bus: dict[str, Any]) -> list[tuple[int, ThunderboltDomains]]:
    """(receptacle number, domains) for the receptacles of one bus that has a domain of its own."""
    if "domain_uuid_key" not in bus:
        return []
    peer = next((d["domain_uuid_key"] for d in bus.get("_items", ()) if "domain_uuid_key" in d), None)
    receptacles = [value for key, value in bus.items() if RECEPTACLE_TAG.fullmatch(key)]
    return [
        (int(r["receptacle_id_key"]), ThunderboltDomains(bus["domain_uuid_key"], peer, link_speed(r)))
        for r in receptacles
        if "receptacle_id_key" in r
    ]


def link_speed(receptacle: dict[str, Any]) -> float | None:
    """Gbit/s of a receptacle's link: its ``current_speed_key`` ("Up to 80 Gb/s", "40 Gb/s")."""
    match = LINK_SPEED.search(str(receptacle.get("current_speed_key", "")))
    return float(match.group(1)) if match else None


def parse_active_rdma_devices(devinfo: str) -> frozenset[str]:
    """The RDMA devices whose port is up (``PORT_ACTIVE``), from ``ibv_devinfo``'s output."""
    active: set[str] = set()
    device: str | None = None
    for line in devinfo.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "hca_id":
            device = value.strip()
        elif key == "state" and device is not None and value.strip().startswith("PORT_ACTIVE"):
            active.add(device)
    return frozenset(active)
