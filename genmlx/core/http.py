"""The one tornado handler base of the master, the agents and the dispatchers.

``ApiHandler`` checks who is asking before anything else (``ClusterAuth``: a request signed with
the cluster token's key, as GenMLX's own processes send them, or where a server allows it the
token itself as a bearer token, as people and OpenAI clients send it), signs its reply to a
signed request (``genmlx.core.signing``), renders every error once in the shape
its API promises (``error_format``: OpenAI's, Anthropic's or the agents'), and logs our own errors as
answers, not crashes. Handlers take
their collaborators through tornado's ``initialize(**kwargs)``, each declaring the ones it needs;
the route tables (``make_app``) pass them. Errors are the typed ones of ``genmlx.core.errors``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from tornado.httputil import HTTPServerRequest, responses
from tornado.web import HTTPError, RequestHandler

from genmlx.core.errors import (
    ApiError,
    Forbidden,
    GenMLXError,
    InternalError,
    InvalidRequest,
    ProtocolError,
    QueueFull,
    Unauthorized,
)
from genmlx.core.home import CLIENT_KEY_PREFIX, api_key_matches, bearer_matches
from genmlx.core.mdns import interface_addresses
from genmlx.core.signing import (
    REPLY_HEADER,
    SCHEME,
    Keys,
    ReplayGuard,
    SignatureError,
    host_is_ours,
    parse_signature,
    sign_reply,
    verify_request,
)
from genmlx.core.tokens import TokenSource

log = logging.getLogger(__name__)

ANTHROPIC_OVERLOADED = 529  # Anthropic's own status for "overloaded, retry later"
# What a server reads of a request at most (``genmlx.core.body_limit``; in the README): a larger
# body is answered 413 unread, larger headers 431.
MAX_HEADER_BYTES = 64 << 10
MAX_BODY_BYTES = 16 << 20  # the master's and the dispatchers' APIs: conversations, manifests
MAX_AGENT_BODY_BYTES = 1 << 20  # an agent's API: small JSON requests only


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


def retry_after(status: int, error: BaseException | None = None) -> dict[str, str]:
    """The header that tells a client when to come back from a 429, a 503 or Anthropic's 529: the
    error's own (a rate limit knows when it ends), else 5 seconds."""
    if status not in (429, 503, ANTHROPIC_OVERLOADED):
        return {}
    return {"Retry-After": "5", **getattr(error, "headers", {})}


def openai_error_reply(raised: BaseException | None, status_code: int) -> ErrorReply:
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API answers."""
    error = as_api_error(raised, status_code)
    headers = retry_after(error.status, error)
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
    headers = {"WWW-Authenticate": SCHEME} if status == 401 else {}  # agents take signed requests only
    headers.update(getattr(raised, "headers", {}))  # e.g. a 416's Content-Range
    return ErrorReply(status, {"error": {"message": message, "type": kind}}, headers)


# Anthropic's published error types (https://docs.anthropic.com/en/api/errors) by the status they
# come with; any other status of ours is an invalid_request_error below 500, an api_error above.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_status(error: ApiError) -> int:
    """The status Anthropic's API would answer ``error`` with: a full queue is our server being
    overloaded (Anthropic's 529, which its clients back off from), not a client's rate limit."""
    return ANTHROPIC_OVERLOADED if isinstance(error, QueueFull) else error.status


def anthropic_error_json(error: ApiError) -> dict:
    """``{"type": "error", "error": {"type", "message"}}`` for one of our errors."""
    status = anthropic_status(error)
    error_type = ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": error_type, "message": error.message}}


def anthropic_error_reply(raised: BaseException | None, status_code: int) -> ErrorReply:
    """Whatever a handler raised, as Anthropic's API answers it."""
    error = as_api_error(raised, status_code)
    status = anthropic_status(error)
    return ErrorReply(status, anthropic_error_json(error), retry_after(status, error))


OPENAI_ERRORS = ErrorFormat("openai", openai_error_reply)
GENMLX_ERRORS = ErrorFormat("genmlx", genmlx_error_reply)
ANTHROPIC_ERRORS = ErrorFormat("anthropic", anthropic_error_reply)


class ClientKey(Protocol):
    """A client's key, as a ``Keyring`` finds it: its name, the models it reaches, and whether it
    reads ``/metrics``."""

    name: str
    metrics: bool

    def reaches(self, model: str) -> bool: ...


class Keyring(Protocol):
    """The client keys (``gmx_…``) a server takes besides the token: the master's
    (``genmlx.master.api.client_keys``)."""

    def find(self, presented: str) -> ClientKey | None:
        """The key ``presented`` is, or None (unknown, or revoked by an apply)."""

    def admit(self, key: ClientKey) -> None:
        """Count one request of ``key``; ``Unauthorized`` once it expired, ``RateLimited`` past its
        requests per minute."""


class ClusterAuth:
    """What one server checks requests against: the signing keys of the cluster token (and of an
    older one while a rotation's grace lasts: ``genmlx.core.tokens``, followed as the token file
    changes), the nonces it has seen, whether the token itself is accepted as a bearer token
    (agents take signed requests only: nothing ever sends them the token), and the client keys it
    takes (``keyring``, the master's)."""

    def __init__(
        self, tokens: str | TokenSource, *, accepts_bearer: bool = True, keyring: Keyring | None = None
    ):
        self.tokens = tokens if isinstance(tokens, TokenSource) else TokenSource.fixed(tokens)
        self.accepts_bearer = accepts_bearer
        self.keyring = keyring
        self.guard = ReplayGuard()
        self._addresses: tuple[float, set[str]] = (-ADDRESS_REFRESH_S, set())

    @property
    def token(self) -> str:
        return self.tokens.token

    @property
    def keys(self) -> Keys:
        return self.tokens.keys()

    def counting(self) -> tuple[str, ...]:
        """The tokens that count now: the current one, and an older one during a rotation's grace."""
        return self.tokens.current().tokens(time.time())

    def own_addresses(self, fresh: bool = False) -> set[str]:
        """This machine's IP addresses, looked up again at most every few seconds (``fresh``:
        every second, for a request to an address not among them: a cable just plugged in)."""
        looked_up, addresses = self._addresses
        now = time.monotonic()
        if now - looked_up >= (ADDRESS_RECHECK_S if fresh else ADDRESS_REFRESH_S):
            addresses = interface_addresses()
            self._addresses = (now, addresses)
        return addresses


ADDRESS_REFRESH_S = 10.0
ADDRESS_RECHECK_S = 1.0


class SessionVerifier(Protocol):
    """What a read endpoint asks of the status page's sessions (``genmlx.master.api.ui_auth``)."""

    def accepts(self, request: HTTPServerRequest) -> bool: ...


class ApiHandler(RequestHandler):
    """Base of every GenMLX endpoint. ``requires_token = False`` opens one (liveness checks); an
    ``auth`` of None opens them all (a dispatcher started without a token). ``accepts_api_key``
    takes the token from ``x-api-key`` too, as Anthropic's clients send it. A client key reaches
    only the endpoints that set ``accepts_client_keys`` (the models' own, under ``/v1``); anywhere
    else it is a 403."""

    requires_token = True
    accepts_api_key = True
    accepts_client_keys = False
    # A reply to a signed request is signed over its body, unless it is a file whose content the
    # receiver checks against a signed listing (then over its status, as a streamed reply is).
    signs_reply_body = True
    error_format = OPENAI_ERRORS
    # A client's mistake is told to the client and shows in the access log. Its message may quote
    # what the client sent (a prompt API's clients send prompts), so it is logged only on request.
    refusal_log_level = logging.DEBUG

    def initialize(self, auth: ClusterAuth | None, sessions: SessionVerifier | None = None) -> None:
        """``sessions``, given to the status page's read endpoints, lets its cookie in on a GET."""
        self.auth = auth
        self.sessions = sessions
        self.signed_by: bytes | None = None  # the key a signed request was verified with
        self.request_nonce = ""
        self.client_key: ClientKey | None = None  # the client key the request came with
        self._reply_signed = False

    def prepare(self) -> None:
        if not self.requires_token or self.auth is None:
            return
        if self.carries_signature(self.auth) or self.carries_client_key(self.auth):
            return
        if self.auth.accepts_bearer and any(self.carries_token(token) for token in self.auth.counting()):
            return
        if not self.carries_session():
            raise self.token_refused()

    def carries_signature(self, auth: ClusterAuth) -> bool:
        """Whether the request is signed with a key of ``auth``; one that is signed and fails is
        refused here, saying why."""
        request = self.request
        try:
            signature = parse_signature(request.headers.get("Authorization"))
            if signature is None:
                return False
            ours = host_is_ours(request.host, auth.own_addresses())
            if not ours and not host_is_ours(request.host, auth.own_addresses(fresh=True)):
                raise SignatureError(f"it is addressed to {request.host}, which is not this machine")
            keys = auth.keys
            if keys.find(signature.key_id) is None:  # a token just rotated here: look at the file now
                auth.tokens.current(recheck=True)
                keys = auth.keys
            key = verify_request(
                keys, signature, request.method, request.host, request.uri, request.body, auth.guard
            )
        except SignatureError as e:
            raise self.signature_refused(str(e)) from None
        self.signed_by, self.request_nonce = key, signature.nonce
        return True

    def carries_client_key(self, auth: ClusterAuth) -> bool:
        """Whether the request comes with one of ``auth``'s client keys (admitted: not expired,
        within its rate); one that is unknown, or used where keys never reach, is refused here."""
        presented = self.presented_key()
        if auth.keyring is None or presented is None or not presented.startswith(CLIENT_KEY_PREFIX):
            return False
        key = auth.keyring.find(presented)
        if key is None:  # unknown or revoked (or, by a one-in-16-million chance, the token itself)
            return False
        if not self.admits_client_key(key):
            raise Forbidden(
                f"The API key {key.name!r} reaches the models only (/v1/...); "
                "this endpoint needs the cluster token."
            )
        auth.keyring.admit(key)
        self.client_key = key
        return True

    def admits_client_key(self, key: ClientKey) -> bool:
        """Whether this endpoint lets ``key`` in (``accepts_client_keys``, unless it says more)."""
        return self.accepts_client_keys

    def presented_key(self) -> str | None:
        """What the request offers as its key: a bearer token, or (where taken) an ``x-api-key``."""
        authorization = self.request.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            return authorization[len("Bearer ") :].strip()
        return self.request.headers.get("x-api-key") if self.accepts_api_key else None

    def signature_refused(self, why: str) -> GenMLXError:
        return Unauthorized(f"The request's signature is refused: {why}.")

    def token_refused(self) -> GenMLXError:
        """The error a request without the token gets."""
        return Unauthorized(
            "Missing, incorrect or revoked API key: send a client key (`genmlx key create`) or the "
            "cluster token as 'Authorization: Bearer <key>' (or 'x-api-key: <key>')."
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

    def compute_etag(self) -> None:
        return None  # a 304 would drop the body a reply signature covers; nothing here is cached

    def flush(self, include_footers: bool = False) -> Any:
        if not self._headers_written:  # a reply sent in pieces: its signature covers the status
            self._sign_reply(None, streamed=True)
        return super().flush(include_footers)

    def finish(self, chunk: Any = None) -> Any:
        if chunk is not None and not self._finished:
            self.write(chunk)
        if not self._headers_written:
            self._sign_reply(b"".join(self._write_buffer), streamed=not self.signs_reply_body)
        return super().finish()

    def _sign_reply(self, body: bytes | None, streamed: bool) -> None:
        if self.signed_by is None or self._reply_signed:
            return
        self._reply_signed = True
        reply = sign_reply(self.signed_by, self.request_nonce, self.get_status(), body, streamed)
        self.set_header(REPLY_HEADER, reply)

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"null")
        except ValueError as e:
            raise InvalidRequest(f"The body is not valid JSON: {e}") from None
        except RecursionError:
            raise InvalidRequest("The body's JSON is nested too deeply.") from None
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
