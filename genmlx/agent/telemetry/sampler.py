"""Sampling the node every ``interval_s`` into a ring buffer of the last few minutes.

CPU, memory and swap come from psutil; throughput (each disk under a storage path, each network
interface) is the difference between two readings of psutil's counters over the time between
them; the GPU from ``gpu.open_gpu_reader``. A thread of its own takes the samples, so a busy event
loop never delays one; ``since`` hands out those newer than a time.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from genmlx.agent.facts.collect import collect_node_facts
from genmlx.agent.telemetry.gpu import GpuReader, NoGpu
from genmlx.wire.agent_state import InterfaceKind
from genmlx.wire.telemetry import InterfaceSample, StorageSample, TelemetrySample

log = logging.getLogger(__name__)

HISTORY_S = 300.0  # what the ring buffer holds: five minutes
# A partition's name to its disk's, where psutil counts I/O per disk: disk3s1s1 -> disk3 (macOS),
# nvme0n1p2 -> nvme0n1, sda1 -> sda, mmcblk0p1 -> mmcblk0.
PARTITION = re.compile(r"^(disk\d+)s\d+.*$|^(nvme\d+n\d+|mmcblk\d+)p\d+$|^([a-z]+)\d+$")

INTERFACES_MAX_AGE_S = 60.0  # how long the node facts' list of interfaces is reused
InterfaceKinds = Callable[[], dict[str, InterfaceKind]]


class RefreshedInterfaceKinds:
    """The interfaces the node facts report (those worth charting, with their kind: Thunderbolt,
    Ethernet, Wi-Fi), read again once a minute. Called from the sampling thread: it may block."""

    def __init__(self) -> None:
        self._kinds: dict[str, InterfaceKind] = {}
        self._read_at = -INTERFACES_MAX_AGE_S

    def __call__(self) -> dict[str, InterfaceKind]:
        if time.monotonic() - self._read_at >= INTERFACES_MAX_AGE_S:
            self._read_at = time.monotonic()
            self._kinds = {i.name: i.kind for i in collect_node_facts().interfaces}
        return self._kinds


class TelemetrySampler:
    def __init__(
        self,
        storage_paths: tuple[Path, ...],
        interface_kinds: InterfaceKinds = dict,
        gpu: GpuReader | None = None,
        interval_s: float = 1.0,
    ):
        self.storage_paths = storage_paths
        self.interface_kinds = interface_kinds
        self.gpu = gpu or NoGpu()
        self.interval_s = interval_s
        self._samples: collections.deque[TelemetrySample] = collections.deque(
            maxlen=max(1, round(HISTORY_S / interval_s))
        )
        self._disks = {str(path): disk_of(path) for path in storage_paths}
        self._last: tuple[float, dict, dict] | None = None  # when, disk counters, network counters
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)

    def start(self) -> None:
        psutil.cpu_percent(interval=None)  # the first reading only sets the baseline
        self._last = (time.monotonic(), disk_counters(), network_counters())
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self.gpu.close()

    def since(self, at: float) -> tuple[TelemetrySample, ...]:
        """The samples taken after unix time ``at``, oldest first."""
        return tuple(s for s in list(self._samples) if s.at > at)

    def _run(self) -> None:
        failed = ""
        while not self._stopped.wait(self.interval_s):
            try:
                self._samples.append(self.sample())
                failed = ""
            except Exception as e:  # a reading that fails must not end the sampling
                if repr(e) != failed:  # said once, not every second
                    log.exception("a telemetry sample failed")
                failed = repr(e)

    def sample(self) -> TelemetrySample:
        now = time.monotonic()
        disks, nics = disk_counters(), network_counters()
        last_at, last_disks, last_nics = self._last or (now, disks, nics)
        self._last = (now, disks, nics)
        elapsed = max(now - last_at, 1e-3)
        memory = psutil.virtual_memory()
        gpu, system_power = self.gpu.read()
        return TelemetrySample(
            at=time.time(),
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_used_bytes=memory.total - memory.available,
            memory_total_bytes=memory.total,
            swap_used_bytes=psutil.swap_memory().used,
            memory_wired_bytes=getattr(memory, "wired", None),  # macOS (and BSD) only
            system_power_watts=system_power,
            gpu=gpu,
            storage=tuple(
                found
                for path in self.storage_paths
                if (found := self._storage(path, disks, last_disks, elapsed)) is not None
            ),
            network=self._network(nics, last_nics, elapsed),
        )

    def _storage(self, path: Path, disks: dict, last: dict, elapsed: float) -> StorageSample | None:
        """None for a path that is not there (a drive not mounted): the status says so already."""
        try:
            usage = shutil.disk_usage(path)
        except OSError:
            return None
        disk = self._disks[str(path)]
        if disk is None or disk not in disks or disk not in last:
            return StorageSample(str(path), usage.free, usage.total)
        read = (disks[disk].read_bytes - last[disk].read_bytes) / elapsed
        written = (disks[disk].write_bytes - last[disk].write_bytes) / elapsed
        return StorageSample(str(path), usage.free, usage.total, max(read, 0.0), max(written, 0.0))

    def _network(self, nics: dict, last: dict, elapsed: float) -> tuple[InterfaceSample, ...]:
        kinds = self.interface_kinds()  # empty where the facts are not read: every interface up
        up = {name for name, stats in psutil.net_if_stats().items() if stats.isup}
        return tuple(
            InterfaceSample(
                name,
                kinds.get(name, "loopback" if re.fullmatch(r"lo\d*", name) else "other"),
                max((nics[name].bytes_recv - last[name].bytes_recv) / elapsed, 0.0),
                max((nics[name].bytes_sent - last[name].bytes_sent) / elapsed, 0.0),
            )
            for name in sorted(nics)
            if name in last and name in up and (not kinds or name in kinds)
        )


def disk_counters() -> dict:
    return psutil.disk_io_counters(perdisk=True) or {}


def network_counters() -> dict:
    return psutil.net_io_counters(pernic=True) or {}


def disk_of(path: Path) -> str | None:
    """The name psutil counts I/O under for the disk holding ``path`` (its partition's device, or
    the disk that partition is on); None for file systems without one (tmpfs, network shares)."""
    real = os.path.realpath(path)
    mounts = [p for p in psutil.disk_partitions(all=True) if is_under(real, p.mountpoint)]
    if not mounts:
        return None
    device = os.path.basename(max(mounts, key=lambda p: len(p.mountpoint)).device)
    counted = disk_counters()
    if device in counted:
        return device
    match = PARTITION.match(device)
    whole = next((g for g in match.groups() if g), None) if match else None
    return whole if whole in counted else None


def is_under(path: str, mountpoint: str) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")
