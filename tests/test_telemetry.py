"""Node telemetry: the agent samples CPU, memory, GPU, storage and network every interval into a
ring buffer and serves it at ``GET /api/v1/telemetry``. Real readings of this machine (CPU rises
under load, loopback traffic shows), macmon's output as recorded in its two shapes, and a real
agent process answering signed requests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import openai
import psutil
import pytest
from agent_harness import call, start_agent
from conftest import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from genmlx.agent.facts.platform import PlatformCommandFailed
from genmlx.agent.telemetry.gpu import IOREG_ACCELERATOR, Ioreg, Macmon, Nvml, parse_ioreg, parse_macmon
from genmlx.agent.telemetry.sampler import TelemetrySampler, disk_of
from genmlx.master.runtime.telemetry import node_gauges
from genmlx.wire.telemetry import TelemetryReport

MACMON = Path(__file__).parent / "data" / "macmon"
IOREG = Path(__file__).parent / "data" / "ioreg" / "IOAccelerator-a.plist"


def test_macmon_lines_of_both_shapes_give_the_gpu_and_the_systems_power():
    gpu, system = parse_macmon((MACMON / "pipe-0.6.jsonl").read_text().splitlines()[0])
    assert (gpu.source, gpu.utilization_percent, gpu.power_watts) == ("macmon", 97.0, 61.4)
    assert gpu.temperature_c == 47.9 and system == 88.5
    old, old_system = parse_macmon((MACMON / "pipe-0.4.jsonl").read_text())
    assert old.utilization_percent == pytest.approx(2.1497859)
    assert old.power_watts == pytest.approx(0.017451683)
    assert old_system == pytest.approx(5.876533)
    partial, none = parse_macmon('{"gpu_power": 1.5, "temp": {}}')  # fields missing: None, not 0
    assert (partial.utilization_percent, partial.power_watts, partial.temperature_c) == (None, 1.5, None)
    assert none is None
    for garbage in ("[1, 2]", "not json", '"text"'):
        with pytest.raises(ValueError):
            parse_macmon(garbage)


def test_the_macmon_reader_follows_a_running_macmon_and_forgets_it_once_it_stops(tmp_path):
    stand_in = tmp_path / "macmon"  # prints the recorded lines as `macmon pipe -i MS` would
    lines = (MACMON / "pipe-0.6.jsonl").read_text().splitlines()
    stand_in.write_text(
        f"#!{sys.executable}\nimport sys, time\nassert sys.argv[1:3] == ['pipe', '-i'], sys.argv\n"
        f"for line in {lines!r} * 20:\n    print(line, flush=True)\n    time.sleep(0.1)\n"
    )
    stand_in.chmod(0o755)
    reader = Macmon([str(stand_in)], interval_s=0.1)
    try:
        gpu, system = wait_until(lambda: reader.read()[0] and reader.read(), 10, what="a macmon sample")
        assert gpu.utilization_percent in (97.0, 95.0) and system in (88.5, 87.9)
    finally:
        reader.close()


def test_without_macmon_a_mac_reads_its_gpu_from_the_drivers_statistics_in_ioreg(tmp_path):
    recorded = IOREG.read_text()
    gpu = parse_ioreg(recorded)
    assert (gpu.source, gpu.utilization_percent, gpu.memory_used_bytes) == ("ioreg", 93.0, 24713150464)
    assert gpu.power_watts is None, "ioreg tells no power: None, not 0"
    assert parse_ioreg(b'<?xml version="1.0"?><plist version="1.0"><array/></plist>') is None
    with pytest.raises(ValueError):
        parse_ioreg("IOAccelerator <class AGXAcceleratorG14X>")  # ioreg's text form, not -a
    with pytest.raises(ValueError):
        parse_ioreg(recorded[: len(recorded) // 2])  # cut short: a failed read, not a crash

    answers: list[str | Exception] = [recorded, PlatformCommandFailed("ioreg: timed out"), recorded, recorded]

    def run(argv):
        assert tuple(argv) == IOREG_ACCELERATOR
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    reader = Ioreg(run)
    sampler = TelemetrySampler((tmp_path,), interval_s=0.25, gpu=reader)
    assert sampler.sample().gpu == gpu
    assert sampler.sample().gpu is None, "a failed read is no figures, not the last ones"
    assert sampler.sample().gpu == gpu
    gauges = {family.name: family.samples for family in node_gauges({"mac": sampler.sample()})}
    (memory,) = gauges["genmlx_node_gpu_memory_used_bytes"]
    assert memory.labels == {"node": "mac", "source": "ioreg"} and memory.value == 24713150464
    assert not gauges["genmlx_node_gpu_power_watts"], "no power figure, no gauge"


class StandInNvml:
    """The part of ``pynvml`` the agent calls, answering for two GPUs; ``memory_v2`` False is a
    driver without the second memory query (NVML_ERROR_FUNCTION_NOT_FOUND)."""

    NVML_TEMPERATURE_GPU = 0
    nvmlMemory_v2 = 0x02000028

    class NVMLError(Exception):
        pass

    def __init__(self, memory_v2: bool = True):
        self.memory_v2, self.failing = memory_v2, False

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUtilizationRates(self, device):
        if self.failing:
            raise self.NVMLError("GPU is lost")
        return types.SimpleNamespace(gpu=(100, 50)[device])

    def nvmlDeviceGetPowerUsage(self, device):
        return (318_000, 80_000)[device]  # milliwatts

    def nvmlDeviceGetMemoryInfo(self, device, version=None):
        if version is not None and not self.memory_v2:
            raise self.NVMLError("Function Not Found")
        reserved = 0 if version else 615 << 20  # the first query counts the driver's reserve
        return types.SimpleNamespace(used=(552 << 20, 0)[device] + reserved)

    def nvmlDeviceGetTemperature(self, device, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return (50, 39)[device]

    def nvmlShutdown(self):
        pass


def test_nvml_averages_load_and_sums_power_and_memory_over_the_gpus():
    gpu, system = Nvml(StandInNvml()).read()
    assert (gpu.source, gpu.utilization_percent, gpu.power_watts, gpu.temperature_c) == ("nvml", 75, 398, 50)
    assert gpu.memory_used_bytes == 552 << 20 and system is None
    older = Nvml(StandInNvml(memory_v2=False)).read()[0]
    assert older.memory_used_bytes == (552 << 20) + 2 * (615 << 20), "the first query where v2 is missing"
    failing = StandInNvml()
    reader = Nvml(failing)
    failing.failing = True
    assert reader.read() == (None, None)


@pytest.mark.alone  # the machine's CPU load: another test's would be counted
def test_cpu_rises_under_load_and_falls_back(tmp_path):
    sampler = TelemetrySampler((tmp_path,), interval_s=0.25)
    sampler.start()
    try:
        time.sleep(1.0)
        started = time.time()
        spin = "import time\nend = time.time() + 2\nwhile time.time() < end: pass"
        busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
        for process in busy:
            process.wait()
        time.sleep(1.5)
        under_load = [s.cpu_percent for s in sampler.since(started + 0.5) if s.at < started + 2]
        after = [s.cpu_percent for s in sampler.since(started + 3)]
        assert max(under_load) >= 80, under_load
        assert min(after) < 60, after
    finally:
        sampler.stop()


def test_storage_and_network_are_measured(tmp_path):
    sampler = TelemetrySampler((tmp_path,), interval_s=0.25)
    sampler.start()
    try:
        started = time.time()
        sent = send_over_loopback(20 << 20)
        time.sleep(0.6)
        samples = sampler.since(started)
    finally:
        sampler.stop()
    assert sent == 20 << 20
    storage = samples[-1].storage[0]
    usage = shutil.disk_usage(tmp_path)
    assert storage.path == str(tmp_path) and storage.total_bytes == usage.total
    assert abs(storage.free_bytes - usage.free) < 1 << 30
    loopback = [i for s in samples for i in s.network if i.kind == "loopback"]
    assert loopback and max(i.rx_bytes_per_s for i in loopback) > 1 << 20, loopback
    memory = samples[-1]
    assert 0 < memory.memory_used_bytes <= memory.memory_total_bytes
    assert memory.gpu is None  # no macmon, no NVIDIA GPU on a test machine: nothing made up


def send_over_loopback(total: int) -> int:
    """Push ``total`` bytes through a loopback TCP connection; how many arrived."""
    server = socket.create_server(("127.0.0.1", 0))
    received = 0

    def drain() -> None:
        nonlocal received
        connection, _ = server.accept()
        with connection:
            while chunk := connection.recv(1 << 20):
                received += len(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with socket.create_connection(server.getsockname()) as client:
        chunk = bytes(1 << 20)
        for _ in range(total >> 20):
            client.sendall(chunk)
            time.sleep(0.02)  # spread over a few samples
    reader.join(10)
    server.close()
    return received


def test_a_storage_path_that_is_not_there_is_left_out_and_the_rest_still_sampled(tmp_path):
    missing = tmp_path / "unmounted-drive"
    sampler = TelemetrySampler((missing, tmp_path))
    sampler.start()
    try:
        sample = sampler.sample()
    finally:
        sampler.stop()
    assert [s.path for s in sample.storage] == [str(tmp_path)]


def test_a_path_is_mapped_to_the_disk_its_io_is_counted_under_and_none_without_one(tmp_path):
    root = max(
        (p for p in psutil.disk_partitions(all=True) if p.mountpoint == "/"), key=lambda p: len(p.device)
    )
    if root.device.startswith("/dev/"):  # a block device (not an overlay, as in a container)
        assert disk_of(Path("/")) in psutil.disk_io_counters(perdisk=True), root
    assert disk_of(Path("/proc")) is None  # proc, tmpfs, network shares: no disk under them
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_path)], check=True)
        try:
            assert disk_of(tmp_path) is None
        finally:
            subprocess.run(["umount", "-l", str(tmp_path)], check=False)


@pytest.mark.e2e
def test_an_agent_serves_its_last_samples_to_signed_requests_only(spawn, token, tmp_path, monkeypatch):
    monkeypatch.setenv("GENMLX_TELEMETRY_INTERVAL_S", "0.2")
    agent = start_agent(spawn, token, "t1", (tmp_path,))

    def reports(since: float = 0) -> TelemetryReport:
        return TelemetryReport.from_json(agent.call("GET", f"/api/v1/telemetry?since={since}").json())

    first = wait_until(lambda: len(reports().samples) >= 3 and reports(), 15, what="three samples")
    assert first.interval_s == 0.2
    assert [s.storage[0].path for s in first.samples] == [str(tmp_path)] * len(first.samples)
    times = [s.at for s in first.samples]
    assert times == sorted(times) and time.time() - times[-1] < 5
    later = reports(times[-1])
    assert all(s.at > times[-1] for s in later.samples), "only what came after"
    assert call("GET", f"{agent.url}/api/v1/telemetry", None).status == 401
    assert agent.call("GET", "/api/v1/telemetry?since=yesterday").status == 400
    assert agent.call("GET", "/api/v1/telemetry?since=nan").status == 400


@pytest.mark.e2e
def test_the_master_gathers_every_nodes_samples_and_its_dispatchers_metrics(
    spawn, genmlx_home, token, monkeypatch
):
    master = start_demo(spawn, monkeypatch, sample_s=0.25, poll_s=0.5)

    def series(since: float = 0, kind: str = "nodes") -> dict[str, list[dict]]:
        reply = call("GET", f"{master}/api/v1/telemetry?since={since}", None, headers=bearer(token))
        assert reply.status == 200, reply.body
        return reply.json()[kind]

    (node,) = wait_until(lambda: len(next(iter(series().values()), [])) >= 4 and series(), 30, what="samples")
    time.sleep(1.5)
    idle = [s["cpuPercent"] for s in series(time.time() - 1.5)[node]]
    loaded_from = time.time()
    decode_for(f"{master}/v1", token, seconds=4)
    loaded = [s["cpuPercent"] for s in series(loaded_from + 0.5)[node] if s["at"] < loaded_from + 4]
    assert max(loaded) >= 45 and max(loaded) >= sorted(idle)[len(idle) // 2] + 20, (idle, loaded)

    # The model's own series, from its rank 0's counters: tokens/s and TTFT while it decoded.
    points = series(loaded_from - 1, "models")["genmlx-demo"]
    during = [p for p in points if loaded_from < p["at"] < loaded_from + 5]
    assert {p["node"] for p in points} == {node}
    assert max(p["generationTokensPerS"] or 0 for p in during) > 10, during
    assert any((p["timeToFirstTokenS"] or 0) > 0 for p in during), during
    assert max(p["requestsRunning"] for p in during) >= 1, during

    text = call("GET", f"{master}/metrics", None, headers=bearer(token)).body.decode()
    gauges = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    node_label = (("node", node),)
    assert gauges[("genmlx_node_memory_total_bytes", node_label)] == psutil.virtual_memory().total
    assert 0 <= gauges[("genmlx_node_cpu_percent", node_label)] <= 100
    generated = gauges.get(
        ("vllm:generation_tokens_total", (("model_name", "genmlx-demo"), ("node", node))), 0
    )
    vllm = [line for line in text.splitlines() if line.startswith("vllm:generation_tokens")]
    assert generated >= 64, f"the dispatcher's own counters, with the node of its rank 0: {vllm}"
    measured = {name for name, _ in gauges}
    assert "genmlx_node_swap_used_bytes" in measured
    assert "genmlx_node_gpu_utilization_percent" not in measured, "no GPU here: left out, not 0"
    assert call("GET", f"{master}/api/v1/telemetry", None).status == 401
    assert call("GET", f"{master}/api/v1/telemetry?since=nan", None, headers=bearer(token)).status == 400


def test_a_models_points_are_rates_over_each_interval_and_nothing_across_a_restart():
    from genmlx.master.runtime.serving_metrics import Totals

    first = Totals(100.0, "n1", 50, prompt_tokens=10, ttft_sum=0.4, ttft_count=2, waiting=0, running=1)
    second = Totals(102.0, "n1", 150, prompt_tokens=30, ttft_sum=1.0, ttft_count=4, waiting=3, running=2)
    point = second.since(first)
    assert (point.generation_tokens_per_s, point.prompt_tokens_per_s) == (50.0, 10.0)
    assert point.time_to_first_token_s == pytest.approx(0.3), "the mean of the interval's two requests"
    assert (point.requests_waiting, point.requests_running, point.node) == (3, 2, "n1")
    quiet = Totals(104.0, "n1", 150, 30, 1.0, 4, 0, 0).since(second)
    assert (quiet.generation_tokens_per_s, quiet.time_to_first_token_s) == (0.0, None)
    restarted = Totals(106.0, "n1", 5, 3, 0.1, 1, 0, 1).since(second)
    assert restarted.generation_tokens_per_s is None and restarted.time_to_first_token_s is None
    moved = Totals(106.0, "n2", 900, 300, 9.0, 40, 0, 1).since(second)
    assert moved.generation_tokens_per_s is None, "another node's rank 0: its counters are not these"
    assert first.since(None).generation_tokens_per_s is None, "no interval before the first"


def start_demo(spawn, monkeypatch, sample_s: float, poll_s: float) -> str:
    """``genmlx demo`` serving, its agent sampling every ``sample_s`` and its master asking every
    ``poll_s``; the master's URL."""
    monkeypatch.setenv("GENMLX_TELEMETRY_INTERVAL_S", str(sample_s))
    monkeypatch.setenv("GENMLX_TELEMETRY_POLL_S", str(poll_s))
    port, agent_port = free_port(), free_port()
    demo = spawn(["-m", "genmlx", "demo", "--port", str(port), "--agent-port", str(agent_port)], "demo")
    wait_until(lambda: "Ctrl-C stops the cluster" in demo.output(), 180, what="the demo to serve")
    return f"http://127.0.0.1:{port}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def decode_for(base_url: str, token: str, seconds: float) -> None:
    """Keep four streams decoding through the master for ``seconds``."""
    client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=60)
    end = time.monotonic() + seconds

    def stream() -> None:
        while time.monotonic() < end:
            reply = client.completions.create(
                model="genmlx-demo", prompt="Rivers", max_tokens=64, stream=True
            )
            for _ in reply:
                pass

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


IMPOSTOR_METRICS = '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} 99\n'


def test_metrics_from_something_that_is_not_a_rank_of_the_cluster_are_left_out(caplog):
    """A LAN device answering at a rank's address with metrics of its own (unsigned) gets none of
    them onto the master's /metrics."""
    import asyncio

    from tornado.httpclient import AsyncHTTPClient
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets
    from tornado.web import Application, RequestHandler

    from genmlx.core.signing import Keys
    from genmlx.master.runtime.serving_metrics import ServingMetrics

    class Impostor(RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "text/plain; version=0.0.4")
            self.finish(IMPOSTOR_METRICS)

    async def scrape() -> list:
        sockets = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(Application([(r"/metrics", Impostor)]))
        server.add_sockets(sockets)
        metrics = ServingMetrics(
            lambda: {"m": ("n1", f"http://127.0.0.1:{sockets[0].getsockname()[1]}/v1")},
            lambda host: Keys.of("the cluster token"),
            AsyncHTTPClient(force_instance=True),
        )
        await metrics.gather()
        await metrics.gather()
        server.stop()
        return list(metrics.collect())

    assert asyncio.run(scrape()) == []
    refusals = [r.getMessage() for r in caplog.records if "leaving out m's metrics" in r.getMessage()]
    assert len(refusals) == 1 and "not its rank 0" in refusals[0], "said once, with why"
