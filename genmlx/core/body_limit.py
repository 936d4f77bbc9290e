"""Request size limits, answered in the API's own shape.

Tornado's own ``max_body_size`` answers a bare ``400 Bad Request`` with no body and closes the
connection: an OpenAI or Anthropic client then shows a status and nothing else. ``serve`` puts
``BodyLimit`` in front of an application instead: a request whose declared ``Content-Length``
is over the limit gets a 413 at once, before any of its body is read, as JSON in the shape of the
API its path belongs to; a chunked body gets the same 413 as soon as it grows past the limit.
Either way the connection closes after the reply, so the rest of the body is never read. Headers
over ``MAX_HEADER_BYTES`` are still refused by tornado itself (a bare 400: no path to go by yet).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.web import Application

from genmlx.core.errors import BodyTooLarge
from genmlx.core.http import (
    ANTHROPIC_ERRORS,
    GENMLX_ERRORS,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    OPENAI_ERRORS,
    ErrorFormat,
)

log = logging.getLogger(__name__)

# Tornado's own body limit, set out of reach so that ``BodyLimit`` always answers first.
UNREACHABLE_BYTES = 1 << 62


def serve(
    app: Application, port: int, address: str, max_body_bytes: int = MAX_BODY_BYTES, **options: Any
) -> HTTPServer:
    """Listen on ``address:port`` with ``app`` behind ``BodyLimit`` and the header limit."""
    server = HTTPServer(
        BodyLimit(app, max_body_bytes),
        max_header_size=MAX_HEADER_BYTES,
        max_body_size=UNREACHABLE_BYTES,
        **options,
    )
    server.listen(port, address)
    return server


def error_format_of(path: str) -> ErrorFormat:
    """The error shape of the API a path belongs to: Anthropic's for ``/v1/messages``, OpenAI's
    for the rest of ``/v1``, ours for the cluster's own API."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return ANTHROPIC_ERRORS
    if path.startswith("/v1/"):
        return OPENAI_ERRORS
    return GENMLX_ERRORS


class BodyLimit(httputil.HTTPServerConnectionDelegate):
    """``app``, refusing request bodies over ``max_bytes`` (see the module's docstring)."""

    def __init__(self, app: Application, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        return LimitedRequest(self.app.start_request(server_conn, request_conn), request_conn, self.max_bytes)

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)


class LimitedRequest(httputil.HTTPMessageDelegate):
    """One request: passed on to the application until its body proves too large."""

    def __init__(
        self, inner: httputil.HTTPMessageDelegate, connection: httputil.HTTPConnection, max_bytes: int
    ):
        self.inner = inner
        self.connection = connection
        self.max_bytes = max_bytes
        self.path = "/"
        self.received = 0
        self.refused = False
        self.passed_on = False  # the application has seen this request's headers

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        if isinstance(start_line, httputil.RequestStartLine):
            self.path = start_line.path.split("?", 1)[0]
        declared = headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            self.refuse(f"{int(declared)} bytes")
            return None
        self.passed_on = True
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.refused:
            return None
        self.received += len(chunk)
        if self.received > self.max_bytes:
            self.refuse(f"over {self.max_bytes} bytes")
            return None
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        if not self.refused:
            self.inner.finish()

    def on_connection_close(self) -> None:
        if self.passed_on:
            self.inner.on_connection_close()

    def refuse(self, size: str) -> None:
        """Answer 413 in the API's shape; the connection closes once it is sent."""
        self.refused = True
        limit = f"{self.max_bytes / (1 << 20):g} MiB"
        error = BodyTooLarge(f"The request body ({size}) is over this server's limit of {limit}.")
        reply = error_format_of(self.path).reply(error, error.status)
        body = json.dumps(reply.body).encode()
        headers = httputil.HTTPHeaders(
            {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close"}
        )
        headers.update(reply.headers)
        log.warning("refused a request to %s: body of %s over %s", self.path, size, limit)
        start = httputil.ResponseStartLine("HTTP/1.1", reply.status, "Request Entity Too Large")
        self.connection.write_headers(start, headers, body)
        self.connection.finish()
