"""A multi-host test bench: N hosts as Linux network namespaces joined by a bridge.

Each host is a network namespace with loopback up and one veth (``eth0``) into a bridge in the
root namespace. Hosts get ``.1``, ``.2``, ... of a /24 in 10.0.0.0/8 that nothing on this
machine routes, the bridge gets ``.254``: the hosts reach each other, multicast (mDNS)
included, and the test process reaches every host over HTTP. Nothing is routed beyond the
bridge, so what runs in a host cannot reach the machine's real network.

Every name a bench creates starts with ``gx<pid><n>`` (pid and bench number in base 36), so
parallel runs never clash, and everything is removed by ``close()``, at interpreter exit, and,
for a run that died without either, by the sweep every new bench starts with.

Needs root and iproute2 (``ip``); ``skip_unless_netns_possible`` says so clearly.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from conftest import Proc, skip_or_fail

# gx + pid (5 base-36 digits) + bench number (2) + what: br (bridge), h<i> (host), v<i> (its veth)
BENCH_NAME = re.compile(r"^gx([0-9a-z]{5})([0-9a-z]{2})(br|h\d+|v\d+)$")
MAX_HOSTS = 200
DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
LOCK_FILE = Path(tempfile.gettempdir()) / "genmlx-netbench.lock"
_bench_numbers = itertools.count()
_open_benches: list[NetBench] = []


@dataclass(frozen=True)
class Host:
    """One host of the bench."""

    index: int
    netns: str  # its network namespace
    address: str  # its IPv4 address on the bridge
    veth: str  # its veth end in the root namespace, a port of the bridge


class NetBench:
    """``n`` hosts on a fresh bridge; ``run()`` starts processes in them, ``close()`` removes all."""

    def __init__(self, n: int, log_dir: Path):
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"a bench has 1 to {MAX_HOSTS} hosts, not {n}")
        sweep_dead_benches()
        self.prefix = f"gx{base36(os.getpid(), 5)}{base36(next(_bench_numbers) % 36**2, 2)}"
        self.bridge = f"{self.prefix}br"
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.hosts: tuple[Host, ...] = ()
        self._closed = False
        log_dir.mkdir(parents=True, exist_ok=True)
        _open_benches.append(self)
        try:
            self.subnet = self._create_bridge()
            self.gateway = str(self.subnet.network_address + 254)
            self.hosts = tuple(self._create_host(i) for i in range(n))
        except BaseException:
            with contextlib.suppress(RuntimeError):  # the error that stopped us matters more
                self.close()
            raise

    def run(self, host: int | Host, argv: list[str], name: str = "proc", env: dict[str, str] | None = None):
        """Start ``argv`` inside ``host``; it is stopped, and its output printed, at ``close()``.

        Processes get ``GENMLX_DISCOVERY=on`` unless ``env`` says otherwise: multicast from a
        host never leaves the bench.
        """
        netns = self.host(host).netns
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "GENMLX_DISCOVERY": "on", **(env or {})}
        log_path = self.log_dir / f"{name}.{len(self.procs)}.log"
        proc = Proc([ip_command() or "ip", "netns", "exec", netns, *argv], log_path, full_env)
        self.procs.append(proc)
        return proc

    def exec(self, host: int | Host, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a short command inside ``host`` to completion; its output is captured as text."""
        netns = self.host(host).netns
        return subprocess.run(
            [ip_command() or "ip", "netns", "exec", netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def host(self, host: int | Host) -> Host:
        return host if isinstance(host, Host) else self.hosts[host]

    def names(self) -> set[str]:
        """Every namespace and link of this bench that exists right now."""
        return {name for name in existing_names() if name.startswith(self.prefix)}

    def cable(self, a: int, b: int, interface: str, addresses: tuple[str, str] | None = None) -> None:
        """A point-to-point link between hosts ``a`` and ``b``, as a Thunderbolt cable between two
        Macs is: a veth pair with one end, named ``interface``, in each host, up, and each end
        given its address (``"192.168.200.1/30"``) where ``addresses`` says. It lives inside the
        two namespaces, so it goes with them."""
        one, other = self.host(a).netns, self.host(b).netns
        ip("link", "add", interface, "netns", one, "type", "veth", "peer", "name", interface, "netns", other)
        for netns, address in zip((one, other), addresses or (None, None), strict=True):
            if address:
                ip("-n", netns, "addr", "add", address, "dev", interface)
            ip("-n", netns, "link", "set", interface, "up")

    def set_link(self, host: int, interface: str, up: bool) -> None:
        """Take one end of a cable down (as pulling it out would) or bring it back up."""
        ip("-n", self.host(host).netns, "link", "set", interface, "up" if up else "down")

    def partition(self, a: int, b: int, cut: bool = True) -> None:
        """Drop every packet between hosts ``a`` and ``b`` (both ways, in both namespaces, with
        iptables), as a switch that stops forwarding between them would; ``cut=False`` heals it."""
        action = "-A" if cut else "-D"
        for host, other in ((a, b), (b, a)):
            peer = self.host(other).address
            for rule in (["INPUT", "-s", peer], ["OUTPUT", "-d", peer]):
                done = self.exec(host, ["iptables", action, *rule, "-j", "DROP"])
                if done.returncode != 0:
                    raise RuntimeError(f"iptables on host {host}: {done.stderr.strip()}")

    def shape(self, host: int, interface: str, rate: str | None, burst: str = "1mb") -> None:
        """Limit what ``interface`` of ``host`` sends to ``rate`` ("1gbit", tc's units) with a token
        bucket of ``burst`` bytes, as a slower link would; None takes the limit away."""
        qdisc = ["tc", "qdisc", "{}", "dev", interface, "root"]
        self.exec(host, [part.format("del") for part in qdisc])  # none there yet is fine
        if rate is None:
            return
        bucket = ["tbf", "rate", rate, "burst", burst, "latency", "50ms"]
        done = self.exec(host, [*(part.format("add") for part in qdisc), *bucket])
        if done.returncode != 0:
            raise RuntimeError(f"tc could not shape {interface} of host {host}: {done.stderr.strip()}")

    def close(self) -> None:
        """Stop every process (printing its output), kill what is left in the hosts, then remove
        the namespaces, the veths and the bridge. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self.procs):
            proc.stop()
            print(f"----- {' '.join(proc.args[4:])} (in {proc.args[3]}) -----\n{proc.output()}")
        remove_bench(self.prefix)
        with contextlib.suppress(ValueError):
            _open_benches.remove(self)
        left = self.names()
        if left:
            raise RuntimeError(f"the bench {self.prefix} left {sorted(left)} behind")

    def _create_bridge(self) -> ipaddress.IPv4Network:
        # The lock keeps two benches starting at once from choosing the same free subnet.
        with open(LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            subnet = free_subnet(zlib.crc32(self.prefix.encode()))
            # No multicast snooping: the bridge floods multicast to every port, as a plain switch would.
            ip("link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0")
            ip("addr", "add", f"{subnet.network_address + 254}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        return subnet

    def _create_host(self, index: int) -> Host:
        host = Host(
            index=index,
            netns=f"{self.prefix}h{index}",
            address=str(self.subnet.network_address + index + 1),
            veth=f"{self.prefix}v{index}",
        )
        ip("netns", "add", host.netns)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        ip("link", "set", host.veth, "master", self.bridge, "up")
        ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.netns, "link", "set", "eth0", "up")
        ip("-n", host.netns, "link", "set", "lo", "up")
        return host


def skip_unless_netns_possible() -> None:
    """Skip (fail where ``CI`` is set, since CI must run these) unless we can make namespaces."""
    problem = None
    if not sys.platform.startswith("linux"):
        problem = "network namespaces need Linux"
    elif os.geteuid() != 0:
        problem = "network namespaces need root: run the tests as root (CI does)"
    elif ip_command() is None:
        problem = "network namespaces need iproute2's `ip`: `make test` installs it (apt-get) as root"
    skip_or_fail(problem, "multi-host bench")


def ip_command() -> str | None:
    """iproute2's ``ip``: on PATH, or in sbin where a non-login root shell may not look."""
    return shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None
    )


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; raise with its stderr when it fails and ``check`` is set."""
    done = subprocess.run([ip_command() or "ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def ip_json(*args: str) -> list[dict]:
    out = ip("-j", *args).strip()
    return json.loads(out) if out else []


def base36(value: int, width: int) -> str:
    digits = ""
    while value:
        value, digit = divmod(value, 36)
        digits = DIGITS[digit] + digits
    return digits.rjust(width, "0")[-width:]


def free_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /24 in 10.64.0.0 - 10.191.255.0 that overlaps no route or address on this machine."""
    used = routed_networks()
    candidates = 128 * 256
    for step in range(candidates):
        n = (seed + step) % candidates
        subnet = ipaddress.IPv4Network(f"10.{64 + n // 256}.{n % 256}.0/24")
        if not any(subnet.overlaps(network) for network in used):
            return subnet
    raise RuntimeError("no free /24 left in 10.64.0.0/10 for a test bench")


def routed_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network a route of any table points at (connected networks and addresses too)."""
    networks = []
    for route in ip_json("-4", "route", "show", "table", "all"):
        with contextlib.suppress(ValueError):
            if route.get("dst", "default") != "default":
                networks.append(ipaddress.IPv4Network(route["dst"], strict=False))
    return networks


def existing_names() -> Iterator[str]:
    """Names of every network namespace and link, for matching against ``BENCH_NAME``."""
    for netns in ip_json("netns", "list"):
        yield netns["name"]
    for link in ip_json("link", "show"):
        yield link["ifname"]


def sweep_dead_benches() -> None:
    """Remove whatever benches of processes that no longer exist left behind (a killed run)."""
    dead = set()
    for name in existing_names():
        match = BENCH_NAME.match(name)
        if match and not pid_alive(int(match.group(1), 36)):
            dead.add(name[: len("gx") + 7])
    for prefix in sorted(dead):
        print(f"netbench: removing {prefix}*, left behind by a run that no longer exists")
        remove_bench(prefix)


def remove_bench(prefix: str) -> None:
    """Kill every process in the bench's namespaces, then delete its veths, namespaces and bridge."""
    names = [name for name in existing_names() if name.startswith(prefix) and BENCH_NAME.match(name)]
    namespaces = [name for name in names if BENCH_NAME.match(name).group(3).startswith("h")]
    for netns in namespaces:
        kill_everything_in(netns)
    # Links first: deleting a veth removes its peer at once, where a deleted namespace's
    # interfaces go away only when the kernel gets round to it.
    for link in (name for name in names if name not in namespaces):
        ip("link", "delete", link, check=False)
    for netns in namespaces:
        ip("netns", "delete", netns, check=False)


def kill_everything_in(netns: str, timeout: float = 10.0) -> None:
    """SIGKILL the processes left in a namespace (children our processes did not stop)."""
    pids = [int(p) for p in ip("netns", "pids", netns, check=False).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [int(p) for p in ip("netns", "pids", netns, check=False).split()]
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: a killed run's parent may never reap it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def close_open_benches() -> None:
    for bench in list(_open_benches):
        with contextlib.suppress(Exception):
            bench.close()


def interrupt_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


atexit.register(close_open_benches)
# A SIGTERMed test run should tear its benches down too: as Ctrl-C does, through the finalizers.
if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
