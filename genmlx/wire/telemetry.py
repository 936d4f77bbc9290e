"""What a node is doing, second by second: an agent's telemetry samples (``GET /api/v1/telemetry``).

A value the node cannot measure is None (a GPU on a machine without one, wired memory on Linux),
never 0: a chart leaves a gap rather than drawing a false zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from genmlx.wire.agent_state import InterfaceKind
from genmlx.wire.codec import WireType


@dataclass(frozen=True)
class StorageSample(WireType):
    """One storage path: its file system's free space, and the I/O of the disk under it."""

    path: str
    free_bytes: int
    total_bytes: int
    read_bytes_per_s: float | None = None  # None where the disk under the path is not found
    write_bytes_per_s: float | None = None


@dataclass(frozen=True)
class InterfaceSample(WireType):
    """One network interface's throughput over the last interval."""

    name: str
    kind: InterfaceKind
    rx_bytes_per_s: float
    tx_bytes_per_s: float


@dataclass(frozen=True)
class GpuSample(WireType):
    """The GPU, from macmon or ioreg on a Mac or NVML on a machine with an NVIDIA GPU."""

    source: str  # "macmon", "ioreg" or "nvml"
    utilization_percent: float | None = None
    power_watts: float | None = None
    # A discrete GPU's own memory (NVML), or what the GPU uses of a Mac's unified memory (ioreg).
    memory_used_bytes: int | None = None
    temperature_c: float | None = None


@dataclass(frozen=True)
class TelemetrySample(WireType):
    at: float  # unix time the sample was taken
    cpu_percent: float  # every core together, 0-100
    memory_used_bytes: int
    memory_total_bytes: int
    swap_used_bytes: int
    memory_wired_bytes: int | None = None  # macOS: memory that cannot be paged out (MLX's weights)
    system_power_watts: float | None = None  # macOS with macmon: the whole machine, where it tells
    gpu: GpuSample | None = None
    storage: tuple[StorageSample, ...] = ()
    network: tuple[InterfaceSample, ...] = ()


@dataclass(frozen=True)
class TelemetryReport(WireType):
    """An agent's samples newer than the asked ``since``, oldest first, and how often it samples."""

    interval_s: float
    samples: tuple[TelemetrySample, ...] = ()


@dataclass(frozen=True)
class ServingSample(WireType):
    """One serving model over the interval before ``at``, from its rank 0's metrics as the master
    scraped them. A rate is None over an interval it cannot be told for (the first scrape, a
    restarted rank whose counters began again); ``time_to_first_token_s`` is the mean over the
    requests that got their first token in the interval, None where none did."""

    at: float
    node: str  # where rank 0 runs
    generation_tokens_per_s: float | None
    prompt_tokens_per_s: float | None
    time_to_first_token_s: float | None
    requests_waiting: float
    requests_running: float


def since_time(text: str) -> float:
    """The ``since`` of a telemetry query: unix seconds; ``ValueError`` for anything else (NaN
    included)."""
    since = float(text)
    if since != since:
        raise ValueError(f"{text!r} is not a time")
    return since
