"""Runs one dispatcher rank: HTTP first, then the model load, until a signal or the parent's end.

Shutdown (SIGTERM, SIGINT, or the parent watchdog) stops accepting connections, cancels running
and waiting generation, and exits 0; a model that fails to load exits 1.

In a multi-rank group only rank 0 serves the API; the other ranks serve ``/health`` alone (so their
agent sees them load) and exit with their group: 0 when rank 0 stops it, 1 when it breaks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.web import Application

from genmlx.core.body_limit import serve
from genmlx.core.tokens import TOKEN_FILE_ENV, TokenFileError, TokenSource
from genmlx.dispatcher.api.app import make_app, make_health_app
from genmlx.dispatcher.api.metrics import DispatcherMetrics
from genmlx.dispatcher.api.prompt_cache import PromptCacheView
from genmlx.dispatcher.engine.decoding import DecoderSettings
from genmlx.dispatcher.engine.disk_tier import DiskTier
from genmlx.dispatcher.engine.lockstep import RankGroup
from genmlx.dispatcher.engine.model_loading import Sharding
from genmlx.dispatcher.engine.runner import Engine, LoadedModel, ModelSource
from genmlx.dispatcher.settings import decoder_settings, disk_tier_settings
from genmlx.dispatcher.watchdog import start_parent_watchdog
from genmlx.wire.rank_launch import RankCommand

log = logging.getLogger("genmlx.dispatcher")

TOKEN_ENV = "GENMLX_API_TOKEN"
ENGINE_STOP_SECONDS = 5.0
CONNECTION_CLOSE_SECONDS = 2.0


def run(settings: RankCommand) -> int:
    """Serve ``settings`` until told to stop; returns the process exit status."""
    _configure_logging()
    # Read once and dropped from the environment so no child process or crash dump inherits it.
    token = rank_token(os.environ.pop(TOKEN_ENV, None) or None, os.environ.pop(TOKEN_FILE_ENV, None))
    # The agent puts models on disk; a dispatcher never downloads.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    code, engine_stopped = asyncio.run(_serve(settings, token))
    if not engine_stopped:
        # The model thread is stuck in native code (e.g. still loading); interpreter teardown
        # around a running MLX call can crash, so leave without it.
        log.warning("model thread still busy after %.0fs; exiting without waiting", ENGINE_STOP_SECONDS)
        logging.shutdown()
        os._exit(code)
    return code


def rank_token(token: str | None, token_file: str | None) -> str | TokenSource | None:
    """The token file the agent follows, where it gave one (so a rotated token is taken without a
    restart), else the token it gave, else none (an open API)."""
    if token_file:
        try:
            return TokenSource(Path(token_file))
        except TokenFileError as e:
            log.warning("%s; using the token the agent gave at start", e)
    return token


async def _serve(settings: RankCommand, token: str | TokenSource | None) -> tuple[int, bool]:
    """Serve until a stop is requested; the exit status and whether the model thread ended."""
    stop = _StopRequest()
    disk_tier = _open_disk_tier(settings)
    decoding = decoder_settings(settings, disk_tier)
    engine = _make_engine(settings, stop, decoding)
    prompt_cache = PromptCacheView(decoding.stats, disk_tier.stats if disk_tier else None)
    metrics = DispatcherMetrics(settings.model_id)
    metrics.watch_prompt_cache(prompt_cache)
    metrics.watch_steps(engine.step_stats)
    try:
        app = _make_rank_app(settings, engine, metrics, prompt_cache, token)
        server = serve(app, settings.port, settings.host)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, e)
        return 1, True
    _log_listening(settings, auth=token is not None)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.request, 0)
    if settings.parent_pid is not None:
        start_parent_watchdog(settings.parent_pid)
    engine.start()  # only now: /health must answer (503) while the model loads
    code = await stop.wait()
    log.info("shutting down")
    ended = await _shut_down(server, engine)
    if disk_tier is not None:  # the blocks still queued are written before the process goes
        await asyncio.to_thread(disk_tier.close)
    return code, ended


def _open_disk_tier(settings: RankCommand) -> DiskTier | None:
    tier = disk_tier_settings(settings)
    if tier is None:
        return None
    try:
        return DiskTier(tier)
    except OSError as e:  # an unwritable directory costs the cache its disk tier, not the model
        log.warning("the prompt cache's disk tier is off: %s", e)
        return None


class _StopRequest:
    """The first exit status asked for: by a signal (0), a model that failed to load (1) or a
    group whose backend could not be joined (``BACKEND_JOIN_FAILED_EXIT``)."""

    def __init__(self) -> None:
        self._outcome: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def request(self, code: int) -> None:
        if not self._outcome.done():
            self._outcome.set_result(code)

    async def wait(self) -> int:
        return await self._outcome


def _make_rank_app(
    settings: RankCommand,
    engine: Engine,
    metrics: DispatcherMetrics,
    prompt_cache: PromptCacheView,
    token: str | TokenSource | None,
) -> Application:
    """The OpenAI API on rank 0; ``/health`` alone on the other ranks of a group."""
    if settings.rank != 0:
        return make_health_app(model_id=settings.model_id, engine=engine, token=token)
    return make_app(
        model_id=settings.model_id,
        engine=engine,
        started_at=int(time.time()),
        metrics=metrics,
        prompt_cache=prompt_cache,
        token=token,
    )


def _rank_group(settings: RankCommand) -> RankGroup | None:
    if settings.world_size == 1:
        return None
    sharding = Sharding(settings.parallelism, settings.layer_split)
    hostfile = Path(settings.hostfile) if settings.hostfile else None
    return RankGroup(settings.rank, settings.world_size, hostfile, sharding, settings.backend)


def _make_engine(settings: RankCommand, stop: _StopRequest, decoding: DecoderSettings) -> Engine:
    started = time.monotonic()

    def load_failed(message: str, code: int) -> None:
        log.error("cannot serve %s: %s", settings.model_id, message)
        stop.request(code)

    model_dir = Path(settings.model_dir).expanduser()
    return Engine(
        ModelSource(model_dir, _rank_group(settings)),
        IOLoop.current(),
        serving=settings.serving,
        decoding=decoding,
        on_loaded=lambda loaded: _log_ready(settings, loaded, time.monotonic() - started),
        on_load_failed=load_failed,
        on_group_ended=stop.request,
    )


async def _shut_down(server: HTTPServer, engine: Engine) -> bool:
    """Stop accepting, cancel generation, close connections; whether the model thread ended."""
    server.stop()
    engine.stop()
    engine_stopped = await asyncio.to_thread(engine.join, ENGINE_STOP_SECONDS)
    await asyncio.sleep(0.05)  # lets handlers answer the cancellations the engine just posted
    try:
        await asyncio.wait_for(server.close_all_connections(), CONNECTION_CLOSE_SECONDS)
    except TimeoutError:
        log.warning("some connections did not close within %.0fs", CONNECTION_CLOSE_SECONDS)
    return engine_stopped


def _log_listening(settings: RankCommand, *, auth: bool) -> None:
    log.info(
        "rank %d/%d: HTTP on http://%s:%d; loading %s from %s (auth %s)",
        settings.rank,
        settings.world_size,
        settings.host,
        settings.port,
        settings.model_id,
        settings.model_dir,
        "on" if auth else "off",
    )


def _log_ready(settings: RankCommand, loaded: LoadedModel, seconds: float) -> None:
    decoding = decoder_settings(settings)
    log.info(
        "%s ready after %.1fs (context length %s, max batch %d, prefill chunk %d (alone %d), max queue %d)",
        settings.model_id,
        seconds,
        loaded.context_length or "unbounded",
        decoding.max_batch,
        decoding.prefill_chunk,
        decoding.prefill_chunk_alone,
        settings.serving.max_queue,
    )


def _configure_logging() -> None:
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
