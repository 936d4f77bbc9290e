"""The JSON HTTP conventions the master shares: bearer-token checks and errors rendered once.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, on every
endpoint, so one client-side parser reads them all. Handlers raise ``ApiError``; ``write_error``
renders it (and anything unexpected, as a 500 that hides internals).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from tornado.web import HTTPError, RequestHandler

from genmlx.home import bearer_matches

log = logging.getLogger("genmlx.http")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
}


class ApiError(HTTPError):
    """An error to show the client as is: status, message and optional details."""

    def __init__(self, status: int, message: str, *, param: str | None = None, **details: Any):
        super().__init__(status, reason=None)
        self.message = message
        self.param = param
        self.details = details


class JsonHandler(RequestHandler):
    """Base for authenticated JSON endpoints: ``initialize(token=...)`` turns auth on."""

    token: str | None = None
    public = False  # liveness checks set this

    def initialize(self, token: str | None = None, **deps: Any) -> None:
        self.token = token
        for name, value in deps.items():
            setattr(self, name, value)

    def prepare(self) -> None:
        if self.public or self.token is None:
            return
        if not bearer_matches(self.request.headers.get("Authorization"), self.token):
            self.set_header("WWW-Authenticate", 'Bearer realm="genmlx"')
            raise ApiError(401, "missing or wrong bearer token: send 'Authorization: Bearer <cluster token>'")

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"null")
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def write_json(self, status: int, document: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(document))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, ApiError):
            message, param, details = error.message, error.param, error.details
        elif isinstance(error, HTTPError) and error.log_message:
            message, param, details = error.log_message, None, {}
        else:
            message, param, details = self._reason, None, {}
        body = {
            "message": message,
            "type": ERROR_TYPES.get(status_code, "server_error"),
            "param": param,
            "code": details.pop("code", None),
            **details,
        }
        if status_code in (429, 503):
            self.set_header("Retry-After", "5")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": body}))
