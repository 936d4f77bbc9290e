"""Running an agent: in its own event loop (``genmlx agent``) or inside one that already runs
(``genmlx up``, which hosts the master and an agent in one process)."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from tornado.httpserver import HTTPServer

from .config import AgentConfig
from .ranks import RankSupervisor
from .server import AgentDeps, make_app

__all__ = ["AgentConfig", "RunningAgent", "run_agent", "start_agent"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningAgent:
    """An agent serving on the current event loop."""

    config: AgentConfig
    server: HTTPServer
    supervisor: RankSupervisor

    async def stop(self) -> None:
        """Stop taking requests, then stop every rank (TERM, grace, KILL) so none outlives us."""
        self.server.stop()
        await self.supervisor.stop_all()
        await self.server.close_all_connections()
        log.info("agent %s stopped", self.config.name)


async def start_agent(config: AgentConfig) -> RunningAgent:
    """Serve the agent API on the running event loop and start watching ranks."""
    config.log_dir.mkdir(parents=True, exist_ok=True)
    supervisor = RankSupervisor(
        token=config.token, host=config.host, log_dir=config.log_dir, stop_grace_s=config.stop_grace_s
    )
    deps = AgentDeps(
        name=config.name, token=config.token, storage_paths=config.storage_paths, supervisor=supervisor
    )
    server = make_app(deps).listen(config.port, address=config.host)
    supervisor.watch()
    paths = ", ".join(str(p) for p in config.storage_paths)
    log.info("agent %s listening on %s:%d; storage: %s", config.name, config.host, config.port, paths)
    return RunningAgent(config, server, supervisor)


def run_agent(config: AgentConfig) -> None:
    """Run an agent until SIGTERM or SIGINT, then stop its ranks and return."""
    asyncio.run(serve_until_signalled(config))


async def serve_until_signalled(config: AgentConfig) -> None:
    agent = await start_agent(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        await stop_requested.wait()
        log.info("agent %s stopping on a signal", config.name)
    finally:
        await agent.stop()
