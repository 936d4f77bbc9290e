"""The node's NVIDIA GPUs as facts (name, memory, driver), through NVML (``nvidia-ml-py``).

Read once per agent, like the chip's name. A machine without the driver or without the package
has none, and says so in the log, never an error: most nodes are Macs.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from genmlx.wire.agent_state import GpuDevice

log = logging.getLogger(__name__)


def nvidia_gpus(nvml: Any = None) -> tuple[GpuDevice, ...]:
    """Every GPU NVML sees, in its index order (the order CUDA numbers them, and MLX takes the
    first); () where there is no NVML or no driver. ``nvml`` stands in for ``pynvml`` in tests."""
    if nvml is None:
        try:
            import pynvml as nvml  # nvidia-ml-py; installed on Linux only
        except ImportError:
            return ()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:
        log.debug("no NVIDIA driver here (%s)", e)
        return ()
    try:
        driver = text(nvml.nvmlSystemGetDriverVersion())
        devices = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        return tuple(
            GpuDevice(text(nvml.nvmlDeviceGetName(d)), nvml.nvmlDeviceGetMemoryInfo(d).total, driver)
            for d in devices
        )
    except nvml.NVMLError as e:
        log.warning("NVML found a driver but could not list its GPUs: %s", e)
        return ()
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


def text(value: str | bytes) -> str:
    """NVML's strings: bytes from older bindings, str from newer ones."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
