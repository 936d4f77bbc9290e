"""The multi-host bench itself: hosts reach each other and the root namespace reaches them,
multicast crosses the bridge, and nothing is left behind, not even by a run that died."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import free_port, http_status, wait_until
from netbench import NetBench, base36, existing_names, ip, pid_alive

pytestmark = pytest.mark.e2e  # every test here starts real processes

# Joins the mDNS group on the host's own address and prints the first datagram and its sender.
RECEIVE_MULTICAST = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5353))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             socket.inet_aton("224.0.0.251") + socket.inet_aton(sys.argv[1]))
print("joined", flush=True)
s.settimeout(20)
data, sender = s.recvfrom(100)
print(data.decode(), sender[0], flush=True)
"""

SEND_MULTICAST = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sys.argv[1]))
for _ in range(30):
    s.sendto(b"hello-bench", ("224.0.0.251", 5353))
    time.sleep(0.1)
"""


def test_hosts_reach_each_other_and_the_test_process_reaches_them(netns_hosts):
    bench: NetBench = netns_hosts(2)
    server, client = bench.hosts
    assert server.address != client.address
    assert bench.subnet.prefixlen == 24 and bench.gateway == str(bench.subnet.network_address + 254)
    port = free_port()
    bench.run(server, [sys.executable, "-m", "http.server", "--bind", server.address, str(port)], "http")

    url = f"http://{server.address}:{port}/"
    wait_until(lambda: http_status(url) == 200, timeout=20, what="the root namespace to reach host 0")
    fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).status)"
    assert bench.exec(client, [sys.executable, "-c", fetch]).stdout.strip() == "200"
    # Loopback is up in every host, and each host's loopback is its own.
    loopback = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); print('ok')"
    assert bench.exec(client, [sys.executable, "-c", loopback]).stdout.strip() == "ok"
    assert bench.exec(client, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout.count("inet ") == 1


def test_multicast_crosses_the_bridge(netns_hosts):
    bench: NetBench = netns_hosts(2)
    sender, receiver = bench.hosts
    listening = bench.run(receiver, [sys.executable, "-c", RECEIVE_MULTICAST, receiver.address], "receiver")
    wait_until(lambda: "joined" in listening.output(), timeout=20, what="the receiver to join the group")

    bench.exec(sender, [sys.executable, "-c", SEND_MULTICAST, sender.address])

    assert listening.popen.wait(timeout=20) == 0
    assert f"hello-bench {sender.address}" in listening.output()


def test_close_removes_everything_and_kills_orphans(netns_hosts):
    bench: NetBench = netns_hosts(2)
    # The shell forks a sleep, then becomes another: stopping it leaves the first one orphaned.
    parent = bench.run(1, ["sh", "-c", "sleep 600 & echo $!; exec sleep 600"], "orphan-maker")
    orphan = int(wait_until(lambda: parent.output().strip(), timeout=10, what="the orphan's pid"))
    assert len(bench.names()) == 2 * 2 + 1  # two namespaces, two veths, the bridge

    bench.close()

    assert bench.names() == set()
    assert not any(name.startswith(bench.prefix) for name in existing_names())
    wait_until(lambda: not pid_alive(orphan), timeout=10, what="the orphan to be gone")


def test_a_new_bench_sweeps_what_a_dead_run_left_but_not_a_live_one(netns_hosts):
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = f"gx{base36(gone.pid, 5)}00"  # what a killed run would have left
    live = f"gx{base36(os.getpid(), 5)}zz"  # named after us, and we are alive
    ip("netns", "add", f"{dead}h0")
    ip("link", "add", f"{dead}br", "type", "bridge")
    ip("link", "add", f"{live}br", "type", "bridge")
    try:
        netns_hosts(1)
        names = set(existing_names())
        assert f"{dead}h0" not in names and f"{dead}br" not in names
        assert f"{live}br" in names
    finally:
        ip("link", "delete", f"{live}br", check=False)
        ip("link", "delete", f"{dead}br", check=False)
        ip("netns", "delete", f"{dead}h0", check=False)
