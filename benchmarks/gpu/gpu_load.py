"""Run a command and print the GPU's load while it ran: ``python gpu_load.py -- COMMAND ...``.

NVML (``nvidia-ml-py``) is read every ``--interval`` seconds (default 0.1) from a thread while the
command runs: the GPU's utilisation (the share of time a kernel ran, NVML's own measure over its
last sample period) as its mean and maximum over the samples, and the most device memory in use.
The line is printed after the command's own output, so each benchmark's figures have the load
they were measured at beside them. Exits with the command's status.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading

import pynvml


class LoadSampler:
    def __init__(self, interval_s: float):
        pynvml.nvmlInit()
        self._device = pynvml.nvmlDeviceGetHandleByIndex(0)  # MLX's device
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.utilization: list[int] = []
        self.memory_peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        pynvml.nvmlShutdown()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.utilization.append(pynvml.nvmlDeviceGetUtilizationRates(self._device).gpu)
            used = pynvml.nvmlDeviceGetMemoryInfo(self._device).used
            self.memory_peak = max(self.memory_peak, used)

    def summary(self) -> str:
        if not self.utilization:
            return "GPU: no samples"
        mean = sum(self.utilization) / len(self.utilization)
        busy = sum(1 for u in self.utilization if u > 0) / len(self.utilization)
        return (
            f"GPU: utilisation mean {mean:.0f}% (max {max(self.utilization)}%, above 0% in {busy:.0%} of "
            f"{len(self.utilization)} samples), memory in use at most {self.memory_peak / 1e9:.1f} GB"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between NVML samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    options = parser.parse_args()
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    if not command:
        parser.error("give the command to run after --")
    with LoadSampler(options.interval) as sampler:
        code = subprocess.call(command)
    print(sampler.summary(), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
