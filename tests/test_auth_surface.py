"""Every endpoint of a running master, agent and dispatcher (``genmlx demo``), enumerated from their
route tables rather than listed by hand, refuses a request without valid credentials — whatever
its Authorization header holds: nothing, empty, huge, non-ASCII, two of them, another scheme, a
forged or foreign signature — with a 401 (or a 400 for a header HTTP itself forbids) that reveals
nothing, and never a 500. Only the documented liveness checks and the status page's files answer
without one (the page's sign-in takes a one-time code, and refuses every bad credential here)."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from conftest import free_port, signed, wait_until

from genmlx.core.http import ApiHandler
from genmlx.core.signing import Keys, sign_request

pytestmark = pytest.mark.e2e

# The endpoints that answer without credentials, by route pattern: the liveness checks, and the
# status page's files (no data in them).
OPEN = {
    # /join/package: the wheel of genmlx the master offers joining nodes (no secret in it; the line
    # that installs it pins its SHA-256).
    "master": {"/healthz$", "/()$", "/ui/(.+)$", "/join/package/([^/]+)$"},
    "agent": {"/healthz$"},
    "dispatcher": {"/health$"},
}
METHODS = ("GET", "POST", "DELETE")


def route_tables() -> dict[str, list[tuple[str, type]]]:
    """(pattern, handler) of every route of each process, from the applications they build."""
    from genmlx.agent.api.server import make_app as agent_app
    from genmlx.dispatcher.api.app import make_app as dispatcher_app
    from genmlx.master.api.server import make_app as master_app

    apps = {
        "master": master_app(None, "t", None),
        "agent": agent_app(
            name="n", token="t", storage_paths=(), supervisor=None, transfers=None, verified=None
        ),
        "dispatcher": dispatcher_app(
            model_id="m", engine=None, started_at=0, metrics=None, prompt_cache=None, token="t"
        ),
    }
    tables = {}
    for name, app in apps.items():
        rules = app.wildcard_router.rules
        tables[name] = [(rule.matcher.regex.pattern, rule.target) for rule in rules]
        if "default_handler_class" in app.settings:  # else tornado's own bare 404
            tables[name].append(("/no/such/endpoint$", app.settings["default_handler_class"]))
    return tables


def sample_path(pattern: str) -> str:
    """A path the route's pattern matches, its groups filled in."""
    path = pattern.removesuffix("$")
    path = re.sub(r"\(\?:([^()]*)\)\?", r"\1", path)  # optional literal parts: taken
    path = re.sub(r"\(\?:/\((?:\.\+|\[\^/\]\+)\)\)\?", "/x", path)  # an optional /{id}
    path = re.sub(r"\(\[0-9\]\+\)", "0", path)
    path = re.sub(r"\((?:\.\+|\[\^/\]\+|\.\*)\)", "x", path)
    path = re.sub(r"\(([A-Za-z_/]*)\)", r"\1", path)
    path = path.replace(".*", "x")
    assert re.fullmatch(pattern, path), f"no sample path for the route {pattern!r}: teach sample_path"
    return path


def raw_request(port: int, method: str, path: str, header_lines: list[bytes]) -> tuple[int, bytes]:
    """One HTTP/1.1 request with exactly these header lines, sent as bytes; status and body."""
    body = b"{}" if method == "POST" else b""
    head = [f"{method} {path} HTTP/1.1".encode(), f"Host: 127.0.0.1:{port}".encode(), *header_lines]
    head += [b"Content-Type: application/json", f"Content-Length: {len(body)}".encode(), b"Connection: close"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def bad_credentials(token: str, port: int, path: str) -> dict[str, list[bytes]]:
    foreign = sign_request(Keys.of("another-cluster"), "GET", f"127.0.0.1:{port}", path, b"").header()
    genuine = sign_request(Keys.of(token), "GET", f"127.0.0.1:{port}", path, b"").header()
    forged = re.sub(r"sig=[0-9a-f]+", "sig=" + "0" * 64, genuine)
    return {
        "none": [],
        "empty": [b"Authorization: "],
        "huge": [b"Authorization: Bearer " + b"A" * 40_000],
        "non-ASCII": ["Authorization: Bearer tökén-✓".encode()],
        "latin-1 bytes": [b"Authorization: Bearer \xff\xfe"],
        "two headers": [b"Authorization: Bearer wrong", b"Authorization: Bearer wrong-too"],
        "another scheme": [f"Authorization: Basic {token}".encode()],
        "token without scheme": [f"Authorization: {token}".encode()],
        "malformed signature": [b"Authorization: GenMLX-HMAC-SHA256 key=, ts=x"],
        "foreign signature": [f"Authorization: {foreign}".encode()],
        "forged signature": [f"Authorization: {forged}".encode()],
        "x-api-key wrong": [b"x-api-key: wrong"],
        "cookie": [b"Cookie: genmlx_session=forged.value"],
    }


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """``genmlx demo``: a master, an agent and a dispatcher on loopback, and their ports."""
    import os
    import subprocess
    import sys
    import urllib.request

    from genmlx.core.home import ensure_token, read_token

    home = tmp_path_factory.mktemp("home")
    token = read_token(ensure_token(home / "token")[0])
    port, agent_port = free_port(), free_port()
    log = open(home / "demo.log", "w")  # noqa: SIM115 - closed below
    demo = subprocess.Popen(
        [sys.executable, "-m", "genmlx", "demo", "--port", str(port), "--agent-port", str(agent_port)],
        env={**os.environ, "GENMLX_HOME": str(home)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: "Ctrl-C stops" in Path(log.name).read_text(), 180, what="the demo to serve")
        url = f"http://127.0.0.1:{port}/api/v1/status"
        with urllib.request.urlopen(urllib.request.Request(url, headers=signed(token, "GET", url))) as reply:
            endpoint = json.loads(reply.read())["models"][0]["endpoint"]
        dispatcher_port = int(endpoint.split(":")[2].split("/")[0])
        yield {"token": token, "master": port, "agent": agent_port, "dispatcher": dispatcher_port}
    finally:
        demo.terminate()
        demo.wait(30)
        log.close()


@pytest.mark.parametrize("process", ["master", "agent", "dispatcher"])
def test_every_endpoint_refuses_every_bad_credential_and_never_fails(running, process: str) -> None:
    token, port = running["token"], running[process]
    table = route_tables()[process]
    assert {pattern for pattern, _ in table} >= OPEN[process], "an open endpoint is gone: update OPEN"
    checked = 0
    for pattern, handler in table:
        if pattern in OPEN[process]:
            continue
        # Our API handlers check credentials first; the page's sign-in (GET only) may say 405.
        refusals = (400, 401) if issubclass(handler, ApiHandler) else (400, 401, 405)
        path = sample_path(pattern)
        for method in METHODS:
            for what, lines in bad_credentials(token, port, path).items():
                status, body = raw_request(port, method, path, lines)
                assert status in refusals, (process, method, path, what, status, body[:200])
                assert token.encode() not in body and len(body) < 2048, (process, method, path, what)
                checked += 1
    assert checked >= len(METHODS) * 13


@pytest.mark.parametrize("process", ["master", "agent", "dispatcher"])
def test_only_the_documented_endpoints_answer_without_credentials(running, process: str) -> None:
    port = running[process]
    for pattern, handler in route_tables()[process]:
        status, _ = raw_request(port, "GET", sample_path(pattern), [])
        if pattern in OPEN[process]:
            assert status != 401, (process, pattern)
        else:
            assert status == 401, (process, pattern, handler.__name__)
