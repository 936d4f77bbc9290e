"""This Mac's network services as ``networksetup`` shows them, and the networksetup commands that
give its Thunderbolt ports their planned addresses: the macOS side of ``genmlx mesh apply``.

Three reads make the picture: ``-listallhardwareports`` (hardware port "Thunderbolt 1" is device
``en2``), ``-listnetworkserviceorder`` (each service, its hardware port and device, and whether it
is enabled) and ``-getinfo SERVICE`` (its IPv4 configuration). Parsing is pure, and the reads go
through a ``CommandRunner`` (``genmlx.agent.facts.platform``).

``plan_port_setup`` (pure) compares one node's planned link ends with that picture and plans only
what differs:

- an enabled Thunderbolt Bridge service is turned off: a bridged port has no address of its own;
- a port without a service gets one (``GenMLX <peer> (<port>)``), a disabled service is enabled;
- ``-setmanual SERVICE ADDRESS MASK``, unless the service already has exactly that.

Only services whose hardware port is Thunderbolt are ever named. A port that is not Thunderbolt, an
address in the link's subnet that another service holds, or a service name taken elsewhere is
reported and that cable left alone; ``non_thunderbolt_targets`` checks a finished plan once more.

The executable is ``/usr/sbin/networksetup``, or the one ``GENMLX_NETWORKSETUP`` names: the seam
through which tests put a fake in its place (and a person another tool that speaks the same
commands). Only macOS has networksetup, so without that override ``networksetup_executable``
answers None elsewhere.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from genmlx.agent.facts.macos import (
    HARDWARE_PORTS,
    THUNDERBOLT_PORT,
    HardwarePort,
    hardware_port_kind,
    parse_hardware_ports,
)
from genmlx.agent.facts.platform import CommandRunner, PlatformCommandFailed
from genmlx.master.planning.mesh import MeshPlan

NETWORKSETUP_ENV = "GENMLX_NETWORKSETUP"
DEFAULT_NETWORKSETUP = HARDWARE_PORTS[0]  # /usr/sbin/networksetup, as the agent's facts read it
# A change waits on configd, which can be slow on a busy Mac; a read is quick.
COMMAND_TIMEOUT_S = 60.0

# "(1) Ethernet", "(*) Bluetooth PAN": Apple documents only that an asterisk marks a disabled
# service, so one in front of the number ("*(4) Wi-Fi") counts too.
SERVICE_LINE = re.compile(r"\*?\((\*|\d+)\) (.+)")
PORT_LINE = re.compile(r"\(Hardware Port: (.*), Device: (.*)\)")
NO_VALUE = ("", "none", "(null)")  # how -getinfo shows a field that has no value
BRIDGE_PORT = "Thunderbolt Bridge"  # the hardware port of macOS's own bridge of every Thunderbolt port


class NetworksetupFailed(PlatformCommandFailed):
    """networksetup exited non-zero or printed one of its ``** Error:`` lines."""


@dataclass(frozen=True)
class ServiceConfig:
    """A service's IPv4 configuration, from ``networksetup -getinfo``."""

    method: str = ""  # "Manual", "DHCP", "BOOTP": the word before "Configuration"
    address: str | None = None
    mask: str | None = None

    def is_manual(self, address: str, mask: str) -> bool:
        return (self.method, self.address, self.mask) == ("Manual", address, mask)


@dataclass(frozen=True)
class NetworkService:
    """One entry of ``networksetup -listnetworkserviceorder``, with its configuration."""

    name: str  # "Thunderbolt Bridge", "GenMLX mini-b (Thunderbolt 1)"
    port: str  # its hardware port: "Thunderbolt Bridge", "Thunderbolt 1", "Ethernet"
    device: str  # "bridge0", "en2"; "" for a service without one (a VPN)
    enabled: bool
    config: ServiceConfig = field(default_factory=ServiceConfig)

    def describe(self) -> str:
        return f'service "{self.name}" ({self.port}, {self.device or "no device"})'


@dataclass(frozen=True)
class MacNetwork:
    """This Mac's hardware ports and network services, in networksetup's order."""

    ports: tuple[HardwarePort, ...]
    services: tuple[NetworkService, ...]

    def port_of(self, device: str) -> HardwarePort | None:
        return next((p for p in self.ports if p.device == device), None)

    def services_on(self, port: str) -> tuple[NetworkService, ...]:
        return tuple(s for s in self.services if s.port == port)

    def service_named(self, name: str) -> NetworkService | None:
        return next((s for s in self.services if s.name == name), None)


def networksetup_executable() -> str | None:
    """``$GENMLX_NETWORKSETUP`` where set, else ``/usr/sbin/networksetup`` on macOS, else None."""
    override = os.environ.get(NETWORKSETUP_ENV)
    if override:
        return override
    return DEFAULT_NETWORKSETUP if sys.platform == "darwin" else None


def parse_service_order(text: str) -> tuple[NetworkService, ...]:
    """The services of ``networksetup -listnetworkserviceorder``, configuration not read."""
    services: list[NetworkService] = []
    entry: tuple[str, bool] | None = None
    for line in text.splitlines():
        line = line.strip()
        if port := PORT_LINE.fullmatch(line):
            if entry is not None:
                services.append(NetworkService(entry[0], port[1].strip(), port[2].strip(), entry[1]))
            entry = None
        elif service := SERVICE_LINE.fullmatch(line):
            entry = (service[2].strip(), service[1] != "*" and not line.startswith("*"))
    return tuple(services)


def parse_service_info(text: str) -> ServiceConfig:
    """A service's IPv4 method, address and mask, from ``networksetup -getinfo``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    method = first.removesuffix(" Configuration") if first.endswith(" Configuration") else ""
    fields = dict(line.partition(": ")[::2] for line in lines[1:])
    address, mask = (fields.get(key, "").strip() for key in ("IP address", "Subnet mask"))
    return ServiceConfig(
        method, address if address not in NO_VALUE else None, mask if mask not in NO_VALUE else None
    )


def read_mac_network(run: CommandRunner, executable: str) -> MacNetwork:
    """Hardware ports, services and each service's configuration, read with ``executable``.
    Raises ``PlatformCommandFailed`` where a read fails: a plan made without it could be wrong."""
    ports = parse_hardware_ports(run([executable, "-listallhardwareports"]))
    listed = parse_service_order(run([executable, "-listnetworkserviceorder"]))
    services = tuple(
        replace(s, config=parse_service_info(run([executable, "-getinfo", s.name]))) for s in listed
    )
    return MacNetwork(ports, services)


def run_networksetup(argv: Sequence[str]) -> str:
    """Run ``argv`` (networksetup, perhaps behind sudo) and return its output; raise
    ``NetworksetupFailed`` naming the command and what it said when it fails. networksetup prints
    its errors on stdout ("** Error: The parameters were not valid."), so they count there too."""
    command = shlex.join(argv)
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetworksetupFailed(f"{command}: {e}") from e
    said = "\n  ".join(part.strip() for part in (done.stderr, done.stdout) if part.strip())[-500:]
    if done.returncode != 0:
        raise NetworksetupFailed(f"{command}: exited with code {done.returncode}: {said or 'no output'}")
    if any(line.lstrip().startswith("** Error") for line in done.stdout.splitlines()):
        raise NetworksetupFailed(f"{command}: reported an error: {said}")
    return done.stdout


# ----------------------------------------------------------------------------------------------
# What to change (pure)


@dataclass(frozen=True)
class PortPlan:
    """This node's end of one planned Thunderbolt link."""

    address: str  # "192.168.200.1"
    netmask: str  # "255.255.255.252"
    subnet: str  # "192.168.200.0/30"
    peer: str  # the node at the other end
    interface: str | None  # "en2", where the facts show which port the cable is in
    cabled: bool | None  # ``Link.cabled``

    def describe(self) -> str:
        on = f" on {self.interface}" if self.interface else ""
        return f"{self.address}/{self.subnet.split('/')[1]} to {self.peer}{on}"


@dataclass(frozen=True)
class Change:
    """One networksetup command to run, without the executable: ``("-setmanual", SERVICE, ...)``."""

    args: tuple[str, ...]
    why: str


EndState = Literal["set", "change", "skipped", "refused"]
STATE_LABELS = {"set": "already set", "change": "to change", "skipped": "skipped", "refused": "REFUSED"}


@dataclass(frozen=True)
class EndOutcome:
    """What becomes of one link end: already set, changed by ``changes``, or left alone and why."""

    end: PortPlan
    state: EndState
    detail: str  # the service it is (or will be) on, or why it is left alone
    changes: tuple[Change, ...] = ()


@dataclass(frozen=True)
class SetupPlan:
    """Everything to change on this Mac, bridge first."""

    node: str
    bridge: tuple[Change, ...]
    ends: tuple[EndOutcome, ...]

    @property
    def changes(self) -> tuple[Change, ...]:
        return (*self.bridge, *(change for outcome in self.ends for change in outcome.changes))

    @property
    def left_alone(self) -> tuple[EndOutcome, ...]:
        return tuple(o for o in self.ends if o.state in ("skipped", "refused"))


def ends_of(plan: MeshPlan, node: str) -> tuple[PortPlan, ...]:
    """``node``'s end of each link of the mesh plan, in the plan's order."""
    return tuple(
        PortPlan(end.address, link.netmask, link.subnet, peer.node, end.interface, link.cabled)
        for link in plan.links
        for end, peer in zip(link.ends, reversed(link.ends), strict=True)
        if end.node == node
    )


def plan_port_setup(node: str, ends: Sequence[PortPlan], network: MacNetwork) -> SetupPlan:
    """The changes that give ``ends`` their addresses on ``network``; none where all are set."""
    # A service on another of these ports gets its own planned address: what it holds now is no clash.
    ours = {port.name for end in ends if (port := thunderbolt_port(network, end.interface))}
    outcomes = tuple(plan_end(end, network, frozenset(ours)) for end in ends)
    going_ahead = any(o.state in ("set", "change") for o in outcomes)
    return SetupPlan(node, bridge_changes(network) if going_ahead else (), outcomes)


def bridge_changes(network: MacNetwork) -> tuple[Change, ...]:
    """Turn off each enabled Thunderbolt Bridge service. networksetup does not list a bridge's
    members; macOS's own bridge holds every Thunderbolt port, so an enabled one holds ours."""
    return tuple(
        Change(("-setnetworkserviceenabled", s.name, "off"), "a bridged port has no address of its own")
        for s in network.services_on(BRIDGE_PORT)
        if s.enabled
    )


def thunderbolt_port(network: MacNetwork, interface: str | None) -> HardwarePort | None:
    port = network.port_of(interface) if interface else None
    return port if port and THUNDERBOLT_PORT.fullmatch(port.name) else None


def plan_end(end: PortPlan, network: MacNetwork, ours: frozenset[str]) -> EndOutcome:
    if end.interface is None:
        return EndOutcome(end, "skipped", unknown_port_reason(end))
    port = network.port_of(end.interface)
    if port is None:
        why = f"{end.interface} is no hardware port of this Mac (networksetup -listallhardwareports)"
        return EndOutcome(end, "refused", f"{why}: are these this Mac's facts? (--node)")
    problem = port_problem(end, port, network, ours)
    if problem is not None:
        return EndOutcome(end, "refused", problem)
    services = network.services_on(port.name)
    # Several services may share a port; macOS uses the first enabled one in service order.
    service = next((s for s in services if s.enabled), services[0] if services else None)
    return new_service(end, port, network) if service is None else existing_service(end, service)


def unknown_port_reason(end: PortPlan) -> str:
    if end.cabled is False:
        return f"the node facts show no Thunderbolt cable to {end.peer}: plug one in, then run this again"
    return (
        f"no node facts show which port the cable to {end.peer} is in (both agents must be running "
        "and report their Thunderbolt ports): nothing is guessed"
    )


def port_problem(end: PortPlan, port: HardwarePort, network: MacNetwork, ours: frozenset[str]) -> str | None:
    """Why GenMLX must not touch ``end``'s port, or None."""
    if not THUNDERBOLT_PORT.fullmatch(port.name):
        return f"{end.interface} is hardware port {port.name!r}: GenMLX changes only Thunderbolt ports"
    clash = clashing_service(end, ours, network)
    if clash is not None:
        held = f"{clash.config.address}/{clash.config.mask or '?'}"
        return (
            f"{clash.describe()} already has {held}, in the subnet {end.subnet} planned for "
            f"{end.interface}: change that service (GenMLX will not), then run this again"
        )
    return None


def clashing_service(end: PortPlan, ours: frozenset[str], network: MacNetwork) -> NetworkService | None:
    """An enabled service on a port other than ``ours`` (and the bridge, which is turned off first)
    whose address is in the link's subnet: two there would leave the cable's traffic to chance."""
    planned = ipaddress.IPv4Network(end.subnet)
    others = (s for s in network.services if s.enabled and s.port not in ours | {BRIDGE_PORT})
    return next((s for s in others if holds_address_in(s, planned)), None)


def holds_address_in(service: NetworkService, subnet: ipaddress.IPv4Network) -> bool:
    address, mask = service.config.address, service.config.mask or "255.255.255.255"
    try:
        return address is not None and ipaddress.IPv4Interface(f"{address}/{mask}").network.overlaps(subnet)
    except ValueError:  # an IPv6 or unreadable address: not one of ours
        return False


def service_name(peer: str, port: str) -> str:
    """A new service's name: "GenMLX" says who made it, the peer which cable it serves (what System
    Settings shows), and the port keeps it unique when a cable moves to another port."""
    return f"GenMLX {peer} ({port})"


def new_service(end: PortPlan, port: HardwarePort, network: MacNetwork) -> EndOutcome:
    name = service_name(end.peer, port.name)
    taken = network.service_named(name)
    if taken is not None:
        return EndOutcome(
            end,
            "refused",
            f"{port.name} has no service, and the name for one, {name!r}, is {taken.describe()}",
        )
    changes = (
        Change(("-createnetworkservice", name, port.name), f"{port.name} has no service"),
        Change(("-setmanual", name, end.address, end.netmask), f"the address for the cable to {end.peer}"),
    )
    return EndOutcome(end, "change", f'new service "{name}" ({port.name}, {port.device})', changes)


def existing_service(end: PortPlan, service: NetworkService) -> EndOutcome:
    changes: list[Change] = []
    if not service.enabled:
        changes.append(Change(("-setnetworkserviceenabled", service.name, "on"), "the service is disabled"))
    if not service.config.is_manual(end.address, end.netmask):
        setting = ("-setmanual", service.name, end.address, end.netmask)
        changes.append(Change(setting, f"the address for the cable to {end.peer}"))
    return EndOutcome(end, "change" if changes else "set", service.describe(), tuple(changes))


def non_thunderbolt_targets(changes: Sequence[Change], network: MacNetwork) -> list[str]:
    """The services ``changes`` name whose hardware port is not Thunderbolt: none, unless the
    planner is wrong. A service is known by name, so an existing one's port wins over a create."""
    created = {c.args[1]: c.args[2] for c in changes if c.args[0] == "-createnetworkservice"}
    ports = {**created, **{s.name: s.port for s in network.services}}
    return [c.args[1] for c in changes if hardware_port_kind(ports.get(c.args[1], "")) != "thunderbolt"]
