"""What every agent endpoint shares: the bearer-token check and the one place errors are rendered,
as ``{"error": {"message", "type"}}``. Handlers get their collaborators as ``AgentDeps``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tornado.httputil import responses
from tornado.web import HTTPError, RequestHandler

from genmlx.agent.ranks.supervisor import RankSupervisor
from genmlx.agent.store.file_serving import VerifiedFiles
from genmlx.agent.transfers.manager import TransferManager
from genmlx.core.errors import AgentRequestError, AuthError, GenMLXError, ModelNotFound, TemporaryError
from genmlx.core.home import bearer_matches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentDeps:
    """What the handlers work with."""

    name: str
    token: str = field(repr=False)
    storage_paths: tuple[Path, ...]
    supervisor: RankSupervisor
    transfers: TransferManager
    verified: VerifiedFiles  # the same one the transfer manager fills
    node_id: str = ""

# HTTP status of our errors that do not carry one (an ``AgentRequestError`` carries its own).
ERROR_STATUS: tuple[tuple[type[GenMLXError], int], ...] = (
    (AuthError, 401),
    (ModelNotFound, 400),
    (TemporaryError, 503),
)


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
        for name, value in getattr(error, "headers", {}).items():
            self.set_header(name, value)  # e.g. a 416's Content-Range
        self.finish({"error": {"message": message, "type": kind}})

    def log_exception(
        self, typ: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Our own errors are answers, not crashes: one line, no traceback (and never a header).
        if isinstance(value, GenMLXError):
            log.info("%s %s refused: %s", self.request.method, self.request.path, value)
        else:
            super().log_exception(typ, value, tb)
