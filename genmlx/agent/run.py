"""Running an agent: in its own event loop (``genmlx agent``) or inside one that already runs
(``genmlx up``, which hosts the master and an agent in one process)."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, replace

from tornado.httpserver import HTTPServer

from genmlx.agent.announce import Announcement, announce_agent, load_node_id
from genmlx.agent.api.server import make_app
from genmlx.agent.config import AgentConfig
from genmlx.agent.ranks.supervisor import RankSupervisor
from genmlx.agent.store.file_serving import VerifiedFiles
from genmlx.agent.store.scrub import Scrubber, ScrubSettings
from genmlx.agent.telemetry.gpu import open_gpu_reader
from genmlx.agent.telemetry.sampler import RefreshedInterfaceKinds, TelemetrySampler
from genmlx.agent.transfers.manager import TransferManager
from genmlx.core.body_limit import serve
from genmlx.core.http import MAX_AGENT_BODY_BYTES
from genmlx.core.mdns import discovery_enabled

__all__ = ["AgentConfig", "RunningAgent", "run_agent", "start_agent"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningAgent:
    """An agent serving on the current event loop."""

    config: AgentConfig
    server: HTTPServer
    supervisor: RankSupervisor
    announcement: Announcement | None = None
    transfers: TransferManager | None = None
    scrubber: Scrubber | None = None
    telemetry: TelemetrySampler | None = None

    async def stop(self) -> None:
        """Say goodbye on the network, stop taking requests, then stop every rank (TERM, grace,
        KILL) so none outlives us."""
        if self.announcement is not None:
            await self.announcement.withdraw()
        self.server.stop()
        if self.scrubber is not None:
            await self.scrubber.stop()
        if self.transfers is not None:
            await self.transfers.stop_all()  # interrupted transfers resume on the next request
        await self.supervisor.stop_all()
        if self.telemetry is not None:
            self.telemetry.stop()
        await self.server.close_all_connections()
        log.info("agent %s stopped", self.config.name)


async def start_agent(config: AgentConfig) -> RunningAgent:
    """Serve the agent API on the running event loop, start watching ranks, then announce the
    agent with zeroconf unless discovery is off (raises ``PermanentError`` if the name is taken)."""
    config.log_dir.mkdir(parents=True, exist_ok=True)
    node_id = load_node_id()
    verified = VerifiedFiles()
    transfers = TransferManager(config.storage_paths, config.token, verified)
    scrubber = Scrubber(
        config.storage_paths,
        ScrubSettings(interval_s=config.scrub_interval_s, bytes_per_s=config.scrub_bytes_per_s),
        busy=transfers.is_running,
        verified=verified,
    )
    supervisor = RankSupervisor(
        token=config.token,
        host=config.host,
        log_dir=config.log_dir,
        stop_grace_s=config.stop_grace_s,
        on_failed_exit=scrubber.scrub_soon,
    )
    telemetry = TelemetrySampler(
        config.storage_paths,
        interface_kinds=RefreshedInterfaceKinds(),
        gpu=open_gpu_reader(config.telemetry_interval_s),
        interval_s=config.telemetry_interval_s,
    )
    app = make_app(
        name=config.name,
        token=config.token,
        storage_paths=config.storage_paths,
        supervisor=supervisor,
        transfers=transfers,
        verified=verified,
        node_id=node_id,
        telemetry=telemetry,
    )
    server = serve(app, config.port, config.host, MAX_AGENT_BODY_BYTES)
    supervisor.watch()
    scrubber.start()
    telemetry.start()
    paths = ", ".join(str(p) for p in config.storage_paths)
    log.info("agent %s listening on %s:%d; storage: %s", config.name, config.host, config.port, paths)
    agent = RunningAgent(
        config, server, supervisor, transfers=transfers, scrubber=scrubber, telemetry=telemetry
    )
    try:
        return replace(agent, announcement=await announce_if_enabled(config, node_id))
    except BaseException:
        await agent.stop()
        raise


async def announce_if_enabled(config: AgentConfig, node_id: str) -> Announcement | None:
    """Announce the agent unless its config or ``GENMLX_DISCOVERY=off`` turns discovery off."""
    if not (config.discovery and discovery_enabled()):
        log.info("discovery is off: the master finds %s only through nodes[].address", config.name)
        return None
    return await announce_agent(config.name, config.host, config.port, node_id)


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
