"""Running the master: start it inside an IOLoop (``start_master``) or as a whole process
(``run_master``, which stops cleanly on SIGINT and SIGTERM)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer

from genmlx.core.body_limit import serve
from genmlx.core.errors import PermanentError
from genmlx.core.mdns import discovery_enabled
from genmlx.core.tokens import TokenSource
from genmlx.manifest.revision import file_revision
from genmlx.manifest.types import DEFAULT_MASTER_PORT, Tls
from genmlx.master.api.server import make_app
from genmlx.master.runtime.applied import AppliedStore
from genmlx.master.runtime.discovery import AgentDiscovery, DiscoveredAgent
from genmlx.master.runtime.events import EventLog
from genmlx.master.runtime.loop import Reconciler
from genmlx.master.runtime.responses import ResponseStore
from genmlx.master.runtime.serving_metrics import ServingMetrics, serving_ranks
from genmlx.master.runtime.telemetry import POLL_ENV as TELEMETRY_POLL_ENV
from genmlx.master.runtime.telemetry import NodeTelemetry
from genmlx.master.runtime.watch import watch_manifest

log = logging.getLogger("genmlx.master")


@dataclass(frozen=True)
class MasterConfig:
    token: str | TokenSource  # a token source follows the token file through rotations
    state_dir: Path
    manifest_file: Path | None = None  # applied at start; None: the last applied one
    port: int | None = None  # None: the manifest's spec.master.port
    watch: bool = False  # re-apply manifest_file whenever it changes
    host: str = "0.0.0.0"
    # Converged, a pass every few seconds is what notices a killed agent (no goodbye is sent):
    # resync + a refused or timed-out connect (3 s) stays within the 10 s the issue allows.
    resync_s: float = 4.0
    discovery: bool = True  # browse for agents with zeroconf (GENMLX_DISCOVERY=off overrides it)
    # Agents this process knows without asking the network: `genmlx up` runs its node's agent
    # itself, so it needs neither a declared address nor discovery to find it.
    local_agents: tuple[tuple[str, str], ...] = ()  # (node name, "host:port")


@dataclass
class RunningMaster:
    reconciler: Reconciler
    server: HTTPServer
    port: int
    task: asyncio.Task
    discovery: AgentDiscovery | None = None
    watcher: asyncio.Task | None = None
    stop_watching: asyncio.Event = field(default_factory=asyncio.Event)
    telemetry: NodeTelemetry | None = None
    telemetry_task: asyncio.Task | None = None

    async def stop(self) -> None:
        self.stop_watching.set()
        self.reconciler.stop()
        if self.telemetry is not None:
            self.telemetry.stop()
        self.server.stop()
        await asyncio.wait_for(self.task, 60)
        if self.watcher is not None:
            await asyncio.wait_for(self.watcher, 10)
        if self.telemetry_task is not None:
            await asyncio.wait_for(self.telemetry_task, 10)
        if self.discovery is not None:
            await self.discovery.stop()


async def start_master(config: MasterConfig) -> RunningMaster:
    """Apply the manifest file if one is given (raises ``ManifestError`` when it is invalid),
    then serve and reconcile."""
    http = AsyncHTTPClient(force_instance=True, max_clients=256)
    discovery = AgentDiscovery(config.host) if config.discovery and discovery_enabled() else None
    store = AppliedStore(config.state_dir)
    reconciler = Reconciler(
        config.token,
        store,
        http,
        resync_s=config.resync_s,
        discovery=discovery,
        known_agents={
            n: DiscoveredAgent(n, address, "", "", last_seen=0.0) for n, address in config.local_agents
        },
        events=EventLog(config.state_dir / "events.sqlite"),
    )
    if config.manifest_file is not None:
        path = config.manifest_file
        reconciler.apply(path.read_text(), str(path), file_revision(path))
    applied = reconciler.applied
    port = config.port or (applied.manifest.master.port if applied else DEFAULT_MASTER_PORT)
    responses = ResponseStore(config.state_dir / "responses.sqlite")
    tls = applied.manifest.master.tls if applied else None
    serving = ServingMetrics(lambda: serving_ranks(reconciler), reconciler.clients.keys_for_host, http)
    poll_s = float(os.environ.get(TELEMETRY_POLL_ENV) or 2.0)
    telemetry = NodeTelemetry(reconciler.proven_clients, poll_s, serving)
    server = serve(
        make_app(reconciler, config.token, responses, telemetry, config.state_dir / "packages"),
        port,
        config.host,
        idle_connection_timeout=3600,
        ssl_options=tls_context(tls) if tls else None,
    )
    log.info("master listening on %s://%s:%d", "https" if tls else "http", config.host, port)
    if discovery is not None:
        await discovery.start(on_change=reconciler.wake)
    else:
        log.info("discovery is off: agents are found only through nodes[].address")
    running = RunningMaster(reconciler, server, port, asyncio.create_task(reconciler.run()), discovery)
    running.telemetry, running.telemetry_task = telemetry, asyncio.create_task(telemetry.run())
    if config.watch and config.manifest_file is not None:
        watching = watch_manifest(config.manifest_file, reconciler, running.stop_watching)
        running.watcher = asyncio.create_task(watching)
    return running


def tls_context(tls: Tls) -> ssl.SSLContext:
    """The server side of the master's HTTPS, from the manifest's certificate and key files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert, key = Path(tls.cert_file).expanduser(), Path(tls.key_file).expanduser()
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise PermanentError(
            f"spec.master.tls: cannot use the certificate {cert} with the key {key}: {e} "
            "(`genmlx tls selfsigned` makes a pair)"
        ) from None
    return context


async def serve_until_signalled(*stoppables) -> None:
    """Wait for SIGINT or SIGTERM, then stop everything given, in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    for stoppable in stoppables:
        await stoppable.stop()


def run_master(config: MasterConfig) -> None:
    async def main() -> None:
        master = await start_master(config)
        await serve_until_signalled(master)

    asyncio.run(main())
