"""Every node's telemetry, gathered by the master: the samples each agent took since the last ask,
kept for the same five minutes, for the status page (``GET /api/v1/telemetry``) and, each node's
latest sample as gauges with a ``node`` label, for the master's ``/metrics``.

It asks the agents the last pass proved (``Reconciler.proven_clients``) every ``interval_s``, in
a task of its own: a slow or silent agent delays nobody's figures but its own, and never a pass.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from genmlx.core.errors import GenMLXError
from genmlx.master.runtime.agent_client import AgentClient
from genmlx.master.runtime.serving_metrics import ServingMetrics
from genmlx.wire.telemetry import TelemetrySample

log = logging.getLogger(__name__)

KEEP_S = 300.0  # as long as an agent keeps them
STALE_AFTER_S = 15.0  # a node whose latest sample is older than this is not in /metrics
POLL_ENV = "GENMLX_TELEMETRY_POLL_S"


class NodeTelemetry(Collector):
    def __init__(
        self,
        clients: Callable[[], dict[str, AgentClient]],
        interval_s: float = 2.0,
        serving: ServingMetrics | None = None,
    ):
        """``serving``: the dispatchers' metrics, scraped on the same beat and served beside."""
        self.clients = clients
        self.interval_s = interval_s
        self.serving = serving
        self._samples: dict[str, collections.deque[TelemetrySample]] = {}
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        """Ask every proven agent for its new samples every ``interval_s`` until ``stop``."""
        while not self._stopped.is_set():
            clients = self.clients()
            scrapes = [self._gather(name, client) for name, client in clients.items()]
            done = await asyncio.gather(
                *scrapes, *([self.serving.gather()] if self.serving else []), return_exceptions=True
            )
            for failed in (d for d in done if isinstance(d, Exception)):  # next time, then
                log.error("gathering telemetry failed", exc_info=failed)
            for gone in set(self._samples) - set(clients):  # a node left the manifest or went away
                self._forget_old(gone)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.interval_s)

    def stop(self) -> None:
        self._stopped.set()

    async def _gather(self, node: str, client: AgentClient) -> None:
        kept = self._samples.setdefault(node, collections.deque())
        since = kept[-1].at if kept else 0.0
        try:
            report = await client.telemetry(since)
        except GenMLXError as e:
            log.debug("no telemetry from %s: %s", node, e)
            return
        kept.extend(s for s in report.samples if s.at > since)
        self._forget_old(node)

    def _forget_old(self, node: str) -> None:
        kept = self._samples[node]
        while kept and kept[0].at < time.time() - KEEP_S:
            kept.popleft()
        if not kept:
            del self._samples[node]

    def series(self, since: float = 0.0) -> dict[str, tuple[TelemetrySample, ...]]:
        """Each node's samples taken after ``since``, oldest first."""
        return {node: tuple(s for s in kept if s.at > since) for node, kept in sorted(self._samples.items())}

    def latest(self) -> dict[str, TelemetrySample]:
        """Each node's newest sample, where it is recent."""
        now = time.time()
        return {
            node: kept[-1]
            for node, kept in sorted(self._samples.items())
            if kept and now - kept[-1].at <= STALE_AFTER_S
        }

    def collect(self) -> Iterator[Metric]:
        """The latest sample of every node as Prometheus gauges (``genmlx_node_*``), and the
        dispatchers' own families."""
        yield from node_gauges(self.latest())
        if self.serving is not None:
            yield from self.serving.collect()


def node_gauges(latest: dict[str, TelemetrySample]) -> Iterator[Metric]:
    def family(name: str, help_text: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"genmlx_node_{name}", help_text, labels=["node", *labels])

    cpu = family("cpu_percent", "CPU in use, every core together (0-100)")
    used = family("memory_used_bytes", "Memory in use (total less available)")
    total = family("memory_total_bytes", "Physical memory")
    wired = family("memory_wired_bytes", "Memory that cannot be paged out (macOS)")
    swap = family("swap_used_bytes", "Swap in use")
    power = family("system_power_watts", "The whole machine's power draw (macOS with macmon)")
    gpu = family("gpu_utilization_percent", "GPU busy (0-100)", ("source",))
    gpu_power = family("gpu_power_watts", "GPU power draw", ("source",))
    gpu_temperature = family("gpu_temperature_celsius", "GPU temperature", ("source",))
    gpu_memory = family("gpu_memory_used_bytes", "Memory the GPU uses (its own, or unified)", ("source",))
    free = family("storage_free_bytes", "Free space of a storage path's file system", ("path",))
    read = family("storage_read_bytes_per_second", "Reads of the disk under a storage path", ("path",))
    written = family("storage_write_bytes_per_second", "Writes to the disk under a storage path", ("path",))
    rx = family("network_receive_bytes_per_second", "Bytes received", ("interface", "kind"))
    tx = family("network_transmit_bytes_per_second", "Bytes sent", ("interface", "kind"))
    for node, s in latest.items():
        cpu.add_metric([node], s.cpu_percent)
        used.add_metric([node], s.memory_used_bytes)
        total.add_metric([node], s.memory_total_bytes)
        swap.add_metric([node], s.swap_used_bytes)
        add_known(wired, [node], s.memory_wired_bytes)
        add_known(power, [node], s.system_power_watts)
        if s.gpu is not None:
            add_known(gpu, [node, s.gpu.source], s.gpu.utilization_percent)
            add_known(gpu_power, [node, s.gpu.source], s.gpu.power_watts)
            add_known(gpu_temperature, [node, s.gpu.source], s.gpu.temperature_c)
            add_known(gpu_memory, [node, s.gpu.source], s.gpu.memory_used_bytes)
        for storage in s.storage:
            free.add_metric([node, storage.path], storage.free_bytes)
            add_known(read, [node, storage.path], storage.read_bytes_per_s)
            add_known(written, [node, storage.path], storage.write_bytes_per_s)
        for interface in s.network:
            rx.add_metric([node, interface.name, interface.kind], interface.rx_bytes_per_s)
            tx.add_metric([node, interface.name, interface.kind], interface.tx_bytes_per_s)
    yield from (cpu, used, total, wired, swap, power, gpu, gpu_power, gpu_temperature, gpu_memory)
    yield from (free, read, written, rx, tx)


def add_known(family: GaugeMetricFamily, labels: list[str], value: float | None) -> None:
    """A value the node measured; one it could not is left out, never reported as 0."""
    if value is not None:
        family.add_metric(labels, value)
