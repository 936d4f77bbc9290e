"""The request limits of every server (``genmlx.core.body_limit``), over plain HTTP and over TLS (as
the master serves with ``master.tls``): headers over 64 KiB get a 431 that says so and headers past
the cut-off no answer; a refused body's 413 always reaches the client, and a client that goes on
sending is cut off once ``LINGER_S`` pass.

A server behind ``serve`` runs in this process on a thread of its own (so ``LINGER_S`` can be made
short), and the client is a bare socket: what these tests look at is the bytes and the resets on
the wire, which an HTTP client library hides. The 413's and the 431's shapes in each API are
checked against the real processes in ``test_fuzz_http``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from conftest import free_port
from tornado.iostream import IOStream
from tornado.web import Application, RequestHandler

from genmlx.cli.tls import write_self_signed
from genmlx.core import body_limit

LIMIT = 64 << 10
LINGER_S = 1.0


class Echo(RequestHandler):
    def post(self) -> None:
        self.write({"received": len(self.request.body)})


@dataclass(frozen=True)
class Served:
    port: int
    tls: ssl.SSLContext | None  # the client's, where the server speaks TLS
    hand_over: Callable[[socket.socket], None]  # serves a connected socket of our own


@pytest.fixture(params=["plain", "tls"])
def served(request, monkeypatch, tmp_path):
    """A server that takes bodies of ``LIMIT`` bytes at most and lingers ``LINGER_S``."""
    monkeypatch.setattr(body_limit, "LINGER_S", LINGER_S)
    port, loop, ready = free_port(), asyncio.new_event_loop(), threading.Event()
    server_tls = client_tls = None
    if request.param == "tls":
        cert, key = write_self_signed(tmp_path, ["localhost"])
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(cert, key)
        client_tls = ssl.create_default_context(cafile=str(cert))
    servers = []

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def listen() -> None:
            app = Application([("/echo", Echo)])
            servers.append(body_limit.serve(app, port, "127.0.0.1", LIMIT, ssl_options=server_tls))

        loop.run_until_complete(listen())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="body-limit-server", daemon=True)
    thread.start()
    assert ready.wait(10)

    def hand_over(connection: socket.socket) -> None:
        address = ("127.0.0.1", 0)
        loop.call_soon_threadsafe(lambda: servers[0].handle_stream(IOStream(connection), address))

    yield Served(port, client_tls, hand_over)

    async def stop() -> None:
        servers[0].stop()
        await servers[0].close_all_connections()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def opened(served: Served) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    if served.tls is not None:
        connection = served.tls.wrap_socket(connection, server_hostname="localhost")
    return connection


def connect(served: Served, head: str) -> socket.socket:
    connection = opened(served)
    connection.sendall(f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode())
    return connection


def read_to_end(connection: socket.socket) -> bytes:
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_a_body_within_the_limit_is_passed_on(served):
    with connect(served, f"Content-Length: {LIMIT}\r\nConnection: close\r\n") as connection:
        connection.sendall(b"x" * LIMIT)
        reply = read_to_end(connection)
    assert status_of(reply) == 200 and json.loads(reply.split(b"\r\n\r\n", 1)[1]) == {"received": LIMIT}


def test_a_refused_chunked_body_that_ends_gets_the_reply_and_the_end_of_the_connection(served):
    with connect(served, "Transfer-Encoding: chunked\r\n") as connection:
        connection.sendall(chunk(b"x" * LIMIT) * 8 + b"0\r\n\r\n")
        reply = read_to_end(connection)  # no reset, and no wait for the linger to run out
    assert status_of(reply) == 413 and reply.count(b"HTTP/1.1") == 1, reply


def test_a_client_waiting_for_100_continue_gets_the_413_instead(served):
    with connect(served, f"Content-Length: {LIMIT + 1}\r\nExpect: 100-continue\r\n") as connection:
        reply = read_to_end(connection)
    assert reply.startswith(b"HTTP/1.1 413 ") and b"100" not in reply.split(b"\r\n", 1)[0], reply
    assert reply.count(b"HTTP/1.1") == 1, reply


def test_a_refused_upload_whose_reply_waits_for_the_client_still_ends(served):
    """The 413 cannot go out at once (the client has not read what the connection sent before it):
    once the client reads, it gets the reply and then the end of the connection."""
    if served.tls is not None:
        pytest.skip("the buffer is filled under the connection, where TLS would not expect bytes")
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    filler = 0
    with contextlib.suppress(BlockingIOError):  # the kernel holds no more for the client
        while True:
            filler += ours.send(b"-" * 65536)
    served.hand_over(ours)
    with theirs:
        theirs.settimeout(10)
        theirs.sendall(f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {100 * LIMIT}\r\n\r\n".encode())
        time.sleep(0.2)  # refused: the 413 waits behind the filler
        received = read_to_end(theirs)  # the filler, the reply, the end; not a wait for more
    assert received[:filler] == b"-" * filler
    assert received[filler:].startswith(b"HTTP/1.1 413 "), received[filler : filler + 200]


@pytest.mark.parametrize(
    ("head", "piece"),
    [
        (f"Content-Length: {100 * LIMIT}\r\n", b"x" * 1024),
        ("Transfer-Encoding: chunked\r\n", chunk(b"x" * 1024)),
    ],
    ids=["declared", "chunked"],
)
def test_a_client_that_goes_on_sending_after_the_413_is_cut_off_when_the_linger_ends(served, head, piece):
    with connect(served, head) as connection:
        connection.sendall(piece * (2 * LIMIT // 1024))  # past the limit: refused
        reply = connection.recv(65536)
        assert reply.startswith(b"HTTP/1.1 413 "), reply
        if served.tls is None:  # over TLS the client reads the reply's length instead
            assert connection.recv(65536) == b"", "the server's side ends after the reply"
        start = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError, ssl.SSLError)):
            while time.monotonic() - start < 10 * LINGER_S:  # taken in and dropped, until the linger ends
                connection.sendall(piece)
                time.sleep(0.02)
    assert time.monotonic() - start >= LINGER_S / 2, "dropped, not cut off at once"


def test_headers_within_the_limit_are_passed_on(served):
    head = f"X-Pad: {'x' * 60_000}\r\nContent-Length: 2\r\nConnection: close\r\n"
    with connect(served, head) as connection:
        connection.sendall(b"{}")
        reply = read_to_end(connection)
    assert status_of(reply) == 200, reply[:200]


def test_headers_over_the_limit_get_a_431_that_says_so(served):
    with connect(served, f"X-Pad: {'x' * 70_000}\r\nContent-Length: 2\r\n") as connection:
        connection.sendall(b"{}")
        reply = read_to_end(connection)  # the reply, then the end of the connection
    assert status_of(reply) == 431, reply[:200]
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["type"] == "HeadersTooLarge" and "limit of 64 KiB" in error["message"], error


def test_headers_past_the_cut_off_are_not_read_and_get_no_answer(served):
    with opened(served) as connection:
        try:
            connection.sendall(b"POST /echo HTTP/1.1\r\nX-Pad: " + b"x" * (2 << 20))
            reply = read_to_end(connection)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            reply = b""  # cut off mid-headers: the connection ends without a reply
    assert reply == b"", reply[:200]
