"""Request size limits, answered in the API's own shape.

Tornado's own ``max_body_size`` answers a bare ``400 Bad Request`` with no body and closes the
connection, and headers over its ``max_header_size`` get no answer at all: an OpenAI or Anthropic
client then shows a status or a closed connection and nothing else. ``serve`` puts
``RequestLimits`` in front of an application instead: a request whose headers are over
``MAX_HEADER_BYTES`` gets a 431, and one whose declared ``Content-Length`` is over the limit a
413, at once, before any of its body is read, as JSON in the shape of the API its path belongs
to; a chunked body gets the same 413 as soon as it grows past the limit. Tornado itself still
cuts off headers past ``HEADER_CUTOFF_BYTES`` (the connection closed unanswered: they are not
read whole).

Either way the connection closes after the reply, and the rest of the body is never kept (the
application lets go of what it had of a chunked one). It is still taken in, though: closing a
socket with unread data makes the kernel answer with a reset, which can reach the client before the
reply does and throw it away, so the client would see "connection reset" instead of the reason. A
refused connection closes in stages (RFC 9112, 9.6): the reply is sent, our side of the stream
ends (over TLS it does not: a TLS socket cannot end its writing and go on reading), and what the
client still sends is read and dropped (a chunked body's framing still parsed) until it closes,
the body ends, or ``LINGER_S`` pass.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from asyncio import Future
from collections.abc import Awaitable
from typing import Any

from tornado import gen, httputil
from tornado.http1connection import HTTP1Connection
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError
from tornado.web import Application

from genmlx.core.errors import ApiError, BodyTooLarge, HeadersTooLarge
from genmlx.core.http import (
    ANTHROPIC_ERRORS,
    GENMLX_ERRORS,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    OPENAI_ERRORS,
    ErrorFormat,
)

log = logging.getLogger(__name__)

# Tornado's own header limit: headers past it are not read whole, and the connection is closed.
HEADER_CUTOFF_BYTES = 1 << 20
# Tornado's own body limit, set out of reach so that ``RequestLimits`` always answers first.
UNREACHABLE_BYTES = 1 << 62
# How long a refused connection goes on taking in and dropping what its client still sends.
LINGER_S = 10.0


def serve(
    app: Application, port: int, address: str, max_body_bytes: int = MAX_BODY_BYTES, **options: Any
) -> HTTPServer:
    """Listen on ``address:port`` with ``app`` behind ``RequestLimits``."""
    server = HTTPServer(
        RequestLimits(app, max_body_bytes),
        max_header_size=HEADER_CUTOFF_BYTES,
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


class RequestLimits(httputil.HTTPServerConnectionDelegate):
    """``app``, refusing headers over ``MAX_HEADER_BYTES`` and bodies over ``max_bytes`` (see the
    module's docstring)."""

    def __init__(self, app: Application, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        assert isinstance(request_conn, HTTP1Connection)  # what tornado's HTTPServer hands over
        return LimitedRequest(self.app.start_request(server_conn, request_conn), request_conn, self.max_bytes)

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)


class LimitedRequest(httputil.HTTPMessageDelegate):
    """One request: passed on to the application unless its headers or body prove too large."""

    def __init__(self, inner: httputil.HTTPMessageDelegate, connection: HTTP1Connection, max_bytes: int):
        self.inner = inner
        self.connection = connection
        self.max_bytes = max_bytes
        self.path = "/"
        self.received = 0
        self.refused = False
        self.passed_on = False  # the application has seen this request's headers
        self.lingering: object | None = None  # the timeout that ends a refused connection
        self.sent: Future[None] | None = None  # a refused chunked body's reply, once sent

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        if isinstance(start_line, httputil.RequestStartLine):
            self.path = start_line.path.split("?", 1)[0]
        declared = headers.get("Content-Length", "")
        if (size := header_bytes(start_line, headers)) > MAX_HEADER_BYTES:
            limit = f"this server's limit of {MAX_HEADER_BYTES >> 10} KiB"
            self.refuse(HeadersTooLarge(f"The request's headers ({size} bytes) are over {limit}."))
        elif declared.isdigit() and int(declared) > self.max_bytes:
            self.refuse(BodyTooLarge(f"The request body ({int(declared)} bytes) is over {self.limit}."))
        if self.refused:
            # No body has been read yet: the stream is ours to drain, and tornado stops here (it
            # neither reads the body nor sends "100 Continue" to a client that asked for one).
            return drain(self.connection.detach())
        self.passed_on = True
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.refused:
            return None  # the rest of a refused chunked body: dropped
        self.received += len(chunk)
        if self.received > self.max_bytes:
            # Tornado is mid-read, so it goes on parsing the chunks (dropped above) until the body
            # ends, the client closes or the time is up.
            self.refuse(BodyTooLarge(f"The request body (over {self.max_bytes} bytes) is over {self.limit}."))
            self.passed_on = False
            self.inner.on_connection_close()  # the application lets go of the body it holds
            stream = self.connection.stream
            self.sent = stream.write(b"")  # done once everything written before it is sent
            self.sent.add_done_callback(lambda _: end_writing(stream))
            self.lingering = IOLoop.current().call_later(LINGER_S, self.close)
            return None
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        if not self.refused:
            self.inner.finish()
            return
        # The refused body is over: the connection goes once the reply is sent.
        self.sent.add_done_callback(lambda _: self.close())

    def close(self) -> None:
        self.connection.close()
        self.on_connection_close()

    def on_connection_close(self) -> None:
        if self.lingering is not None:
            IOLoop.current().remove_timeout(self.lingering)
        if self.passed_on:
            self.inner.on_connection_close()

    @property
    def limit(self) -> str:
        return f"this server's limit of {self.max_bytes / (1 << 20):g} MiB"

    def refuse(self, error: ApiError) -> None:
        """Answer ``error`` in the API's shape (written to the stream, not yet sent)."""
        self.refused = True
        reply = error_format_of(self.path).reply(error, error.status)
        body = json.dumps(reply.body).encode()
        headers = httputil.HTTPHeaders(
            {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close"}
        )
        headers.update(reply.headers)
        log.warning("refused a request to %s: %s", self.path, error.message)
        reason = httputil.responses.get(reply.status, "Refused")
        start = httputil.ResponseStartLine("HTTP/1.1", reply.status, reason)
        self.connection.write_headers(start, headers, body)


def header_bytes(
    start_line: httputil.RequestStartLine | httputil.ResponseStartLine, headers: httputil.HTTPHeaders
) -> int:
    """About how many bytes the request line and headers took on the wire."""
    line = sum(len(str(part)) + 1 for part in start_line) + 1
    return line + sum(len(name) + len(value) + 4 for name, value in headers.get_all())


def end_writing(stream: IOStream) -> None:
    """Send the end of our side of ``stream`` after what was sent: the client reads the whole
    reply and closes, while what it still sends is taken in. Not over TLS, whose socket, once its
    writing ends, reads nothing more in TLS (the client reads the reply's length instead)."""
    if isinstance(stream, SSLIOStream):
        return
    with contextlib.suppress(OSError):  # the client is already gone
        if stream.socket is not None:
            stream.socket.shutdown(socket.SHUT_WR)


async def drain(stream: IOStream) -> None:
    """Once what was written to ``stream`` is sent, end our side of it and drop what the client
    still sends until it closes or ``LINGER_S`` pass; then close."""
    deadline = IOLoop.current().time() + LINGER_S
    # The client closed (StreamClosedError) or did not within the time (TimeoutError).
    with contextlib.suppress(StreamClosedError, TimeoutError):
        sent = stream.write(b"")  # done once everything written before it is sent
        await gen.with_timeout(deadline, sent, quiet_exceptions=StreamClosedError)
        end_writing(stream)
        while True:
            more = stream.read_bytes(1 << 16, partial=True)
            await gen.with_timeout(deadline, more, quiet_exceptions=StreamClosedError)
    stream.close()
