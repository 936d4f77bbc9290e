"""Rank supervision: start dispatcher processes, notice when they exit, stop them for good.

Each rank runs in its own session, so its process group holds it and anything it started; every
signal goes to the whole group. Exit is detected by polling (no SIGCHLD handler, which would fight
an embedding event loop): a rank that exited is a zombie until reaped, which keeps its group id
reserved, so the agent can sweep the group with SIGKILL before reaping and leave no orphans. The
agent restarts nothing by itself: an exited rank is reported until the master stops or replaces it.

Each rank reports a phase. Rank 0 serves HTTP, so the same periodic check asks its ``/health``
(on loopback when the agent binds a wildcard address): "starting" until it first answers, then
"loading" while it answers 503 and "ready" once it answers 200; a check that gets no answer
changes nothing, so a busy rank does not flap. Other ranks serve nothing: one is "ready" while rank
0 of its group runs on this agent and is ready, else "loading"; where rank 0 runs on another node,
the master reads the group's readiness from rank 0's agent. Every rank that ended is "exited".
``restarts`` counts the earlier starts of the same model and rank number in this agent's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.ioloop import IOLoop, PeriodicCallback

from genmlx.agent.ranks.backend_failure import backend_failure
from genmlx.agent.ranks.environment import rank_environment
from genmlx.agent.ranks.logs import (
    log_needs_trimming,
    open_new_run_log,
    rank_devices_path,
    rank_hostfile_path,
    rank_log_path,
    read_log_tail,
    trim_log,
    write_hostfile,
)
from genmlx.agent.ranks.prompt_cache_read import read_prompt_cache, token_keys
from genmlx.agent.store.prompt_caches import prompt_cache_root
from genmlx.core.errors import AgentConflict, AgentNotFound, TemporaryError
from genmlx.core.tokens import TokenSource
from genmlx.wire.agent_state import PromptCacheTier, RankInfo, RankPhase
from genmlx.wire.argv import to_argv
from genmlx.wire.rank_launch import RankLaunch, rank_command, rank_key

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.5
EXIT_POLL_S = 0.05
KILL_WAIT_S = 10.0
HEALTH_TIMEOUT_S = 1.0
BACKEND_FAILURE_TAIL_BYTES = 16 * 1024  # of a jaccl rank's log, read for why it could not join

# (launch, real model directory, host to bind, the agent's pid, hostfile or None) -> argv
CommandBuilder = Callable[[RankLaunch, Path, str, int, Path | None], list[str]]
# Told the model directory of a rank that exited by itself with a non-zero code (the scrub checks it).
FailedExitHook = Callable[[Path], None]


class RankNotFound(AgentNotFound):
    """No rank of that model and number was started by this agent, or it was stopped since."""


class RankAlreadyRunning(AgentConflict):
    """A rank with the same model and number is still running: stop it first."""


class AgentStopping(TemporaryError):
    """The agent is shutting down and starts no more ranks."""


class RankWontDie(TemporaryError):
    """A rank outlived SIGKILL (a process stuck in the kernel): asking again may succeed."""


def dispatcher_command(
    launch: RankLaunch, model_dir: Path, host: str, parent_pid: int, hostfile: Path | None
) -> list[str]:
    """The argv of one dispatcher rank. The token is not here: it travels in the environment."""
    # The disk tier of the prompt cache: per model, under the agent's home (GENMLX_HOME).
    disk_cache = str(prompt_cache_root() / launch.model)
    command = rank_command(
        launch, str(model_dir), host, parent_pid, str(hostfile) if hostfile else None, disk_cache
    )
    return [sys.executable, "-m", "genmlx.dispatcher", *to_argv(command)]


def health_host(bind_host: str) -> str:
    """The host part of a URL that reaches a rank bound to ``bind_host`` from this machine."""
    if bind_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind_host == "::":
        return "[::1]"
    return f"[{bind_host}]" if ":" in bind_host else bind_host


def leader_exited(pid: int) -> bool:
    """Whether a group leader we have not reaped yet has exited (it is then a zombie)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def signal_group(pgid: int, sig: int) -> None:
    # Nothing left in the group is fine (macOS answers EPERM for a group holding only a zombie).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class RankProcess:
    """The supervisor's mutable record of one rank it started."""

    launch: RankLaunch
    popen: subprocess.Popen
    started_at: float
    model_dir: Path
    restarts: int = 0
    exit_code: int | None = None  # set once reaped; negative: killed by that signal
    stopping: asyncio.Future | None = None
    phase: RankPhase = "starting"  # while running; an exited rank is "exited" whatever this says
    backend_failure: str | None = None  # why a jaccl rank could not join its group
    prompt_cache: tuple[PromptCacheTier, ...] = ()  # rank 0's, as last read

    def info(self) -> RankInfo:
        exited = self.exit_code is not None
        return RankInfo(
            self.launch,
            self.popen.pid,
            "exited" if exited else "running",
            self.started_at,
            self.exit_code,
            phase="exited" if exited else self.phase,
            restarts=self.restarts,
            backend_failure=self.backend_failure,
            prompt_cache=self.prompt_cache if not exited else (),
        )

    @property
    def running(self) -> bool:
        """Neither exited nor being stopped."""
        return self.exit_code is None and self.stopping is None


class RankSupervisor:
    """Starts, watches and stops this agent's ranks. Lives on the event loop; never blocks it."""

    def __init__(
        self,
        *,
        token: str | TokenSource,
        host: str,
        log_dir: Path,
        stop_grace_s: float,
        command: CommandBuilder = dispatcher_command,
        on_failed_exit: FailedExitHook | None = None,
    ):
        self._token = token
        self._host = host
        self._log_dir = log_dir
        self._stop_grace_s = stop_grace_s
        self._command = command
        self._on_failed_exit = on_failed_exit
        self._ranks: dict[str, RankProcess] = {}
        self._starts: Counter[str] = Counter()  # by rank key, for the agent's lifetime
        self._health_host = health_host(host)
        self._http: AsyncHTTPClient | None = None  # made on the event loop, by the first check
        self._closed = False
        self._watcher = PeriodicCallback(self.check_ranks, CHECK_INTERVAL_S * 1000)

    def watch(self) -> None:
        """Start noticing exits and trimming logs; call on the running event loop."""
        self._watcher.start()

    def ranks(self) -> tuple[RankInfo, ...]:
        return tuple(record.info() for _, record in sorted(self._ranks.items()))

    def log_path(self, model: str, rank: int) -> Path:
        return rank_log_path(self._log_dir, self._find(model, rank).launch.key)

    def start(self, launch: RankLaunch, model_dir: Path) -> RankInfo:
        """Spawn ``launch`` on ``model_dir`` (already checked to be a model in a storage path)."""
        if self._closed:
            raise AgentStopping(f"not starting {launch.key}: the agent is shutting down")
        current = self._ranks.get(launch.key)
        if current is not None and current.exit_code is None:
            pid = current.popen.pid
            raise RankAlreadyRunning(f"{launch.key} is already running as pid {pid}: stop it first")
        hostfile = rank_hostfile_path(self._log_dir, launch.key) if launch.hostfile else None
        if hostfile is not None:
            write_hostfile(hostfile, launch.hostfile)
        devices = rank_devices_path(self._log_dir, launch.key) if launch.rdma_devices else None
        if devices is not None:
            devices.write_text(launch.rdma_devices)
        popen = self._spawn(launch, model_dir, hostfile, devices)
        record = RankProcess(launch, popen, time.time(), model_dir, restarts=self._starts[launch.key])
        self._starts[launch.key] += 1
        self._ranks[launch.key] = record
        log.info("started rank %s as pid %d (%d earlier starts)", launch.key, popen.pid, record.restarts)
        return record.info()

    def _spawn(
        self, launch: RankLaunch, model_dir: Path, hostfile: Path | None, devices: Path | None
    ) -> subprocess.Popen:
        log_fd = open_new_run_log(rank_log_path(self._log_dir, launch.key))
        try:
            return subprocess.Popen(
                self._command(launch, model_dir, self._host, os.getpid(), hostfile),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                env=rank_environment(self._token, launch, hostfile, devices),
                start_new_session=True,  # its own process group, signalled as one
            )
        finally:
            os.close(log_fd)  # the child holds its own copy

    async def stop(self, model: str, rank: int) -> RankInfo:
        """Stop a rank (TERM, then KILL after the grace period), forget it, and report how it ended."""
        record = self._find(model, rank)
        if record.stopping is None:
            record.stopping = asyncio.ensure_future(self._terminate(record))
        try:
            await record.stopping
        except Exception:
            record.stopping = None  # let the next request try again
            raise
        if self._ranks.get(record.launch.key) is record:
            del self._ranks[record.launch.key]
        return record.info()

    async def stop_all(self) -> None:
        """Start nothing more, stop watching, and stop every rank, all at once so the wait is one
        grace period."""
        self._closed = True
        self._watcher.stop()
        if self._http is not None:
            self._http.close()
        records = list(self._ranks.values())
        results = await asyncio.gather(
            *(self.stop(r.launch.model, r.launch.rank) for r in records), return_exceptions=True
        )
        for record, result in zip(records, results, strict=True):
            if isinstance(result, BaseException):
                log.error("could not stop rank %s: %s", record.launch.key, result)

    async def check_ranks(self) -> None:
        """Reap ranks that exited by themselves, follow running ranks' phases and keep their logs
        bounded."""
        running = [record for record in list(self._ranks.values()) if self._still_running(record)]
        await asyncio.gather(*(self._check_health(r) for r in running if r.launch.rank == 0))
        for record in running:
            if record.launch.rank != 0:
                self._set_phase(record, "ready" if self._leader_ready(record) else "loading")
        for record in running:
            path = rank_log_path(self._log_dir, record.launch.key)
            if log_needs_trimming(path):
                await IOLoop.current().run_in_executor(None, trim_log, path)

    def _still_running(self, record: RankProcess) -> bool:
        if not record.running:
            return False
        if leader_exited(record.popen.pid):
            self._reap(record)
            log.warning("rank %s exited by itself with code %s", record.launch.key, record.exit_code)
            if record.launch.backend != "ring":
                self._read_backend_failure(record)
            if record.exit_code != 0 and self._on_failed_exit is not None:
                self._on_failed_exit(record.model_dir)  # bad weights on disk are one possible cause
            return False
        return True

    def _read_backend_failure(self, record: RankProcess) -> None:
        # A bounded read of a local file: short enough to do on the event loop.
        path = rank_log_path(self._log_dir, record.launch.key)
        tail = read_log_tail(path, BACKEND_FAILURE_TAIL_BYTES).decode(errors="replace")
        record.backend_failure = backend_failure(record.launch, record.exit_code, tail)
        if record.backend_failure:
            log.warning("rank %s could not join its group: %s", record.launch.key, record.backend_failure)

    async def _check_health(self, record: RankProcess) -> None:
        """Ask rank 0's ``/health``; no answer leaves its phase as it was."""
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True)  # its own queue, not the master's
        url = f"http://{self._health_host}:{record.launch.port}/health"
        try:
            response = await self._http.fetch(
                url, raise_error=False, connect_timeout=HEALTH_TIMEOUT_S, request_timeout=HEALTH_TIMEOUT_S
            )
        except (OSError, HTTPClientError) as e:
            log.debug("rank %s: no answer from %s (%s)", record.launch.key, url, e)
            return
        self._set_phase(record, "ready" if response.code == 200 else "loading")
        if response.code == 200:
            tiers = await read_prompt_cache(
                self._http, self._health_host, record.launch.port, token_keys(self._token)
            )
            record.prompt_cache = tiers if tiers is not None else record.prompt_cache

    def _leader_ready(self, record: RankProcess) -> bool:
        leader = self._ranks.get(rank_key(record.launch.model, 0))
        if leader is None or leader.launch.spec_hash != record.launch.spec_hash:
            return False
        return leader.running and leader.phase == "ready"

    def _set_phase(self, record: RankProcess, phase: RankPhase) -> None:
        # The rank may have exited or been asked to stop while its health was being asked.
        if record.running and record.phase != phase:
            record.phase = phase
            log.info("rank %s is %s", record.launch.key, phase)

    async def _terminate(self, record: RankProcess) -> None:
        if record.exit_code is not None:
            return
        pgid, key = record.popen.pid, record.launch.key
        signal_group(pgid, signal.SIGTERM)
        if not await wait_for_exit(pgid, self._stop_grace_s):
            log.warning("rank %s ignored SIGTERM for %.1fs: killing it", key, self._stop_grace_s)
            signal_group(pgid, signal.SIGKILL)
            if not await wait_for_exit(pgid, KILL_WAIT_S):
                raise RankWontDie(f"rank {key} (pid {pgid}) is still alive after SIGKILL")
        self._reap(record)
        log.info("stopped rank %s (exit code %s)", key, record.exit_code)

    def _reap(self, record: RankProcess) -> None:
        # The leader is a zombie here, so its pid, and thus the group id, cannot have been reused.
        signal_group(record.popen.pid, signal.SIGKILL)
        record.exit_code = record.popen.wait()

    def _find(self, model: str, rank: int) -> RankProcess:
        record = self._ranks.get(rank_key(model, rank))
        if record is None:
            raise RankNotFound(f"no rank {rank} of model {model!r} on this agent")
        return record


async def wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Poll until the group leader ``pid`` has exited; False if it is still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not leader_exited(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(EXIT_POLL_S)
    return True
