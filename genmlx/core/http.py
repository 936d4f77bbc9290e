"""The one tornado handler base of the master, the agents and the dispatchers.

``ApiHandler`` checks the cluster token before anything else, renders every error once in the shape
its API promises (``error_format``), and logs our own errors as answers, not crashes. Handlers take
their collaborators through tornado's ``initialize(**kwargs)``, each declaring the ones it needs;
the route tables (``make_app``) pass them. Errors are the typed ones of ``genmlx.core.errors``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from tornado.httputil import HTTPServerRequest, responses
from tornado.web import HTTPError, RequestHandler

from genmlx.core.errors import (
    ApiError,
    GenMLXError,
    InternalError,
    InvalidRequest,
    ProtocolError,
    Unauthorized,
)
from genmlx.core.home import api_key_matches, bearer_matches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorReply:
    """An error as one API answers it: status, JSON body and the headers that go with them."""

    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorFormat:
    """How one API shapes errors: ``reply(raised, status_code)`` for whatever a handler raised
    (None when tornado itself failed the request with ``status_code``)."""

    name: str
    reply: Callable[[BaseException | None, int], ErrorReply]


def as_api_error(raised: BaseException | None, status_code: int) -> ApiError:
    """The ``ApiError`` to render for whatever a handler raised (or tornado itself produced)."""
    if isinstance(raised, ApiError):
        return raised
    if isinstance(raised, HTTPError):
        status_code = raised.status_code
    if status_code < 500:
        return ProtocolError(status_code, f"{status_code} {responses.get(status_code, 'Client Error')}.")
    return InternalError()


def retry_after(status: int) -> dict[str, str]:
    """The header that tells a client when to come back from a 429 or a 503."""
    return {"Retry-After": "5"} if status in (429, 503) else {}


def openai_error_reply(raised: BaseException | None, status_code: int) -> ErrorReply:
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API answers."""
    error = as_api_error(raised, status_code)
    headers = retry_after(error.status)
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="genmlx"'
    return ErrorReply(error.status, error.to_json(), headers)


def genmlx_error_reply(raised: BaseException | None, status_code: int) -> ErrorReply:
    """``{"error": {"message", "type"}}`` with the error's class name as type, as agents answer.
    A status of 500 is our own failure: its message stays in our log."""
    if isinstance(raised, HTTPError):
        status = raised.status_code
        kind, message = "HTTPError", raised.log_message or responses.get(status, f"HTTP {status}")
    elif isinstance(raised, GenMLXError) and raised.status != 500:
        status, kind, message = raised.status, type(raised).__name__, str(raised)
    else:
        status, kind, message = status_code, "InternalError", "internal error: see the agent's log"
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    headers.update(getattr(raised, "headers", {}))  # e.g. a 416's Content-Range
    return ErrorReply(status, {"error": {"message": message, "type": kind}}, headers)


OPENAI_ERRORS = ErrorFormat("openai", openai_error_reply)
GENMLX_ERRORS = ErrorFormat("genmlx", genmlx_error_reply)


class SessionVerifier(Protocol):
    """What a read endpoint asks of the status page's sessions (``genmlx.master.api.ui_auth``)."""

    def accepts(self, request: HTTPServerRequest) -> bool: ...


class ApiHandler(RequestHandler):
    """Base of every GenMLX endpoint. ``requires_token = False`` opens one (liveness checks); a
    ``token`` of None opens them all (a dispatcher started without one). ``accepts_api_key`` takes
    the token from ``x-api-key`` too, as Anthropic's clients send it."""

    requires_token = True
    accepts_api_key = True
    error_format = OPENAI_ERRORS
    # A client's mistake is told to the client and shows in the access log. Its message may quote
    # what the client sent (a prompt API's clients send prompts), so it is logged only on request.
    refusal_log_level = logging.DEBUG

    def initialize(self, token: str | None, sessions: SessionVerifier | None = None) -> None:
        """``sessions``, given to the status page's read endpoints, lets its cookie in on a GET."""
        self.token = token
        self.sessions = sessions

    def prepare(self) -> None:
        if not self.requires_token or self.token is None:
            return
        if not (self.carries_token(self.token) or self.carries_session()):
            raise self.token_refused()

    def token_refused(self) -> GenMLXError:
        """The error a request without the token gets."""
        return Unauthorized(
            "Missing or incorrect API key: send 'Authorization: Bearer <cluster token>' "
            "(or 'x-api-key: <cluster token>')."
        )

    def carries_token(self, token: str) -> bool:
        """The cluster token as a bearer token (OpenAI clients) or, where accepted, an ``x-api-key``."""
        headers = self.request.headers
        if bearer_matches(headers.get("Authorization"), token):
            return True
        return self.accepts_api_key and api_key_matches(headers.get("x-api-key"), token)

    def carries_session(self) -> bool:
        """A valid session cookie, on a GET to a handler given ``sessions``, from our own origin."""
        if self.sessions is None or self.request.method != "GET":
            return False
        return self.sessions.accepts(self.request)

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"null")
        except ValueError as e:
            raise InvalidRequest(f"The body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("The body must be a JSON object.")
        return body

    def write_json(self, status: int, document: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(document))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        raised = kwargs["exc_info"][1] if "exc_info" in kwargs else None
        reply = self.error_format.reply(raised, status_code)
        self.set_status(reply.status)
        for name, value in reply.headers.items():
            self.set_header(name, value)
        self.finish(reply.body)

    def log_exception(
        self, typ: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Our own errors are answers, not crashes: one line, no traceback (and never a header).
        if isinstance(value, GenMLXError):
            level = logging.WARNING if value.status >= 500 else self.refusal_log_level
            log.log(level, "%s %s refused: %s", self.request.method, self.request.path, value)
        else:
            super().log_exception(typ, value, tb)
