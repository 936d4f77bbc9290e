"""The master's read API for people and pages: the event history, and a live Server-Sent Events
stream of status documents (after every pass) and events (as they are recorded)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

from tornado.iostream import StreamClosedError

from genmlx.core.errors import InvalidRequest
from genmlx.core.http import ApiHandler, ClusterAuth, SessionVerifier
from genmlx.master.api.report import status_document
from genmlx.master.runtime.loop import Reconciler

HEARTBEAT_S = 15.0  # a comment line now and then keeps proxies from closing an idle stream


def current_status(reconciler: Reconciler) -> dict[str, Any]:
    """The status document as JSON, with each link as its latest checks have it."""
    document = status_document(reconciler.applied, reconciler.snapshot, reconciler.rejected)
    links = reconciler.link_checks.reports() if reconciler.snapshot is not None else None
    return (replace(document, links=links) if links is not None else document).to_json()


class ReadEndpoint(ApiHandler):
    """A read of the reconciler that the status page makes too, with its session."""

    def initialize(self, auth: ClusterAuth, reconciler: Reconciler, sessions: SessionVerifier) -> None:
        super().initialize(auth, sessions)
        self.reconciler = reconciler


class EventsHandler(ReadEndpoint):
    """``GET /api/v1/events[?limit=N&kind=Model&name=qwen]``: recent events, newest first."""

    def get(self) -> None:
        try:
            limit = max(1, min(1000, int(self.get_argument("limit", "100"))))
        except ValueError:
            raise InvalidRequest("limit must be a number", param="limit") from None
        kind, name = self.get_argument("kind", None), self.get_argument("name", None)
        log = self.reconciler.events
        events = log.recent(limit, kind, name) if log else []
        self.write_json(200, {"events": [e.report().to_json() for e in events]})


class StreamHandler(ReadEndpoint):
    """``GET /api/v1/stream``: ``event: status`` with the whole status document at once and after
    every pass, ``event: event`` for each event recorded. Ends when the client leaves."""

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        unsubscribe = [self.reconciler.on_pass(lambda: queue.put_nowait(("status", None)))]
        if self.reconciler.events is not None:
            unsubscribe.append(
                self.reconciler.events.subscribe(lambda e: queue.put_nowait(("event", e.report().to_json())))
            )
        queue.put_nowait(("status", None))
        try:
            await self.relay(queue)
        except StreamClosedError:
            pass
        finally:
            for stop in unsubscribe:
                stop()

    async def relay(self, queue: asyncio.Queue[tuple[str, Any]]) -> None:
        while True:
            try:
                kind, data = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
            except TimeoutError:
                self.write(": keep-alive\n\n")
            else:
                payload = current_status(self.reconciler) if kind == "status" else data
                self.write(f"event: {kind}\ndata: {json.dumps(payload)}\n\n")
            await self.flush()
