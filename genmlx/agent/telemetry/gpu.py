"""The GPU's load and power, where the machine tells it without root.

- On a Mac: ``macmon pipe`` (Homebrew's ``macmon``), a long-running child that prints one JSON
  object per interval. ``Macmon`` keeps the latest; ``parse_macmon`` reads both of the shapes
  macmon has printed over its versions (``gpu_usage: [MHz, ratio]`` before 0.6,
  ``gpu_active_ratio`` after). Without macmon, ``Ioreg``: the GPU driver's own
  ``PerformanceStatistics`` (``ioreg -c IOAccelerator``; utilisation and the unified memory the GPU
  uses, no power), which needs no root, unlike ``powermetrics``.
- With an NVIDIA GPU: NVML, through ``nvidia-ml-py`` (``pynvml``), summed over the devices.
- Elsewhere: nothing (None), never a made-up zero.
"""

from __future__ import annotations

import contextlib
import json
import logging
import plistlib
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol
from xml.parsers.expat import ExpatError

from genmlx.agent.facts.platform import CommandRunner, PlatformCommandFailed, run_command
from genmlx.wire.telemetry import GpuSample

log = logging.getLogger(__name__)

STALE_S = 5.0  # a macmon sample older than this is not the GPU's state any more
RESTART_S = 60.0  # after macmon exits, wait this long before starting it again


class GpuReader(Protocol):
    def read(self) -> tuple[GpuSample | None, float | None]:
        """The GPU now, and the whole machine's power in watts where known."""

    def close(self) -> None: ...


class NoGpu:
    def read(self) -> tuple[GpuSample | None, float | None]:
        return None, None

    def close(self) -> None:
        pass


def parse_macmon(line: str) -> tuple[GpuSample, float | None]:
    """One line of ``macmon pipe``: the GPU, and the system's power (``sys_power``, else the
    CPU + GPU + ANE ``all_power``). Raises ``ValueError`` for a line that is not macmon's JSON."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    ratio = data.get("gpu_active_ratio")
    if ratio is None and isinstance(data.get("gpu_usage"), list) and len(data["gpu_usage"]) == 2:
        ratio = data["gpu_usage"][1]
    temperature = (data.get("temp") or {}).get("gpu_temp_avg")
    gpu = GpuSample(
        source="macmon",
        utilization_percent=number(ratio, scale=100.0),
        power_watts=number(data.get("gpu_power")),
        temperature_c=number(temperature),
    )
    system = number(data.get("sys_power")) or number(data.get("all_power"))
    return gpu, system


def number(value: Any, scale: float = 1.0) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) * scale


class Macmon:
    """``macmon pipe`` running beside the agent; ``read`` answers its latest sample."""

    def __init__(self, command: Sequence[str], interval_s: float):
        self.command = [*command, "pipe", "-i", str(max(100, int(interval_s * 1000)))]
        self._latest: tuple[float, GpuSample, float | None] | None = None
        self._process: subprocess.Popen | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="macmon", daemon=True)
        self._thread.start()

    def read(self) -> tuple[GpuSample | None, float | None]:
        latest = self._latest
        if latest is None or time.monotonic() - latest[0] > STALE_S:
            return None, None
        return latest[1], latest[2]

    def close(self) -> None:
        self._stopped.set()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._follow()
            if self._stopped.wait(RESTART_S):
                return

    def _follow(self) -> None:
        try:
            self._process = subprocess.Popen(
                self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        except OSError as e:
            log.warning("cannot run %s: %s; no GPU figures", self.command[0], e)
            return
        assert self._process.stdout is not None
        for line in self._process.stdout:
            try:
                gpu, system = parse_macmon(line)
            except ValueError:
                continue
            self._latest = (time.monotonic(), gpu, system)
        if not self._stopped.is_set():
            code = self._process.wait()
            log.warning("macmon exited (code %s); starting it again in %.0f s", code, RESTART_S)


# The GPU driver's registry entries, as an XML plist (-a): one level deep, whole lines.
IOREG_ACCELERATOR = ("ioreg", "-r", "-d", "1", "-w", "0", "-c", "IOAccelerator", "-a")


def parse_ioreg(output: str | bytes) -> GpuSample | None:
    """The GPU in ``ioreg``'s plist of IOAccelerator entries: the first entry with
    ``PerformanceStatistics`` (Apple silicon has one GPU); None where none has. Raises
    ``ValueError`` for output that is not a plist."""
    data = output.encode() if isinstance(output, str) else output
    try:
        entries = plistlib.loads(data)
    except (plistlib.InvalidFileException, ExpatError) as e:  # not a plist, or cut short
        raise ValueError(f"not a plist: {e}") from None
    for entry in entries if isinstance(entries, list) else [entries]:
        stats = entry.get("PerformanceStatistics") if isinstance(entry, dict) else None
        if isinstance(stats, dict):
            memory = number(stats.get("In use system memory"))
            return GpuSample(
                source="ioreg",
                utilization_percent=number(stats.get("Device Utilization %")),
                memory_used_bytes=None if memory is None else int(memory),
            )
    return None


class Ioreg:
    """A Mac's GPU from its driver's statistics, read with ``ioreg`` at every sample."""

    def __init__(self, run: CommandRunner = run_command):
        self.run = run
        self._failing = False

    def read(self) -> tuple[GpuSample | None, float | None]:
        try:
            gpu = parse_ioreg(self.run(IOREG_ACCELERATOR))
        except (PlatformCommandFailed, ValueError) as e:
            if not self._failing:
                log.warning("cannot read the GPU's statistics: %s", e)
            self._failing = True
            return None, None
        self._failing = False
        return gpu, None

    def close(self) -> None:
        pass


class Nvml:
    """NVIDIA GPUs through NVML: utilization averaged, power and memory summed over the devices."""

    def __init__(self, nvml: Any):
        self.nvml = nvml
        self.devices = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        self._memory_v2 = hasattr(nvml, "nvmlMemory_v2")

    def read(self) -> tuple[GpuSample | None, float | None]:
        nvml = self.nvml
        try:
            utilization = [nvml.nvmlDeviceGetUtilizationRates(d).gpu for d in self.devices]
            power_mw = [nvml.nvmlDeviceGetPowerUsage(d) for d in self.devices]
            memory = [self._memory_used(d) for d in self.devices]
            temperature = [nvml.nvmlDeviceGetTemperature(d, nvml.NVML_TEMPERATURE_GPU) for d in self.devices]
        except nvml.NVMLError as e:
            log.debug("NVML: %s", e)
            return None, None
        gpu = GpuSample(
            source="nvml",
            utilization_percent=sum(utilization) / len(utilization),
            power_watts=sum(power_mw) / 1000,
            memory_used_bytes=sum(memory),
            temperature_c=float(max(temperature)),
        )
        return gpu, None

    def _memory_used(self, device: Any) -> int:
        """What processes use of a device's memory, as ``nvidia-smi`` counts it: the v2 query,
        which leaves out what the driver reserves (about 600 MB on an H200); the first query's
        figure, which includes it, where the driver has no v2."""
        nvml = self.nvml
        if self._memory_v2:
            try:
                return nvml.nvmlDeviceGetMemoryInfo(device, version=nvml.nvmlMemory_v2).used
            except nvml.NVMLError:
                self._memory_v2 = False
        return nvml.nvmlDeviceGetMemoryInfo(device).used

    def close(self) -> None:
        with contextlib.suppress(self.nvml.NVMLError):
            self.nvml.nvmlShutdown()


def open_gpu_reader(interval_s: float, macmon: str | None = None) -> GpuReader:
    """macmon where it is installed (or ``macmon`` names it), else ioreg on a Mac, else NVML where
    a GPU answers, else nothing."""
    found = macmon or shutil.which("macmon")
    if found:
        return Macmon([found], interval_s)
    if sys.platform == "darwin":
        return Ioreg()
    try:
        import pynvml  # nvidia-ml-py; Linux only
    except ImportError:
        return NoGpu()
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() > 0:
            return Nvml(pynvml)
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as e:  # no driver, no device: the usual case on a Mac or a CPU box
        log.debug("no NVIDIA GPU: %s", e)
    return NoGpu()
