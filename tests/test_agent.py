"""The node agent, run for real: ``python -m genmlx agent`` on loopback, real dispatcher ranks on the
demo model, real signals. Only the SIGKILL-after-grace test substitutes the rank's program (a tiny
Python script that ignores SIGTERM), because the real dispatcher stops when asked."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from agent_harness import Reply
from agent_harness import call as harness_call
from conftest import free_port, http_status, wait_until

import genmlx
from genmlx.agent.ranks.environment import rank_environment
from genmlx.agent.ranks.logs import (
    KEPT_RUNS,
    LOG_CAP_BYTES,
    LOG_KEEP_BYTES,
    open_new_run_log,
    trim_log,
    write_hostfile,
)
from genmlx.agent.ranks.supervisor import RankSupervisor, dispatcher_command
from genmlx.core.signing import REPLY_HEADER, Keys, check_reply, sign_request, signed_headers
from genmlx.wire.agent_state import AgentState, RankInfo
from genmlx.wire.rank_launch import RankLaunch
from genmlx.wire.serving import ServingSettings

pytestmark = pytest.mark.timeout(120)


def call(method: str, url: str, authorization: str | None = None, body: Any = None) -> Reply:
    """One real HTTP request with exactly the ``Authorization`` header given (or none)."""
    return harness_call(method, url, None, body, {"Authorization": authorization} if authorization else None)


@dataclass(frozen=True)
class AgentUnderTest:
    url: str
    proc: Any  # conftest.Proc
    token: str
    storage: Path
    outside: Path
    home: Path  # $HOME of the agent, so that ``~`` in a storage path is checkable

    def call(self, method: str, path: str, body: Any = None) -> Reply:
        return harness_call(method, self.url + path, self.token, body)

    def state(self) -> AgentState:
        reply = self.call("GET", "/api/v1/state")
        assert reply.status == 200, reply.body
        return AgentState.from_json(reply.json())

    def rank(self, model: str, rank: int) -> RankInfo | None:
        found = [r for r in self.state().ranks if (r.launch.model, r.launch.rank) == (model, rank)]
        return found[0] if found else None

    def start_rank(self, launch: RankLaunch) -> RankInfo:
        reply = self.call("POST", "/api/v1/ranks", launch.to_json())
        assert reply.status == 201, reply.body
        return RankInfo.from_json(reply.json())


@pytest.fixture
def storage(tmp_path: Path, demo_model_dir: Path) -> Path:
    """A storage path holding a copy of the demo model, a partial model and a symlink leading out."""
    root = tmp_path / "storage"
    shutil.copytree(demo_model_dir, root / "demo-llama")
    (root / "partial-model").mkdir()
    (root / "partial-model" / "config.json").write_text("{}")
    outside = tmp_path / "outside"
    shutil.copytree(demo_model_dir, outside / "stolen")
    (outside / "big.bin").write_bytes(b"x" * 100_000)
    (root / "escape").symlink_to(outside / "stolen")
    # A file link inside a model: its target must not count toward the model's size.
    (root / "demo-llama" / "notes.bin").symlink_to(outside / "big.bin")
    return root


@pytest.fixture
def agent(spawn, token: str, storage: Path, tmp_path: Path) -> AgentUnderTest:
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    args = ["-m", "genmlx", "agent", "--name", "node-a", "--storage", str(storage)]
    args += ["--storage", "~/not-there", "--port", str(port), "--host", "127.0.0.1"]
    proc = spawn(args, "agent", env={"HOME": str(home)})
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_status(url + "/healthz") == 200, timeout=30, what="the agent to answer")
    return AgentUnderTest(url, proc, token, storage, tmp_path / "outside", home)


def demo_launch(agent: AgentUnderTest, **changes: Any) -> RankLaunch:
    launch = RankLaunch(
        model="demo",
        model_path=str(agent.storage / "demo-llama"),
        rank=0,
        world_size=1,
        port=free_port(),
        spec_hash="spec-1",
        serving=ServingSettings(max_batch=2, max_queue=4, context_length=512),
    )
    return replace(launch, **changes)


def process_gone(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (an orphan's reaper is outside our control)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.e2e
def test_healthz_needs_no_token_and_reveals_nothing(agent: AgentUnderTest):
    reply = call("GET", agent.url + "/healthz")
    assert reply.status == 200
    assert reply.json() == {"status": "ok"}
    assert "Server" not in reply.headers


AUTHENTICATED = [
    ("GET", "/api/v1/state", None),
    ("POST", "/api/v1/ranks", {"model": "demo"}),
    ("DELETE", "/api/v1/ranks/demo/0", None),
    ("GET", "/api/v1/ranks/demo/0/log", None),
    ("GET", "/api/v1/no-such-endpoint", None),
]


@pytest.mark.e2e
def test_every_other_endpoint_refuses_a_missing_or_wrong_token(agent: AgentUnderTest):
    wrong = [None, "Bearer wrong-token", f"Bearer {agent.token}", f"Basic {agent.token}", agent.token]
    for method, path, body in AUTHENTICATED:
        for authorization in wrong:
            reply = call(method, agent.url + path, authorization, body)
            assert reply.status == 401, (method, path, authorization is None)
            assert reply.headers["WWW-Authenticate"] == "GenMLX-HMAC-SHA256"
            assert reply.json()["error"]["type"] == "AuthError"
    assert agent.call("GET", "/api/v1/state").status == 200
    assert agent.call("GET", "/api/v1/no-such-endpoint").status == 404
    assert agent.token not in agent.proc.output()


@pytest.mark.e2e
def test_a_signed_request_is_good_once_and_its_reply_is_signed_over_its_body(agent: AgentUnderTest):
    """Over real HTTP: the agent signs its answer to the request's nonce; the same request again
    (a replay), one with its body changed, one signed long ago and one addressed to another
    machine's IP (relayed by whoever received it) are each refused with why."""
    keys = Keys.of(agent.token)
    body = json.dumps({"model": "m", "rank": 0}).encode()  # not a whole launch: a 400
    url = agent.url + "/api/v1/ranks"
    headers, nonce = signed_headers(keys, "POST", url, body)
    first = harness_call("POST", url, None, body, headers)
    assert first.status == 400  # signed and accepted, then refused for what it asks
    check_reply(keys, nonce, 400, first.headers[REPLY_HEADER], first.body)
    stale = sign_request(keys, "POST", agent.url[7:], "/api/v1/ranks", body, now=time.time() - 3600)
    refusals = {
        "a replay": (headers, body),
        "a changed body": (signed_headers(keys, "POST", url, body)[0], body.replace(b'"m"', b'"n"')),
        "a stale signature": ({"Authorization": stale.header()}, body),
        "another machine's address": (
            signed_headers(keys, "POST", "http://10.9.9.9:6790/api/v1/ranks", body)[0],
            body,
        ),
    }
    whys = {}
    for what, (sent_headers, sent_body) in refusals.items():
        reply = harness_call("POST", url, None, sent_body, sent_headers)
        assert reply.status == 401, what
        assert REPLY_HEADER not in reply.headers, what
        whys[what] = reply.json()["error"]["message"]
    assert "already received once" in whys["a replay"]
    assert "does not match" in whys["a changed body"]
    assert "clock" in whys["a stale signature"]
    assert "not this machine" in whys["another machine's address"]


@pytest.mark.e2e
def test_state_reports_facts_storage_and_models(agent: AgentUnderTest, storage: Path):
    state = agent.state()
    assert (state.name, state.version) == ("node-a", genmlx.__version__)
    facts = state.facts
    assert facts.hostname == socket.gethostname()
    assert facts.os == f"{platform.system()} {platform.release()}"
    assert facts.arch == platform.machine()
    assert facts.cpu_count == psutil.cpu_count()
    assert facts.memory_total == psutil.virtual_memory().total
    assert 0 < facts.memory_available <= facts.memory_total
    assert facts.os_version, "facts beyond the basics are filled in (tests/test_facts.py checks them)"
    (loopback,) = [i for i in facts.interfaces if i.kind == "loopback"]
    assert "127.0.0.1" in loopback.addresses

    present, missing = state.storage
    assert (present.path, present.exists) == (str(storage), True)
    assert 0 < present.free_bytes <= present.total_bytes
    assert (missing.path, missing.exists, missing.models) == (str(agent.home / "not-there"), False, ())
    models = {m.name: m for m in present.models}
    assert set(models) == {"demo-llama", "partial-model"}, "a symlinked directory is not a model"
    demo = models["demo-llama"]
    regular_files = [p for p in (storage / "demo-llama").iterdir() if p.is_file() and not p.is_symlink()]
    assert demo.size_bytes == sum(p.stat().st_size for p in regular_files)
    assert (demo.path, demo.complete) == (str(storage / "demo-llama"), True)
    assert models["partial-model"].complete is False
    assert state.ranks == ()


@pytest.mark.e2e
def test_launch_refuses_invalid_bodies_and_paths_outside_storage(agent: AgentUnderTest, storage: Path):
    good = demo_launch(agent).to_json()
    refused = [
        (b"{not json", "body", "InvalidLaunch"),
        ({k: v for k, v in good.items() if k != "modelPath"}, "modelPath", "InvalidLaunch"),
        ({**good, "rank": "0"}, "rank", "InvalidLaunch"),
        ({**good, "rank": 1}, "rank", "InvalidLaunch"),
        ({**good, "port": 70000}, "port", "InvalidLaunch"),
        ({**good, "model": "../evil"}, "model", "InvalidLaunch"),
        ({**good, "hostfile": ["10.0.0.1:1", "10.0.0.2:2"]}, "hostfile", "InvalidLaunch"),
        ({**good, "surprise": 1}, "surprise", "InvalidLaunch"),
        ({**good, "modelPath": "demo-llama"}, "modelPath", "ModelPathRefused"),
        ({**good, "modelPath": f"{storage}/../outside/stolen"}, "modelPath", "ModelPathRefused"),
        ({**good, "modelPath": str(agent.outside / "stolen")}, "modelPath", "ModelPathRefused"),
        ({**good, "modelPath": str(storage / "escape")}, "modelPath", "ModelPathRefused"),
        ({**good, "modelPath": str(storage)}, "modelPath", "ModelPathRefused"),
        ({**good, "modelPath": str(storage / "partial-model")}, "modelPath", "ModelNotFound"),
        ({**good, "modelPath": str(storage / "absent")}, "modelPath", "ModelNotFound"),
    ]
    for body, field, kind in refused:
        reply = agent.call("POST", "/api/v1/ranks", body)
        assert reply.status == 400, (field, reply.body)
        error = reply.json()["error"]
        assert error["message"].startswith(field + ":"), error
        assert error["type"] == kind, error
    assert agent.state().ranks == (), "a refused launch starts nothing"
    assert agent.call("GET", "/api/v1/ranks/demo/0/log?tail=x").status == 404
    assert agent.call("DELETE", "/api/v1/ranks/demo/0").status == 404


@pytest.mark.e2e
def test_rank_lifecycle_start_serve_log_stop(agent: AgentUnderTest, genmlx_home: Path):
    launch = demo_launch(agent)
    started = agent.start_rank(launch)
    assert (started.launch, started.state, started.exit_code) == (launch, "running", None)

    dispatcher = psutil.Process(started.pid)
    # Between fork and exec the child still shows the agent's command line.
    argv = wait_until(lambda: "genmlx.dispatcher" in (cmd := dispatcher.cmdline()) and cmd, 10, what="exec")
    assert agent.token not in " ".join(argv), "the token travels in the environment, never in argv"
    assert argv[argv.index("--parent-pid") + 1] == str(agent.proc.pid)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--model") + 1] == str((agent.storage / "demo-llama").resolve())
    assert dispatcher.environ()["GENMLX_API_TOKEN"] == agent.token
    assert os.getpgid(started.pid) == started.pid, "each rank leads its own process group"

    health = f"http://127.0.0.1:{launch.port}/health"
    wait_until(lambda: http_status(health) == 200, timeout=60, what="the rank to load the demo model")
    wait_until(lambda: agent.rank("demo", 0).phase == "ready", timeout=5, what="the agent to see it ready")
    duplicate = agent.call("POST", "/api/v1/ranks", launch.to_json())
    assert duplicate.status == 409 and duplicate.json()["error"]["type"] == "RankAlreadyRunning"
    listed = wait_until(
        lambda: agent.rank("demo", 0).prompt_cache and agent.rank("demo", 0), 5, what="figures"
    )
    assert listed == replace(started, phase="ready", prompt_cache=listed.prompt_cache), "listed as ready"
    (memory,) = listed.prompt_cache  # read from the rank, with the token: no disk tier here
    assert (memory.tier, memory.entries, memory.lookups) == ("memory", 0, 0)

    log = agent.call("GET", "/api/v1/ranks/demo/0/log")
    assert log.status == 200 and log.headers["Content-Type"].startswith("text/plain")
    on_disk = (genmlx_home / "agent" / "logs" / "demo.0.log").read_bytes()
    assert log.body and on_disk.endswith(log.body)
    assert agent.call("GET", "/api/v1/ranks/demo/0/log?tail=16").body == on_disk[-16:]
    assert agent.token.encode() not in on_disk
    assert b"GET /health 200" not in on_disk, "the agent's health polls are not logged"

    stopped = agent.call("DELETE", "/api/v1/ranks/demo/0")
    assert stopped.status == 200, stopped.body
    info = RankInfo.from_json(stopped.json())
    assert (info.pid, info.state) == (started.pid, "exited") and info.exit_code is not None
    assert not psutil.pid_exists(started.pid)
    assert http_status(health) is None
    assert agent.state().ranks == (), "a stopped rank is forgotten"
    assert agent.call("DELETE", "/api/v1/ranks/demo/0").status == 404
    assert agent.token not in agent.proc.output()


@pytest.mark.e2e
def test_a_rank_that_dies_shows_exited_with_its_code_and_can_be_replaced(
    agent: AgentUnderTest, genmlx_home: Path
):
    launch = demo_launch(agent)
    first = agent.start_rank(launch)
    logs = genmlx_home / "agent" / "logs"
    wait_until(lambda: (logs / "demo.0.log").read_bytes(), timeout=30, what="the first run to log")
    os.kill(first.pid, signal.SIGKILL)  # as the kernel's OOM killer would
    exited = wait_until(
        lambda: (r := agent.rank("demo", 0)) and r.state == "exited" and r,
        timeout=10,
        what="the agent to notice the rank's exit",
    )
    assert (exited.pid, exited.exit_code, exited.phase) == (first.pid, -signal.SIGKILL, "exited")
    assert agent.call("GET", "/api/v1/ranks/demo/0/log").status == 200, "its log stays readable"

    first_run = (logs / "demo.0.log").read_bytes()

    second = agent.start_rank(replace(launch, spec_hash="spec-2"))
    assert second.pid != first.pid and (second.state, second.restarts) == ("running", 1)
    assert (logs / "demo.0.log.1").read_bytes() == first_run, "the dead run's log is kept, whole"
    current = wait_until(lambda: agent.call("GET", "/api/v1/ranks/demo/0/log").body, 30, what="run 2's log")
    assert first_run.splitlines()[0] not in current, "the log endpoint shows the current run"
    listed = agent.rank("demo", 0)
    assert (listed.pid, listed.launch, listed.restarts) == (second.pid, second.launch, 1)
    stopped = RankInfo.from_json(agent.call("DELETE", "/api/v1/ranks/demo/0").json())
    assert stopped.state == "exited" and not psutil.pid_exists(second.pid)


@pytest.mark.e2e
def test_sigterm_stops_the_agent_and_every_rank(agent: AgentUnderTest):
    launch = demo_launch(agent)
    rank = agent.start_rank(launch)
    health = f"http://127.0.0.1:{launch.port}/health"
    wait_until(lambda: http_status(health) == 200, timeout=60, what="the rank to load the demo model")
    family = [rank.pid, *(p.pid for p in psutil.Process(rank.pid).children(recursive=True))]

    agent.proc.signal(signal.SIGTERM)
    assert agent.proc.popen.wait(timeout=30) == 0
    wait_until(lambda: all(process_gone(pid) for pid in family), timeout=5, what="the rank's processes to go")
    assert http_status(health) is None


@pytest.mark.e2e
def test_a_rank_reports_its_phases_until_ready_and_its_restarts(agent: AgentUnderTest):
    started = agent.start_rank(demo_launch(agent))
    assert (started.phase, started.restarts) == ("starting", 0)
    phases = [started.phase]

    def ready() -> bool:
        phase = agent.rank("demo", 0).phase
        if phase != phases[-1]:
            phases.append(phase)
        return phase == "ready"

    wait_until(ready, timeout=60, interval=0.05, what="the rank to be ready")
    # "loading" lasts as long as the model takes to load, which may be less than one check.
    assert phases in (["starting", "loading", "ready"], ["starting", "ready"])
    assert http_status(f"http://127.0.0.1:{started.launch.port}/health") == 200

    stopped = RankInfo.from_json(agent.call("DELETE", "/api/v1/ranks/demo/0").json())
    assert (stopped.state, stopped.phase, stopped.restarts) == ("exited", "exited", 0)
    again = agent.start_rank(demo_launch(agent))
    assert (again.phase, again.restarts) == ("starting", 1), "the count survives DELETE and POST"
    assert agent.rank("demo", 0).restarts == 1


@pytest.mark.e2e
def test_a_sigkilled_agent_leaves_no_rank_behind(agent: AgentUnderTest):
    launch = demo_launch(agent)
    rank = agent.start_rank(launch)
    wait_until(lambda: agent.rank("demo", 0).phase == "ready", timeout=60, what="the rank to be ready")
    family = [rank.pid, *(p.pid for p in psutil.Process(rank.pid).children(recursive=True))]

    agent.proc.signal(signal.SIGKILL)  # no chance to stop anything: the ranks must notice themselves
    assert agent.proc.popen.wait(timeout=10) == -signal.SIGKILL
    wait_until(lambda: all(process_gone(pid) for pid in family), timeout=15, what="the orphaned rank to go")
    assert http_status(f"http://127.0.0.1:{launch.port}/health") is None


TERM_IGNORING_HELPER = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
FAKE_RANK = f"""
import signal, subprocess, sys, time
if sys.argv[1] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
helper = subprocess.Popen([sys.executable, "-c", {TERM_IGNORING_HELPER!r}])
print("ready", helper.pid, flush=True)
time.sleep(120)
"""


def fake_rank_command(
    launch: RankLaunch, model_dir: Path, host: str, parent_pid: int, hostfile: Path | None
) -> list[str]:
    """A rank that starts a TERM-ignoring helper in its group; the "stubborn" one ignores TERM too."""
    return [sys.executable, "-c", FAKE_RANK, "ignore-term" if launch.model == "stubborn" else "obey-term"]


async def helper_pid(supervisor: RankSupervisor, model: str) -> int:
    log_path = supervisor.log_path(model, 0)
    for _ in range(200):
        if log_path.read_text().startswith("ready"):
            break
        await asyncio.sleep(0.05)
    return int(log_path.read_text().split()[1])


def test_stopping_a_rank_kills_its_whole_group_and_sigkills_it_after_the_grace_period(tmp_path: Path):
    grace_s = 2.0
    supervisor = RankSupervisor(
        token="not-a-secret",
        host="127.0.0.1",
        log_dir=tmp_path,
        stop_grace_s=grace_s,
        command=fake_rank_command,
    )

    async def start_then_stop(model: str) -> tuple[RankInfo, RankInfo, int, float]:
        started = supervisor.start(RankLaunch(model, str(tmp_path), 0, 1, free_port(), "spec"), tmp_path)
        helper = await helper_pid(supervisor, model)
        began = time.monotonic()
        stopped = await supervisor.stop(model, 0)
        return started, stopped, helper, time.monotonic() - began

    async def scenario() -> list[tuple[RankInfo, RankInfo, int, float]]:
        supervisor.watch()
        outcomes = [await start_then_stop("obedient"), await start_then_stop("stubborn")]
        await supervisor.stop_all()
        return outcomes

    (
        (obedient, obedient_stop, obedient_helper, obedient_s),
        (stubborn, stubborn_stop, stubborn_helper, stubborn_s),
    ) = asyncio.run(scenario())
    assert (obedient_stop.state, obedient_stop.exit_code) == ("exited", -signal.SIGTERM)
    assert obedient_s < grace_s, "a rank that obeys SIGTERM is not made to wait for the grace period"
    assert (stubborn_stop.state, stubborn_stop.exit_code) == ("exited", -signal.SIGKILL)
    assert stubborn_s >= grace_s
    for pid in (obedient.pid, stubborn.pid):
        assert not psutil.pid_exists(pid)
    for pid in (obedient_helper, stubborn_helper):
        wait_until(lambda pid=pid: process_gone(pid), timeout=5, what=f"the rank's helper {pid} to go")
    assert supervisor.ranks() == ()


def test_a_rank_log_is_trimmed_to_its_tail_while_the_rank_keeps_appending(tmp_path: Path):
    path = tmp_path / "rank.log"
    fd = open_new_run_log(path)  # the descriptor a rank writes through
    try:
        lines = b"".join(b"line %08d\n" % i for i in range(LOG_CAP_BYTES // 14 + 1000))
        os.write(fd, lines)
        trim_log(path)
        os.write(fd, b"after the trim\n")
    finally:
        os.close(fd)
    kept = path.read_bytes()
    assert len(kept) < LOG_KEEP_BYTES + 100
    assert b"\0" not in kept, "appends land at the new end, leaving no hole"
    assert kept.endswith(lines[-1000:] + b"after the trim\n")


def test_each_start_keeps_the_earlier_runs_logs_up_to_a_bound(tmp_path: Path):
    path = tmp_path / "rank.log"
    for run in range(KEPT_RUNS + 2):
        fd = open_new_run_log(path)
        os.write(fd, b"run %d\n" % run)
        os.close(fd)
    newest = KEPT_RUNS + 1
    assert path.read_bytes() == b"run %d\n" % newest
    for runs_ago in range(1, KEPT_RUNS + 1):
        assert (tmp_path / f"rank.log.{runs_ago}").read_bytes() == b"run %d\n" % (newest - runs_ago)
    earlier = [f"rank.log.{runs_ago}" for runs_ago in range(1, KEPT_RUNS + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank.log", *earlier], "the oldest is dropped"


def test_a_rank_of_a_multi_rank_group_gets_mlx_ring_settings(tmp_path: Path):
    hosts = ("10.0.0.1:32323", "10.0.0.2:32323")
    serving = ServingSettings(max_batch=24, max_queue=192)  # as placement derived them
    launch = RankLaunch("big", "/models/big", 1, 2, 8100, "spec", hostfile=hosts, serving=serving)
    hostfile = tmp_path / "big.1.hostfile.json"
    write_hostfile(hostfile, launch.hostfile)
    assert json.loads(hostfile.read_text()) == [["10.0.0.1:32323"], ["10.0.0.2:32323"]]

    env = rank_environment("secret-token", launch, hostfile)
    assert (env["MLX_RANK"], env["MLX_HOSTFILE"], env["GENMLX_API_TOKEN"]) == (
        "1",
        str(hostfile),
        "secret-token",
    )
    argv = dispatcher_command(launch, Path("/models/big"), "0.0.0.0", 4242, hostfile)
    assert argv[:3] == [sys.executable, "-m", "genmlx.dispatcher"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags == {
        "--model": "/models/big",
        "--name": "big",
        "--port": "8100",
        "--host": "0.0.0.0",
        "--rank": "1",
        "--world-size": "2",
        "--max-batch": "24",
        "--max-queue": "192",
        "--hostfile": str(hostfile),
        "--parallelism": "tensor",
        "--backend": "ring",
        "--parent-pid": "4242",
    }
    assert "MLX_RANK" not in rank_environment("secret-token", replace(launch, hostfile=()), None)


def test_a_model_with_a_disk_cache_gets_its_directory_under_the_agents_home(genmlx_home):
    serving = ServingSettings(disk_cache_gb=20.0)
    launch = RankLaunch("big", "/models/big", 0, 1, 8100, "spec", serving=serving)
    argv = dispatcher_command(launch, Path("/models/big"), "0.0.0.0", 4242, None)
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags["--disk-cache-gb"] == "20.0"
    assert flags["--disk-cache-dir"] == str(genmlx_home / "kv-cache" / "big")
    plain = dispatcher_command(
        replace(launch, serving=ServingSettings()), Path("/models/big"), "0.0.0.0", 1, None
    )
    assert "--disk-cache-dir" not in plain and "--disk-cache-gb" not in plain


def test_hugging_face_credentials_stay_with_the_agent(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_secret")
    launch = RankLaunch("small", "/models/small", 0, 1, 8100, "spec")
    env = rank_environment("secret-token", launch, None)
    assert "HF_TOKEN" not in env and "HUGGING_FACE_HUB_TOKEN" not in env
    assert env["GENMLX_API_TOKEN"] == "secret-token"
