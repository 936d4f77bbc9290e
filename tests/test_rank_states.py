"""Rank phases and restart counts, driven step by step: a real ``RankSupervisor`` on a real event
loop, real processes and real HTTP, with the rank's program replaced by a short script whose
``/health`` the test controls (files in a trigger directory), so that every phase can be held as
long as the test needs. The real dispatcher's phases are checked in test_agent.py."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from genmlx.agent.ranks.supervisor import CHECK_INTERVAL_S, RankSupervisor, health_host
from genmlx.wire.agent_state import RankInfo, RankPhase
from genmlx.wire.rank_launch import RankLaunch

pytestmark = pytest.mark.timeout(60)

# Rank 0 listens once <trigger>/listen exists, then answers /health 503, or 200 while
# <trigger>/ready exists. Other ranks serve nothing, as with the real dispatcher.
SCRIPTED_RANK = """
import http.server, pathlib, sys, time
trigger, host, port, rank = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if sys.argv[5] == "fail":
    time.sleep(0.3)
    sys.exit(3)
while rank != 0 or not (trigger / "listen").exists():
    time.sleep(0.05)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if (trigger / "ready").exists() else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer((host, port), Health).serve_forever()
"""


def scripted_rank_command(
    launch: RankLaunch, model_dir: Path, host: str, parent_pid: int, hostfile: Path | None
) -> list[str]:
    """The scripted rank, with ``model_dir`` as its trigger directory."""
    mode = "fail" if launch.model == "failing" else "serve"
    return [
        sys.executable,
        "-c",
        SCRIPTED_RANK,
        str(model_dir),
        host,
        str(launch.port),
        str(launch.rank),
        mode,
    ]


def supervisor_for(tmp_path: Path, host: str = "127.0.0.1") -> RankSupervisor:
    return RankSupervisor(
        token="not-a-secret",
        host=host,
        log_dir=tmp_path / "logs",
        stop_grace_s=2.0,
        command=scripted_rank_command,
    )


def launch_of(model: str, rank: int = 0, world_size: int = 1, port: int | None = None) -> RankLaunch:
    return RankLaunch(model, "/unused", rank, world_size, port or free_port(), "spec-1")


def trigger_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir(exist_ok=True)
    return path


def rank_info(supervisor: RankSupervisor, model: str, rank: int) -> RankInfo:
    (found,) = [r for r in supervisor.ranks() if (r.launch.model, r.launch.rank) == (model, rank)]
    return found


async def phase_becomes(
    supervisor: RankSupervisor, model: str, rank: int, phase: RankPhase, timeout: float = 10.0
) -> RankPhase:
    deadline = time.monotonic() + timeout
    while (current := rank_info(supervisor, model, rank).phase) != phase:
        if time.monotonic() > deadline:
            pytest.fail(f"{model}.{rank} stayed {current!r}; expected {phase!r}")
        await asyncio.sleep(0.05)
    return current


async def after_checks(supervisor: RankSupervisor, model: str, rank: int, checks: int = 3) -> RankPhase:
    """The phase after several periodic checks have run."""
    await asyncio.sleep(checks * CHECK_INTERVAL_S)
    return rank_info(supervisor, model, rank).phase


def test_rank_zero_is_starting_until_its_health_answers_then_loading_then_ready(tmp_path: Path):
    trigger = trigger_dir(tmp_path, "solo")

    async def scenario() -> tuple[list[RankPhase], RankInfo]:
        supervisor = supervisor_for(tmp_path, host="0.0.0.0")  # so its health is asked on 127.0.0.1
        supervisor.watch()
        phases = [supervisor.start(launch_of("solo"), trigger).phase]
        phases.append(await after_checks(supervisor, "solo", 0))
        (trigger / "listen").touch()
        phases.append(await phase_becomes(supervisor, "solo", 0, "loading"))
        phases.append(await after_checks(supervisor, "solo", 0))
        (trigger / "ready").touch()
        phases.append(await phase_becomes(supervisor, "solo", 0, "ready"))
        (trigger / "ready").unlink()  # the agent reports what /health says, not a latch
        phases.append(await phase_becomes(supervisor, "solo", 0, "loading"))
        stopped = await supervisor.stop("solo", 0)
        await supervisor.stop_all()
        return phases, stopped

    phases, stopped = asyncio.run(scenario())
    assert phases == ["starting", "starting", "loading", "loading", "ready", "loading"]
    assert (stopped.state, stopped.phase, stopped.exit_code) == ("exited", "exited", -signal.SIGTERM)


def test_other_ranks_are_ready_when_their_rank_zero_on_this_agent_is(tmp_path: Path):
    trigger = trigger_dir(tmp_path, "group")
    port = free_port()

    async def scenario() -> dict[str, RankPhase | int | None]:
        supervisor = supervisor_for(tmp_path)
        supervisor.watch()
        seen: dict[str, RankPhase | int | None] = {}
        leader = supervisor.start(launch_of("group", 0, 2, port), trigger)
        seen["follower at start"] = supervisor.start(launch_of("group", 1, 2, port), trigger).phase
        supervisor.start(launch_of("elsewhere", 1, 2), trigger_dir(tmp_path, "elsewhere"))
        seen["follower, leader starting"] = await after_checks(supervisor, "group", 1)
        (trigger / "listen").touch()
        await phase_becomes(supervisor, "group", 0, "loading")
        seen["follower, leader loading"] = await after_checks(supervisor, "group", 1)
        (trigger / "ready").touch()
        await phase_becomes(supervisor, "group", 0, "ready")
        seen["follower, leader ready"] = await phase_becomes(supervisor, "group", 1, "ready")
        seen["rank 1 without its rank 0"] = rank_info(supervisor, "elsewhere", 1).phase
        os.kill(leader.pid, signal.SIGKILL)
        seen["follower, leader killed"] = await phase_becomes(supervisor, "group", 1, "loading")
        seen["leader's exit code"] = rank_info(supervisor, "group", 0).exit_code
        await supervisor.stop_all()
        return seen

    assert asyncio.run(scenario()) == {
        "follower at start": "starting",
        "follower, leader starting": "loading",
        "follower, leader loading": "loading",
        "follower, leader ready": "ready",
        "rank 1 without its rank 0": "loading",
        "follower, leader killed": "loading",
        "leader's exit code": -signal.SIGKILL,
    }


def test_a_rank_that_exits_by_itself_is_exited_with_its_code(tmp_path: Path):
    async def scenario() -> RankInfo:
        supervisor = supervisor_for(tmp_path)
        supervisor.watch()
        supervisor.start(launch_of("failing"), trigger_dir(tmp_path, "failing"))
        await phase_becomes(supervisor, "failing", 0, "exited")
        exited = rank_info(supervisor, "failing", 0)
        await supervisor.stop_all()
        return exited

    exited = asyncio.run(scenario())
    assert (exited.state, exited.phase, exited.exit_code) == ("exited", "exited", 3)


def test_restarts_count_earlier_starts_of_the_same_model_and_rank(tmp_path: Path):
    trigger = trigger_dir(tmp_path, "counted")

    async def scenario() -> list[tuple[str, int]]:
        supervisor = supervisor_for(tmp_path)
        supervisor.watch()
        counts = []
        for _ in range(2):  # started, then stopped and forgotten: the count survives
            counts.append(("start", supervisor.start(launch_of("counted"), trigger).restarts))
            counts.append(("stop", (await supervisor.stop("counted", 0)).restarts))
        killed = supervisor.start(launch_of("counted"), trigger)
        os.kill(killed.pid, signal.SIGKILL)
        await phase_becomes(supervisor, "counted", 0, "exited")
        counts.append(("replace exited", supervisor.start(launch_of("counted"), trigger).restarts))
        counts.append(("other rank", supervisor.start(launch_of("counted", 1, 2), trigger).restarts))
        counts.append(("other model", supervisor.start(launch_of("another"), trigger).restarts))
        counts.append(("listed", rank_info(supervisor, "counted", 0).restarts))
        await supervisor.stop_all()
        return counts

    assert asyncio.run(scenario()) == [
        ("start", 0),
        ("stop", 0),
        ("start", 1),
        ("stop", 1),
        ("replace exited", 3),
        ("other rank", 0),
        ("other model", 0),
        ("listed", 3),
    ]


@pytest.mark.parametrize(
    ("bind", "asked"),
    [
        ("0.0.0.0", "127.0.0.1"),
        ("", "127.0.0.1"),
        ("::", "[::1]"),
        ("127.0.0.1", "127.0.0.1"),
        ("10.0.0.2", "10.0.0.2"),
        ("fd00::2", "[fd00::2]"),
        ("studio-a.local", "studio-a.local"),
    ],
)
def test_health_is_asked_where_the_rank_can_be_reached(bind: str, asked: str):
    assert health_host(bind) == asked


def test_the_masters_health_check_of_a_rank_that_accepts_and_stays_silent_says_down(monkeypatch):
    """A rank joining its MLX group holds the interpreter: its port accepts and nothing answers.
    The master's pass must go on with the endpoint down, not fail on tornado's timeout."""
    import socket

    from tornado.httpclient import AsyncHTTPClient

    import genmlx.master.runtime.agent_client as agent_client

    monkeypatch.setattr(agent_client, "HEALTH_TIMEOUT_S", 0.5)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens; the kernel accepts for it
        port = silent.getsockname()[1]

        async def check():
            return await agent_client.check_endpoint(AsyncHTTPClient(force_instance=True), "127.0.0.1", port)

        health = asyncio.run(check())
    assert (health.state, health.url) == ("down", f"http://127.0.0.1:{port}/v1")
    assert health.detail.startswith("rank 0 did not answer /health within 0.5 s: Timeout")
