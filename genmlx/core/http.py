"""The JSON HTTP conventions the master and the dispatchers share: bearer-token checks and
errors raised as ``genmlx.core.api_errors.ApiError`` and rendered once, in OpenAI's shape."""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

from tornado.httputil import responses
from tornado.web import HTTPError, RequestHandler

from genmlx.core.api_errors import ApiError, InvalidRequest, Unauthorized, error_for_status, internal_error
from genmlx.core.home import api_key_matches, bearer_matches


class JsonHandler(RequestHandler):
    """Base of token-protected JSON endpoints. Subclasses say where the token comes from
    (``bearer_token``); a handler with ``requires_token = False`` is open (liveness checks)."""

    requires_token = True
    # A read-only endpoint the status page reads may also accept the page's session cookie
    # (``genmlx.master.api.ui_auth``) on GET, when the app injects a ``sessions`` verifier.
    accepts_session = False
    sessions: Any = None

    def initialize(self, token: str | None = None, **deps: Any) -> None:
        self.token = token
        for name, value in deps.items():
            setattr(self, name, value)

    def bearer_token(self) -> str | None:
        """The token requests must carry; None turns the check off."""
        return self.token

    def prepare(self) -> None:
        token = self.bearer_token()
        if self.requires_token and token is not None and not self.carries_token(token):
            if self.carries_session():
                return
            raise Unauthorized(
                "Missing or incorrect API key: send 'Authorization: Bearer <cluster token>' "
                "(or 'x-api-key: <cluster token>')."
            )

    def carries_token(self, token: str) -> bool:
        """The cluster token as a bearer token (OpenAI clients) or an ``x-api-key`` (Anthropic's)."""
        headers = self.request.headers
        return bearer_matches(headers.get("Authorization"), token) or api_key_matches(
            headers.get("x-api-key"), token
        )

    def carries_session(self) -> bool:
        """A valid session cookie, on a GET this handler opens to it, from our own origin."""
        if not self.accepts_session or self.sessions is None or self.request.method != "GET":
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
        error = as_api_error(status_code, kwargs.get("exc_info"))
        if error.status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="genmlx"')
        if error.status in (429, 503):
            self.set_header("Retry-After", "5")
        self.set_status(error.status)
        self.finish(error.to_json())

    def log_exception(
        self, typ: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Client errors are told to the client and appear in the access log; only our own
        # failures deserve a traceback.
        if isinstance(value, ApiError) and value.status < 500:
            return
        super().log_exception(typ, value, tb)


def as_api_error(status_code: int, exc_info: Any) -> ApiError:
    """The ``ApiError`` to render for whatever a handler raised (or tornado itself produced)."""
    error = exc_info[1] if exc_info else None
    if isinstance(error, ApiError):
        return error
    if isinstance(error, HTTPError):
        status_code = error.status_code
    if status_code < 500:
        return error_for_status(status_code, f"{status_code} {responses.get(status_code, 'Client Error')}.")
    return internal_error()
