"""Link probe bandwidth: what an agent's link check measures against a plain TCP stream over the same
link, in the same run.

    sudo python benchmarks/link_probe.py [--mb 256] [--rounds 5] [--rates 1gbit,10gbit,none]

Two hosts of a network-namespace bench (``tests/netbench.py``) joined, as two Macs are by a
Thunderbolt cable, by a point-to-point veth pair ``en2`` with a /30 of the mesh plan on it; each runs
a real agent. Ours: host A's agent is asked to check its end (``POST /api/v1/links/check``), which
reads ``--mb`` of zeros from host B's agent probe (``GET /api/v1/links/probe``, signed) and reports
Gbit/s. The baseline: a plain TCP stream of the same bytes from a socket server in B to a client in
A over the same link (``sendall`` of 1 MiB buffers, ``recv_into`` one buffer), no HTTP, no signing.
Both time from the first bytes received to the last, and count what came after the first read.

Each ``--rates`` entry shapes both ends of the link with ``tc``'s token bucket (``none``: as fast as
two namespaces on this machine go, where the CPU, not the link, is the limit). Rounds alternate
between the two; the medians are compared. Needs root and iproute2 (``ip``, ``tc``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # netbench and conftest live with the tests

from netbench import NetBench, ip_command  # noqa: E402

from genmlx.core.home import ensure_token, read_token  # noqa: E402
from genmlx.core.signing import Keys, signed_headers  # noqa: E402

AGENT_PORT = 6790
STREAM_PORT = 8732
LOCAL, PEER = "192.168.200.1", "192.168.200.2"

SERVER = """
import socket, sys
total = int(sys.argv[1])
listener = socket.create_server((sys.argv[2], int(sys.argv[3])))
print("listening", flush=True)
chunk = bytes(1 << 20)
while True:
    connection, _ = listener.accept()
    sent = 0
    while sent < total:
        size = min(len(chunk), total - sent)
        connection.sendall(chunk[:size] if size < len(chunk) else chunk)
        sent += size
    connection.close()
"""

CLIENT = """
import socket, sys, time
total, local, peer, port = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
connection = socket.create_connection((peer, port), source_address=(local, 0))
buffer = bytearray(1 << 20)
received = connection.recv_into(buffer)
first = last = time.perf_counter()
moved = 0
while True:
    count = connection.recv_into(buffer)
    if not count:
        break
    moved += count
    last = time.perf_counter()
print(moved * 8 / (last - first) / 1e9)
"""


def signed_post(url: str, token: str, body: dict) -> dict:
    data = json.dumps(body).encode()
    headers, _ = signed_headers(Keys.of(token), "POST", url, data)
    request = urllib.request.Request(url, data=data, method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_for_agent(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"no agent answers at {url}")


def probe_round(agent_a: str, token: str, total: int) -> float:
    request = {
        "localAddress": LOCAL,
        "peerAddress": PEER,
        "peerPort": AGENT_PORT,
        "interface": "en2",
        "probeBytes": total,
        "probeSeconds": 10,
    }
    check = signed_post(f"{agent_a}/api/v1/links/check", token, request)
    if not check["up"] or check.get("gbitS") is None:
        raise RuntimeError(f"the link check failed: {check}")
    return check["gbitS"]


def stream_round(bench: NetBench, total: int) -> float:
    done = bench.exec(
        0, [sys.executable, "-c", CLIENT, str(total), LOCAL, PEER, str(STREAM_PORT)], timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"the stream client failed: {done.stderr}")
    return float(done.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="bytes each round moves, in MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rates", default="1gbit,10gbit,none", help="tc rates to shape the link to, or none")
    args = parser.parse_args()
    if ip_command() is None:
        print("needs iproute2 (ip, tc) and root", file=sys.stderr)
        return 2
    total = args.mb << 20
    with tempfile.TemporaryDirectory(prefix="genmlx-link-probe-") as work:
        root = Path(work)
        bench = NetBench(2, root / "logs")
        try:
            bench.cable(0, 1, "en2", (f"{LOCAL}/30", f"{PEER}/30"))
            token = read_token(ensure_token(root / "token")[0])
            for host, name in enumerate("ab"):
                home = root / name
                (home / "models").mkdir(parents=True)
                (home / "token").write_text(token + "\n")
                env = {"GENMLX_HOME": str(home), "GENMLX_DISCOVERY": "off"}
                argv = [
                    sys.executable,
                    "-m",
                    "genmlx",
                    "agent",
                    "--name",
                    name,
                    "--storage",
                    str(home / "models"),
                ]
                bench.run(host, argv, f"agent-{name}", env)
            bench.run(1, [sys.executable, "-c", SERVER, str(total), PEER, str(STREAM_PORT)], "stream-server")
            agent_a = f"http://{bench.host(0).address}:{AGENT_PORT}"
            wait_for_agent(agent_a)
            wait_for_agent(f"http://{bench.host(1).address}:{AGENT_PORT}")
            print(f"{args.mb} MiB per round, {args.rounds} rounds each, medians in Gbit/s")
            print(f"{'link':>8}  {'probe':>8}  {'tcp':>8}  probe/tcp")
            for rate in args.rates.split(","):
                for host in (0, 1):
                    bench.shape(host, "en2", None if rate == "none" else rate)
                probe, stream = [], []
                for _ in range(args.rounds):
                    probe.append(probe_round(agent_a, token, total))
                    stream.append(stream_round(bench, total))
                ours, theirs = statistics.median(probe), statistics.median(stream)
                print(f"{rate:>8}  {ours:8.3f}  {theirs:8.3f}  {ours / theirs:.2f}")
        finally:
            bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
