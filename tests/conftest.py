"""Shared fixtures: free ports, a GENMLX_HOME with a token, the demo model, and real
subprocesses that are always stopped (and their output shown) when a test ends."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from genmlx.core.signing import Keys, signed_headers

# No test may multicast onto the machine's real network: zeroconf stays off unless a test turns
# it back on (the network-namespace bench does, for the processes it starts in its hosts).
os.environ.setdefault("GENMLX_DISCOVERY", "off")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Under ``pytest -n`` (pytest-xdist) tests share the machine with those other test processes
    run, except one marked ``alone``, which waits for the others' tests to end and holds theirs back
    while it runs, fixtures set up and torn down included: a lock each test takes, shared, or for
    an ``alone`` one exclusive, entered through a turnstile so that a waiting ``alone`` test is not
    overtaken by tests that start after it asked."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every process of one run
    if run is None:  # one process: nothing runs beside a test
        yield
        return
    alone = item.get_closest_marker("alone") is not None
    locks = Path(tempfile.gettempdir()) / f"genmlx-tests-{run}"
    with open(f"{locks}.turnstile", "a") as turnstile, open(f"{locks}.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distinct_free_ports(count: int) -> list[int]:
    """``count`` different loopback ports that nothing listens on right now (``free_port`` called
    twice may give the same one back, as the first is closed before the second is asked for)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that nothing listens on right now: where
    a test puts the ports a master counts up from (``serving.port``, ``mesh.port``)."""
    for _ in range(50):
        base = free_port()
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    stack.enter_context(socket.create_server(("127.0.0.1", port)))
            except OSError:
                continue
        return base
    pytest.fail(f"no {count} consecutive free ports")


class ServingPorts:
    """Free HTTP ports for the models a test's manifests serve, so suites running at once on one
    machine never meet: each model name gets its ``serving.port`` once (a range as long as its
    node list, for ranks sharing the host) and keeps it in every manifest after, as a real
    cluster's file would."""

    def __init__(self) -> None:
        self._ports: dict[str, int] = {}

    def set_in(self, models: str) -> str:
        """``models``, the entries of ``spec.models`` as YAML, one per line, with each entry's
        ``serving.port`` set."""
        entries = yaml.safe_load(models) or []
        if not entries:
            return models  # "    []": nothing to serve
        return "".join(f"    - {json.dumps(self._with_port(entry))}\n" for entry in entries)

    def _with_port(self, entry: dict) -> dict:
        nodes = entry.get("nodes")
        port = self._ports.setdefault(entry["name"], free_ports(len(nodes) if isinstance(nodes, list) else 8))
        return {**entry, "serving": {**entry.get("serving", {}), "port": port}}


def signed(token: str, method: str, url: str, body: bytes | None = None) -> dict[str, str]:
    """The headers of a request signed with ``token``'s key, as GenMLX's own processes sign (agents
    take nothing else; masters and dispatchers take these too)."""
    return signed_headers(Keys.of(token), method, url, body)[0]


def http_status(url: str, token: str | None = None, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    request = urllib.request.Request(url, headers=signed(token, "GET", url) if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


class Proc:
    """A real child process whose combined output goes to a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop(), after the process ends
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._log.close()
        return self.popen.returncode


@pytest.fixture
def genmlx_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated GENMLX_HOME with a token, also exported to child processes."""
    from genmlx.core.home import ensure_token

    home = tmp_path / "genmlx-home"
    monkeypatch.setenv("GENMLX_HOME", str(home))
    ensure_token()
    return home


@pytest.fixture
def token(genmlx_home: Path) -> str:
    from genmlx.core.home import read_token

    return read_token()


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random-weight llama written once per test session."""
    from genmlx.demo.random_model import write_demo_model

    path = tmp_path_factory.mktemp("models") / "demo-llama"
    write_demo_model(path)
    return path


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """Start ``python -m genmlx ...``-style commands; every one is stopped at teardown and its
    output printed, so a failing test shows what the processes said."""
    procs: list[Proc] = []

    def start(args: list[str], name: str, env: dict[str, str] | None = None) -> Proc:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = Proc([sys.executable, *args], tmp_path / f"{name}.{len(procs)}.log", full_env)
        procs.append(proc)
        return proc

    yield start
    for proc in reversed(procs):
        proc.stop()
        print(f"----- {' '.join(proc.args[1:])} -----\n{proc.output()}")


@pytest.fixture
def netns_hosts(tmp_path: Path) -> Iterator:
    """``netns_hosts(n)`` makes a ``netbench.NetBench`` of ``n`` hosts (network namespaces on a
    bridge), removed with everything running in it when the test ends. Skips without root or
    iproute2, except where ``CI`` is set: there it fails."""
    from netbench import NetBench, skip_unless_netns_possible

    benches: list[NetBench] = []

    def create(n: int) -> NetBench:
        skip_unless_netns_possible()
        benches.append(NetBench(n, tmp_path / f"bench{len(benches)}"))
        return benches[-1]

    yield create
    for bench in reversed(benches):
        bench.close()


def skip_or_fail(problem: str | None, what: str) -> None:
    """Skip a test that cannot run on this machine because of ``problem``, or fail it where ``CI``
    is set: CI must run everything. ``what`` names the tests, for the message."""
    if problem is None:
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"the {what} cannot run here: {problem}")
    pytest.skip(f"{what}: {problem}")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory):
    """A dispatcher on the scripted model that writes ``TOOL_REPLY`` (thinking, then a tool call)."""
    from dispatcher_process import served_model
    from test_scripted_model import TOOL_REPLY

    from genmlx.demo.scripted_model import write_scripted_model

    models = tmp_path_factory.mktemp("models")
    path = write_scripted_model(models / "scripted", TOOL_REPLY)
    with served_model(path, "scripted", models) as served:
        yield served


@pytest.fixture(scope="module")
def demo(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A dispatcher on the demo model, shared by one test module."""
    from dispatcher_process import served_model

    with served_model(demo_model_dir, "demo-llama", tmp_path_factory.mktemp("logs")) as served:
        yield served
