"""One request to a model's rank 0, its reply relayed as it arrives, and abandoned the moment the
client that asked for it leaves.

Closing the connection is how rank 0 learns that its client is gone: it cancels the request and
stops reading its prompt at the next step. So the master must be able to close it at any moment,
also before the first byte of the reply, while a long prompt is still being read. tornado's
``AsyncHTTPClient`` cannot be cancelled, so this speaks HTTP/1.1 over a connection of its own with
tornado's ``HTTP1Connection``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

CONNECT_TIMEOUT_S = 5.0
# A prompt of hundreds of thousands of tokens may take minutes before the first byte; a stream may
# then run for hours. Neither is a reason to give up on rank 0.
HEADER_TIMEOUT_S = 3600.0
MAX_BODY_BYTES = 1 << 40

OnHeaders = Callable[[int, httputil.HTTPHeaders], None]
OnChunk = Callable[[bytes], None]


class Relay(httputil.HTTPMessageDelegate):
    """Hands each part of the reply on as it arrives."""

    def __init__(self, on_headers: OnHeaders, on_chunk: OnChunk):
        self._on_headers = on_headers
        self._on_chunk = on_chunk

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> None:
        assert isinstance(start_line, httputil.ResponseStartLine)
        self._on_headers(start_line.code, headers)

    def data_received(self, chunk: bytes) -> None:
        self._on_chunk(chunk)


class Upstream:
    """One POST to rank 0; ``close`` abandons it from anywhere on the event loop."""

    def __init__(self) -> None:
        self._stream: IOStream | None = None
        self._closed = False

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], on_headers: OnHeaders, on_chunk: OnChunk
    ) -> None:
        """Send the request and relay the reply until it ends. ``StreamClosedError`` when the
        connection closed early (``close``, or rank 0 went away); ``OSError`` or ``TimeoutError``
        when rank 0 could not be reached."""
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        stream = await asyncio.wait_for(TCPClient().connect(host, port), CONNECT_TIMEOUT_S)
        self._stream = stream
        if self._closed:  # the client left while we were connecting
            stream.close()
            raise StreamClosedError()
        params = HTTP1ConnectionParameters(header_timeout=HEADER_TIMEOUT_S, max_body_size=MAX_BODY_BYTES)
        connection = HTTP1Connection(stream, True, params)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        # One request per connection, closed by both ends once the reply is in: tornado's client
        # side leaves the connection open after a reply, and rank 0 would keep its end too.
        sent = {**headers, "Host": parts.netloc, "Content-Length": str(len(body)), "Connection": "close"}
        try:
            start = httputil.RequestStartLine("POST", path, "HTTP/1.1")
            await connection.write_headers(start, httputil.HTTPHeaders(sent), body)
            connection.finish()
            if not await connection.read_response(Relay(on_headers, on_chunk)):
                raise StreamClosedError()
        finally:
            stream.close()

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.close()
