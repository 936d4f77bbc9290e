"""What a node is: the facts the master places models by (memory above all) and wires ranks with
(network interfaces, Thunderbolt links).

Facts that cannot change while the agent runs (OS version, chip, GPU) are read once. Memory and
interface addresses are read on every call. Interface kinds and links come from the platform
probe (``platform_linux``, ``platform_macos``): fresh on Linux, where they cost nothing; on macOS,
where system_profiler takes a second or more, re-read in the background once older than
``MACOS_PORTS_MAX_AGE_S`` so that no call waits for it but the first. Collecting runs in an
executor thread, never on the event loop, and may run in several threads at once.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import logging
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import psutil

from genmlx.agent.facts.linux import LinuxProbe
from genmlx.agent.facts.macos import MacOSProbe
from genmlx.agent.facts.nvidia import nvidia_gpus
from genmlx.agent.facts.platform import InterfacePort, PlatformProbe, probe_gpu
from genmlx.agent.facts.replay import FACTS_REPLAY_ENV, RecordedCommands
from genmlx.wire.agent_state import GpuDevice, NetworkInterface, NodeFacts

log = logging.getLogger(__name__)

MACOS_PORTS_MAX_AGE_S = 10.0  # how stale a Thunderbolt cable's state may be in a report

T = TypeVar("T")


class BackgroundRefreshed(Generic[T]):
    """A value that is slow to read. The first ``get`` reads it; later ones answer at once with the
    last value read and, once that is older than ``max_age_s``, start one background re-read."""

    def __init__(self, read: Callable[[], T], max_age_s: float, what: str):
        self._read = read
        self._max_age_s = max_age_s
        self._what = what
        self._lock = threading.Lock()
        self._value: T | None = None
        self._read_at: float | None = None  # monotonic time of the last read; None before the first
        self._refreshing = False

    def get(self) -> T:
        with self._lock:
            if self._read_at is None:  # nothing to answer with yet: read here, once
                self._value, self._read_at = self._read(), time.monotonic()
            elif time.monotonic() - self._read_at > self._max_age_s and not self._refreshing:
                self._refreshing = True
                threading.Thread(target=self._refresh, name=f"refresh {self._what}", daemon=True).start()
            return self._value  # type: ignore[return-value]  # set by the first call

    def _refresh(self) -> None:
        try:
            value = self._read()
        except Exception:
            log.exception("re-reading %s failed; keeping the last value", self._what)
            value = self._value
        with self._lock:
            self._value, self._read_at, self._refreshing = value, time.monotonic(), False


@dataclass(frozen=True)
class LastingFacts:
    """Facts read once per agent."""

    os_version: str
    chip: str
    gpu: str
    mlx_version: str
    gpus: tuple[GpuDevice, ...] = ()


class NodeFactsCollector:
    """Gathers ``NodeFacts`` from a platform probe, psutil and the GPU probe."""

    def __init__(
        self,
        probe: PlatformProbe,
        interface_ports: Callable[[], Mapping[str, InterfacePort]] | None = None,
        gpu: Callable[[], str] = probe_gpu,
        interface_addresses: Callable[[], Mapping[str, tuple[str, ...]]] | None = None,
        gpus: Callable[[], tuple[GpuDevice, ...]] = nvidia_gpus,
    ):
        self._probe = probe
        self._interface_ports = interface_ports or probe.interface_ports
        self._gpu = gpu
        self._gpus = gpus
        self._interface_addresses = interface_addresses or read_interface_addresses
        self._lasting: LastingFacts | None = None
        self._lasting_lock = threading.Lock()

    def collect(self) -> NodeFacts:
        """Every fact, memory and addresses read now."""
        lasting = self._lasting_facts()
        memory = psutil.virtual_memory()
        return NodeFacts(
            hostname=socket.gethostname(),
            os=f"{platform.system()} {platform.release()}",
            arch=platform.machine(),
            cpu_count=psutil.cpu_count(logical=True) or 1,
            memory_total=memory.total,
            memory_available=memory.available,
            os_version=lasting.os_version,
            chip=lasting.chip,
            gpu=lasting.gpu,
            gpus=lasting.gpus,
            mlx_version=lasting.mlx_version,
            interfaces=network_interfaces(self._interface_addresses(), self._interface_ports()),
        )

    def _lasting_facts(self) -> LastingFacts:
        with self._lasting_lock:
            if self._lasting is None:
                self._lasting = LastingFacts(
                    self._probe.os_version(),
                    self._probe.chip(),
                    self._gpu(),
                    installed_mlx_version(),
                    self._gpus(),
                )
            return self._lasting


def installed_mlx_version() -> str:
    """The version of the mlx package ranks will import, read from its metadata (importing MLX
    here would claim a Metal device for the agent); "" where it is not installed."""
    try:
        return importlib.metadata.version("mlx")
    except importlib.metadata.PackageNotFoundError:
        log.warning("mlx is not installed here: ranks cannot start on this node")
        return ""


def collector_for_this_platform() -> NodeFactsCollector:
    """A collector with the probe of the OS we run on, or, where ``GENMLX_FACTS_REPLAY`` names a
    directory of recorded macOS command output, a macOS probe that answers from it."""
    replay = os.environ.get(FACTS_REPLAY_ENV)
    if replay:
        log.warning("node facts are replayed from the recordings in %s (%s)", replay, FACTS_REPLAY_ENV)
        return NodeFactsCollector(MacOSProbe(run=RecordedCommands(Path(replay))))
    if sys.platform == "darwin":
        probe = MacOSProbe()
        ports = BackgroundRefreshed(probe.interface_ports, MACOS_PORTS_MAX_AGE_S, "network interfaces")
        return NodeFactsCollector(probe, ports.get)
    return NodeFactsCollector(LinuxProbe())


def read_interface_addresses() -> dict[str, tuple[str, ...]]:
    """Every interface psutil sees, with its IPv4 and IPv6 addresses (an IPv6 zone such as
    ``%en0`` dropped: the interface is named beside it)."""
    ip_families = (socket.AF_INET, socket.AF_INET6)
    return {
        name: tuple(a.address.split("%")[0] for a in entries if a.family in ip_families)
        for name, entries in psutil.net_if_addrs().items()
    }


def network_interfaces(
    addresses: Mapping[str, tuple[str, ...]], ports: Mapping[str, InterfacePort]
) -> tuple[NetworkInterface, ...]:
    """The interfaces worth reporting, by name: every one whose kind the OS tells (a Thunderbolt
    port in a bridge has no address of its own), and the others that have an address beyond
    link-local (which macOS gives to a dozen internal interfaces)."""
    found = []
    for name, addrs in sorted(addresses.items()):
        port = ports.get(name, InterfacePort("other"))
        if port.kind != "other" or any(beyond_link_local(a) for a in addrs):
            found.append(
                NetworkInterface(
                    name,
                    port.kind,
                    addrs,
                    port.linked,
                    port.domain,
                    port.peer_domain,
                    port.rdma_device,
                    port.link_gbps,
                )
            )
    return tuple(found)


def beyond_link_local(address: str) -> bool:
    try:
        return not ipaddress.ip_address(address).is_link_local
    except ValueError:  # not an address we know how to read: report it rather than hide it
        return True


THIS_MACHINE = collector_for_this_platform()  # building one reads nothing


def collect_node_facts() -> NodeFacts:
    """This machine's facts, as ``GET /api/v1/state`` reports them. Blocking: call it in an executor."""
    return THIS_MACHINE.collect()
