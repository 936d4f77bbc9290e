"""The agent's HTTP API: thin tornado handlers over the inventory and the rank supervisor.

    GET    /healthz                          no token; {"status": "ok"} and nothing else
    GET    /api/v1/state                     AgentState JSON
    POST   /api/v1/ranks                     RankLaunch JSON -> 201 RankInfo JSON
    DELETE /api/v1/ranks/{model}/{rank}      200 RankInfo JSON once the process is gone
    GET    /api/v1/ranks/{model}/{rank}/log  text/plain tail of the rank's log (?tail=BYTES)

Everything but ``/healthz`` needs ``Authorization: Bearer <token>``. Errors are raised as typed
exceptions and rendered once, in ``AgentHandler.write_error``, as ``{"error": {"message", "type"}}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tornado.httputil import responses
from tornado.ioloop import IOLoop
from tornado.web import Application, HTTPError, RequestHandler

import genmlx
from genmlx.errors import AgentRequestError, AuthError, GenMLXError, ModelNotFound, TemporaryError
from genmlx.home import bearer_matches
from genmlx.node_state import AgentState

from .facts import collect_node_facts
from .inventory import resolve_model_dir, scan_storage
from .launch_request import parse_rank_launch
from .rank_logs import DEFAULT_TAIL_BYTES, read_log_tail
from .ranks import RankSupervisor

log = logging.getLogger(__name__)

# HTTP status of our errors that do not carry one (an ``AgentRequestError`` carries its own).
ERROR_STATUS: tuple[tuple[type[GenMLXError], int], ...] = (
    (AuthError, 401),
    (ModelNotFound, 400),
    (TemporaryError, 503),
)


@dataclass(frozen=True)
class AgentDeps:
    """What the handlers work with."""

    name: str
    token: str = field(repr=False)
    storage_paths: tuple[Path, ...]
    supervisor: RankSupervisor


def make_app(deps: AgentDeps) -> Application:
    """The agent's tornado application."""
    handler_args = {"deps": deps}
    rank = r"/api/v1/ranks/([^/]+)/([0-9]+)"
    routes = [
        (r"/healthz", HealthzHandler, handler_args),
        (r"/api/v1/state", StateHandler, handler_args),
        (r"/api/v1/ranks", RanksHandler, handler_args),
        (rank, RankHandler, handler_args),
        (rank + "/log", RankLogHandler, handler_args),
    ]
    return Application(routes, default_handler_class=NotFoundHandler, default_handler_args=handler_args)


def describe_error(error: BaseException | None, status_code: int) -> tuple[int, str, str]:
    """HTTP status, error type and message for an exception raised by a handler."""
    if isinstance(error, HTTPError):
        message = error.log_message or responses.get(error.status_code, f"HTTP {error.status_code}")
        return error.status_code, "HTTPError", message
    if isinstance(error, AgentRequestError):
        return error.status, type(error).__name__, str(error)
    for kind, status in ERROR_STATUS:
        if isinstance(error, kind):
            return status, type(error).__name__, str(error)
    return status_code, "InternalError", "internal error: see the agent's log"


class AgentHandler(RequestHandler):
    """Checks the bearer token before anything else and renders every error as JSON."""

    requires_token = True

    def initialize(self, deps: AgentDeps) -> None:
        self.deps = deps

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # the unauthenticated need not learn what we run

    def prepare(self) -> None:
        authorization = self.request.headers.get("Authorization")
        if self.requires_token and not bearer_matches(authorization, self.deps.token):
            raise AuthError("this agent needs the cluster's bearer token: send Authorization: Bearer <token>")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs["exc_info"][1] if "exc_info" in kwargs else None
        status, kind, message = describe_error(error, status_code)
        self.set_status(status)
        if status == 401:
            self.set_header("WWW-Authenticate", "Bearer")
        self.finish({"error": {"message": message, "type": kind}})

    def log_exception(
        self, typ: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Our own errors are answers, not crashes: one line, no traceback (and never a header).
        if isinstance(value, GenMLXError):
            log.info("%s %s refused: %s", self.request.method, self.request.path, value)
        else:
            super().log_exception(typ, value, tb)


class HealthzHandler(AgentHandler):
    requires_token = False

    def get(self) -> None:
        self.write({"status": "ok"})


class StateHandler(AgentHandler):
    async def get(self) -> None:
        loop = IOLoop.current()
        facts = await loop.run_in_executor(None, collect_node_facts)
        storage = await loop.run_in_executor(None, scan_storage, self.deps.storage_paths)
        state = AgentState(self.deps.name, genmlx.__version__, facts, storage, self.deps.supervisor.ranks())
        self.write(state.to_json())


class RanksHandler(AgentHandler):
    async def post(self) -> None:
        launch = parse_rank_launch(self.request.body)
        model_dir = await IOLoop.current().run_in_executor(
            None, resolve_model_dir, launch.model_path, self.deps.storage_paths
        )
        info = self.deps.supervisor.start(launch, model_dir)
        self.set_status(201)
        self.write(info.to_json())


class RankHandler(AgentHandler):
    async def delete(self, model: str, rank: str) -> None:
        info = await self.deps.supervisor.stop(model, int(rank))
        self.write(info.to_json())


class RankLogHandler(AgentHandler):
    async def get(self, model: str, rank: str) -> None:
        path = self.deps.supervisor.log_path(model, int(rank))
        tail = await IOLoop.current().run_in_executor(None, read_log_tail, path, self.tail_bytes())
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.write(tail)

    def tail_bytes(self) -> int:
        raw = self.get_query_argument("tail", None)
        if raw is None:
            return DEFAULT_TAIL_BYTES
        if not raw.isdigit():
            raise AgentRequestError(f"tail: {raw!r} is not a number of bytes", status=400)
        return int(raw)


class NotFoundHandler(AgentHandler):
    """Unknown paths: 401 without the token (so they reveal nothing), else a JSON 404."""

    def prepare(self) -> None:
        super().prepare()
        raise HTTPError(404, "no such endpoint on this agent")
