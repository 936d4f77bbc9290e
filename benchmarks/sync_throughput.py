"""Peer sync throughput: our agent-to-agent sync against rsync over the same link, in the same run.

    sudo python benchmarks/sync_throughput.py [--mb 300] [--rounds 5]

Two hosts of a network-namespace bench (``tests/netbench.py``: a veth pair per host on one bridge)
each run a real agent. Host A holds a model of a few hundred MB of random safetensors data; host B
pulls it through ``POST /api/v1/models`` with ``peer`` set, which is timed from the request until
the model is published in B's storage path (so it includes B's sha256 of every byte received and
the atomic publish). The baseline copies the same files over the same link with rsync (an rsync
daemon in A, the client in B; rsync checks each file with its own whole-file checksum), or, where
rsync cannot be installed, a plain byte stream over TCP written to disk (no checksum at all).
Rounds alternate between the two, B's copy is deleted and dirty pages flushed between rounds, and
the medians are compared.

Needs root and iproute2 (``ip``); installs rsync with apt-get when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # netbench and conftest live with the tests

from netbench import NetBench, ip_command  # noqa: E402

from genmlx.agent.store.model_store import METADATA_NAME  # noqa: E402
from genmlx.core.home import ensure_token, read_token  # noqa: E402
from genmlx.core.signing import Keys, signed_headers  # noqa: E402
from genmlx.wire.agent_state import FetchRequest  # noqa: E402

MODEL = "bench-model"
AGENT_PORT = 6790
RSYNC_PORT = 8730
STREAM_PORT = 8731
WRITE_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Setup:
    bench: NetBench
    work: Path
    storage_a: Path
    storage_b: Path
    token: str
    address_a: str
    address_b: str
    files: tuple[tuple[str, int], ...]  # (relative path, size) of the model's files

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


# ----- the model -----


def write_safetensors(path: Path, size: int) -> None:
    """A valid safetensors file of ``size`` bytes: one uint8 tensor of random data."""
    header = b""
    for _ in range(2):  # the header's length depends on the data's, which depends on the header's
        data_bytes = size - 8 - len(header)
        header = json.dumps(
            {"weight": {"dtype": "U8", "shape": [data_bytes], "data_offsets": [0, data_bytes]}}
        )
        header = header.encode().ljust((len(header) + 7) // 8 * 8, b" ")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        remaining = size - 8 - len(header)
        while remaining > 0:
            chunk = os.urandom(min(WRITE_CHUNK, remaining))
            f.write(chunk)
            remaining -= len(chunk)


def build_model(directory: Path, total_mb: int) -> tuple[tuple[str, int], ...]:
    """A model directory of about ``total_mb`` MB: two weight shards plus small config files."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "note": "random weights"}))
    (directory / "tokenizer_config.json").write_text("{}")
    shard = total_mb * 1_000_000 // 2
    for i in (1, 2):
        write_safetensors(directory / f"model-0000{i}-of-00002.safetensors", shard)
    return tuple(
        (p.relative_to(directory).as_posix(), p.stat().st_size)
        for p in sorted(directory.iterdir())
        if p.is_file()
    )


# ----- the agents -----


def agent_call(setup: Setup, address: str, method: str, path: str, body: object = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    url = f"http://{address}:{AGENT_PORT}{path}"
    signed, _ = signed_headers(Keys.of(setup.token), method, url, data)  # agents take signed requests only
    request = urllib.request.Request(url, data=data, method=method, headers=signed)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def start_agents(setup: Setup) -> None:
    env = {"GENMLX_HOME": str(setup.work / "home"), "GENMLX_DISCOVERY": "off"}
    for host, name, storage in ((0, "bench-a", setup.storage_a), (1, "bench-b", setup.storage_b)):
        argv = [sys.executable, "-m", "genmlx", "agent", "--name", name, "--storage", str(storage)]
        setup.bench.run(host, [*argv, "--port", str(AGENT_PORT), "--host", "0.0.0.0"], name, env)
    for address in (setup.address_a, setup.address_b):
        wait_for_port(address, AGENT_PORT)


def wait_for_port(address: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {address}:{port} after {timeout:.0f}s")


def sync_once(setup: Setup) -> float:
    """Seconds from B's fetch request until the model is published in B's storage path."""
    published = setup.storage_b / MODEL / METADATA_NAME
    request = FetchRequest(MODEL, str(setup.storage_b), peer=f"{setup.address_a}:{AGENT_PORT}")
    began = time.perf_counter()
    status, reply = agent_call(setup, setup.address_b, "POST", "/api/v1/models", request.to_json())
    if status != 202:
        raise RuntimeError(f"B refused the sync: {status} {reply}")
    while not published.exists():  # a stat every 2 ms: cheap, and exact to within that
        time.sleep(0.002)
        if time.perf_counter() - began > 600:
            raise RuntimeError("the sync did not finish within 10 minutes")
    elapsed = time.perf_counter() - began
    check_transfer_done(setup)
    return elapsed


def check_transfer_done(setup: Setup) -> None:
    _, state = agent_call(setup, setup.address_b, "GET", "/api/v1/state")
    transfer = next(t for t in state["transfers"] if t["model"] == MODEL)
    if transfer["state"] != "done" or transfer["bytesDone"] != setup.total_bytes:
        raise RuntimeError(f"the sync did not end well: {transfer}")


def remove_synced_copy(setup: Setup) -> None:
    status, reply = agent_call(setup, setup.address_b, "DELETE", f"/api/v1/models/{MODEL}")
    if status != 200:
        raise RuntimeError(f"could not delete B's copy: {status} {reply}")


# ----- the baselines -----


def ensure_rsync() -> bool:
    """Whether rsync is there, installing it with apt-get when it is not."""
    if shutil.which("rsync") is None:
        print("rsync is missing: installing it with apt-get ...", flush=True)
        install = ["apt-get", "install", "-y", "-q", "rsync"]
        if subprocess.run(install, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
            subprocess.run(install, capture_output=True, timeout=600)
    return shutil.which("rsync") is not None


def start_rsync_daemon(setup: Setup) -> None:
    config = setup.work / "rsyncd.conf"
    # As root the daemon would drop to "nobody", who cannot read our private temporary directory.
    options = "use chroot = no\nuid = root\ngid = root\n"
    config.write_text(f"{options}[model]\npath = {setup.storage_a / MODEL}\nread only = yes\n")
    argv = ["rsync", "--daemon", "--no-detach", f"--config={config}", f"--port={RSYNC_PORT}"]
    setup.bench.run(0, [*argv, f"--address={setup.address_a}"], "rsyncd")
    wait_for_port(setup.address_a, RSYNC_PORT)


def rsync_once(setup: Setup) -> float:
    """Seconds for rsync in B to copy the model's files from A's daemon (a fresh destination)."""
    dest = setup.work / "rsync-copy"
    source = f"rsync://{setup.address_a}:{RSYNC_PORT}/model/"
    argv = [ip_command() or "ip", "netns", "exec", setup.bench.hosts[1].netns, "rsync", "-a"]
    argv += [f"--exclude={METADATA_NAME}", source, f"{dest}/"]
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"rsync failed: {done.stderr.strip()}")
    check_copy(dest, setup.files)
    shutil.rmtree(dest)
    return elapsed


SENDER = """
import os, socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    connection, _ = server.accept()
    for path in sys.argv[3:]:
        with open(path, "rb") as f:
            size, offset = os.fstat(f.fileno()).st_size, 0
            while offset < size:
                offset += os.sendfile(connection.fileno(), f.fileno(), offset, size - offset)
    connection.close()
"""

RECEIVER = """
import socket, sys
connection = socket.create_connection((sys.argv[1], int(sys.argv[2])))
buffer = memoryview(bytearray(4 << 20))
for target, size in zip(sys.argv[3::2], sys.argv[4::2]):
    remaining = int(size)
    with open(target, "wb", buffering=0) as out:
        while remaining:
            n = connection.recv_into(buffer[: min(len(buffer), remaining)])
            if not n:
                sys.exit("the stream ended early")
            out.write(buffer[:n])
            remaining -= n
"""


def start_stream_sender(setup: Setup) -> None:
    paths = [str(setup.storage_a / MODEL / path) for path, _ in setup.files]
    setup.bench.run(0, [sys.executable, "-c", SENDER, setup.address_a, str(STREAM_PORT), *paths], "sender")
    wait_for_port(setup.address_a, STREAM_PORT)


def stream_once(setup: Setup) -> float:
    """Seconds for a plain byte stream over TCP to carry the files from A to disk in B."""
    dest = setup.work / "stream-copy"
    dest.mkdir()
    argv = [ip_command() or "ip", "netns", "exec", setup.bench.hosts[1].netns, sys.executable, "-c", RECEIVER]
    argv += [setup.address_a, str(STREAM_PORT)]
    for path, size in setup.files:
        argv += [str(dest / path), str(size)]
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"the stream failed: {done.stderr.strip()}")
    check_copy(dest, setup.files)
    shutil.rmtree(dest)
    return elapsed


def check_copy(dest: Path, files: tuple[tuple[str, int], ...]) -> None:
    for path, size in files:
        if (dest / path).stat().st_size != size:
            raise RuntimeError(f"the baseline copied {path} incompletely")


# ----- the run -----


def measure(rounds: int, runs: dict[str, Callable[[], float]], after_each: dict[str, Callable[[], None]]):
    """Alternate the contenders round by round, after one untimed warm-up round (the first copy
    into a fresh filesystem area is slower for everyone); each run starts with dirty pages flushed."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_number in range(rounds + 1):
        for name, run in runs.items():
            os.sync()
            elapsed = run()
            after_each.get(name, lambda: None)()
            label = f"round {round_number}" if round_number else "warm-up"
            print(f"  {label}: {name:<8} {elapsed:.3f} s", flush=True)
            if round_number:
                times[name].append(elapsed)
    return times


def report(setup: Setup, times: dict[str, list[float]], baseline: str) -> None:
    mb = setup.total_bytes / 1e6
    speeds = {name: mb / statistics.median(values) for name, values in times.items()}
    print()
    print(
        f"model: {len(setup.files)} files, {mb:.0f} MB; link: veth pair through a bridge (network namespaces)"
    )
    for name, label in (("ours", "ours (genmlx peer sync)"), (baseline, f"baseline ({baseline})")):
        print(f"{label + ':':<25}{speeds[name]:8.1f} MB/s  (median of {len(times[name])}, after a warm-up)")
    print(f"{'ratio ours/baseline:':<25}{speeds['ours'] / speeds[baseline]:8.2f}")
    print()
    print("ours is timed from the fetch request until the model is published: B computes the sha256 of")
    print("every byte as it arrives and publishes atomically. A had verified its files once when it first")
    print("listed them (before timing), as it does for any model it downloaded, synced or adopted.")
    if baseline == "rsync":
        print("rsync is timed as a whole process in B, copying the same files from an rsync daemon in A to a")
        print("fresh directory (a new destination, so it sends whole files; it checks each with its own")
        print("whole-file checksum).")
    else:
        print("the baseline is a bare TCP stream written to disk, with no checksum at all (rsync was")
        print("unavailable).")


def make_setup(bench: NetBench, work: Path, total_mb: int) -> Setup:
    storage_a, storage_b = work / "storage-a", work / "storage-b"
    storage_b.mkdir(parents=True)
    print(f"writing a {total_mb} MB model of random weights ...", flush=True)
    files = build_model(storage_a / MODEL, total_mb)
    token_path, _ = ensure_token(work / "home" / "token")
    hosts = bench.hosts
    return Setup(
        bench, work, storage_a, storage_b, read_token(token_path), hosts[0].address, hosts[1].address, files
    )


def close_quietly(bench: NetBench, show_logs: bool) -> None:
    """Tear the bench down; its processes' logs are shown only when something went wrong."""
    if show_logs:
        bench.close()
        return
    stdout = sys.stdout
    with open(os.devnull, "w") as quiet:
        sys.stdout = quiet
        try:
            bench.close()
        finally:
            sys.stdout = stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=300, help="model size in MB (default 300)")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each contender (default 5)")
    args = parser.parse_args()
    if os.geteuid() != 0 or ip_command() is None:
        sys.exit("this benchmark needs root and iproute2 (`ip`) to build its network namespaces")
    baseline = "rsync" if ensure_rsync() else "stream"
    work = Path(tempfile.mkdtemp(prefix="genmlx-sync-bench-"))
    bench = NetBench(2, work / "logs")
    succeeded = False
    try:
        setup = make_setup(bench, work, args.mb)
        start_agents(setup)
        status, _ = agent_call(setup, setup.address_a, "GET", f"/api/v1/models/{MODEL}/files")  # A adopts it
        if status != 200:
            raise RuntimeError(f"A does not list the model: {status}")
        if baseline == "rsync":
            start_rsync_daemon(setup)
        else:
            start_stream_sender(setup)
        baseline_run = rsync_once if baseline == "rsync" else stream_once
        print(
            f"syncing {setup.total_bytes / 1e6:.0f} MB from A to B, {args.rounds} rounds each ...", flush=True
        )
        times = measure(
            args.rounds,
            {"ours": lambda: sync_once(setup), baseline: lambda: baseline_run(setup)},
            {"ours": lambda: remove_synced_copy(setup)},
        )
        report(setup, times, baseline)
        succeeded = True
    finally:
        close_quietly(bench, show_logs=not succeeded)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
