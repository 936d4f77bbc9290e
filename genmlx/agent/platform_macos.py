"""macOS node facts, read from the commands macOS ships: ``sw_vers``, ``sysctl``,
``networksetup -listallhardwareports`` and ``system_profiler -json SPThunderboltDataType``.

Interface kinds come from networksetup's hardware port names ("Thunderbolt Bridge", "Thunderbolt 3",
"Ethernet", "USB 10/100/1000 LAN", "Wi-Fi"). Whether a Thunderbolt port has another computer at the
other end comes from system_profiler: each Thunderbolt bus has one receptacle, whose number is the
N of hardware port "Thunderbolt N", and a computer on it shows as a device with its own Thunderbolt
domain (a drive or a dock has none). Thunderbolt Bridge is linked when any of its ports is.
system_profiler's JSON is read rather than its text, whose labels follow the user's language.

Every command goes through the injected ``CommandRunner``, so tests answer from recordings.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from genmlx.node_state import InterfaceKind

from .platform_info import CommandRunner, InterfacePort, PlatformCommandFailed, run_command

log = logging.getLogger(__name__)

SW_VERS = ("/usr/bin/sw_vers", "-productVersion")
CHIP_SYSCTL = ("/usr/sbin/sysctl", "-n", "machdep.cpu.brand_string")
HARDWARE_PORTS = ("/usr/sbin/networksetup", "-listallhardwareports")
THUNDERBOLT_PROFILE = ("/usr/sbin/system_profiler", "-json", "SPThunderboltDataType")

THUNDERBOLT_PORT = re.compile(r"Thunderbolt (\d+)")
ETHERNET_PORT = re.compile(r"\b(Ethernet|LAN)\b")
WIFI_PORTS = ("Wi-Fi", "AirPort")  # AirPort: the name before macOS 10.7
RECEPTACLE_TAG = re.compile(r"receptacle_\d+_tag")
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
        found = {
            port.device: InterfacePort(hardware_port_kind(port.name), port_linked(port.name, peers))
            for port in ports
        }
        return {LOOPBACK: InterfacePort("loopback"), **found}

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
