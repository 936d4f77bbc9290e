"""The status page's sign-in: session cookies and login codes on their own, then the whole flow
against a real `genmlx master` on loopback, as a browser and `genmlx ui` see it."""

from __future__ import annotations

import hmac
import http.client
import json
import os
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
from conftest import free_port, http_status, wait_until

import genmlx.master.api.ui_auth as ui_auth
from genmlx.master.api.ui_auth import LoginCodes, Sessions, same_origin, session_key


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ----- session cookies -----


def test_a_minted_session_is_valid_until_it_expires():
    clock = Clock()
    sessions = Sessions("the-token", clock, ttl_s=100)
    value = sessions.mint()
    assert sessions.valid(value)
    clock.now += 99
    assert sessions.valid(value)
    clock.now += 1
    assert not sessions.valid(value)


def test_a_session_survives_a_new_verifier_with_the_same_token_but_not_another_token():
    value = Sessions("the-token").mint()
    assert Sessions("the-token").valid(value)  # a restarted master
    assert not Sessions("another-token").valid(value)


def test_tampered_and_forged_sessions_are_refused():
    sessions = Sessions("the-token")
    expiry, nonce, mac = sessions.mint().split(".")
    later = str(int(expiry) + 10**6)
    assert not sessions.valid(f"{later}.{nonce}.{mac}")  # a longer life
    assert not sessions.valid(f"{expiry}.other{nonce}.{mac}")
    assert not sessions.valid(f"{expiry}.{nonce}.{'0' * len(mac)}")
    # Signed with the token itself rather than the derived key: refused.
    raw = hmac.new(b"the-token", f"{later}.{nonce}".encode(), "sha256").hexdigest()
    assert not sessions.valid(f"{later}.{nonce}.{raw}")
    for junk in (
        None,
        "",
        "a.b",
        "x.y.z",
        f"{expiry}.{nonce}",
        f"-1.{nonce}.{mac}",
        "9" * 300,
        f"\u00b2.{nonce}.{mac}",
    ):
        assert not sessions.valid(junk)


def test_the_session_key_is_derived_from_the_token_not_the_token():
    key = session_key("the-token")
    assert key != b"the-token" and b"the-token" not in key
    assert "the-token" not in Sessions("the-token").mint()


def test_macs_and_codes_are_compared_in_constant_time(monkeypatch):
    compared = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(ui_auth.hmac, "compare_digest", spy)
    sessions = Sessions("the-token")
    assert sessions.valid(sessions.mint())
    assert compared
    compared.clear()
    codes = LoginCodes()
    assert codes.redeem(codes.issue())
    assert compared


# ----- login codes -----


def test_a_code_works_once():
    codes = LoginCodes(Clock())
    code = codes.issue()
    assert codes.redeem(code)
    assert not codes.redeem(code)


def test_a_code_expires_after_its_time():
    clock = Clock()
    codes = LoginCodes(clock, ttl_s=60)
    early, late = codes.issue(), codes.issue()
    clock.now += 59
    assert codes.redeem(early)
    clock.now += 1
    assert not codes.redeem(late)
    assert codes.pending == {}


def test_unknown_codes_are_refused_and_codes_differ():
    codes = LoginCodes(Clock())
    issued = {codes.issue() for _ in range(20)}
    assert len(issued) == 20
    assert not codes.redeem(None) and not codes.redeem("") and not codes.redeem("guess")


# ----- same origin -----


@pytest.mark.e2e
def test_same_origin():
    host = "127.0.0.1:6789"
    assert same_origin({}, host)  # not a browser
    assert same_origin({"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:6789"}, host)
    assert same_origin({"Sec-Fetch-Site": "none"}, host)
    assert not same_origin({"Sec-Fetch-Site": "cross-site"}, host)
    assert not same_origin({"Sec-Fetch-Site": "same-site"}, host)
    assert not same_origin({"Origin": "http://evil.example"}, host)
    assert not same_origin({"Origin": "null"}, host)


# ----- the real master -----


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


class Master:
    """`genmlx master` on loopback; every reply is kept, to check none carries the token."""

    def __init__(self, spawn, token: str):
        self.spawn, self.token, self.port = spawn, token, free_port()
        self.replies: list[Reply] = []
        self.start()

    def start(self) -> None:
        args = ["-m", "genmlx", "master", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = self.spawn(args, "master")
        url = f"http://127.0.0.1:{self.port}/healthz"
        wait_until(lambda: http_status(url) == 200, 30, 0.1, what="the master to answer")

    def restart(self) -> None:
        self.proc.stop()
        self.start()

    def request(self, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            reply = Reply(response.status, response.headers, response.read())
        finally:
            connection.close()
        self.replies.append(reply)
        return reply

    def bearer(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def sign_in(self) -> str:
        """The login flow: the code with the token, the cookie for the code. Returns the cookie."""
        code = self.request("POST", "/api/v1/ui/login", self.bearer(), b"{}")
        assert code.status == 200, code.body
        assert code.json()["expiresIn"] == 60
        login = self.request("GET", code.json()["url"])
        assert login.status == 303 and login.headers["Location"] == "/"
        set_cookie = login.headers["Set-Cookie"]
        attributes = [a.strip().lower() for a in set_cookie.split(";")]
        assert "httponly" in attributes and "samesite=strict" in attributes and "path=/" in attributes
        assert f"max-age={7 * 24 * 3600}" in attributes
        assert "secure" not in attributes  # plain http on loopback
        return set_cookie.split(";")[0]

    def first_stream_event(self, headers: dict) -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", "/api/v1/stream", headers=headers)
            response = connection.getresponse()
            if response.status != 200:
                return response.status, response.read().decode()
            lines = []
            while (line := response.readline().decode()) not in ("\n", "\r\n", ""):
                lines.append(line)
            return response.status, "".join(lines)
        finally:
            connection.close()


@pytest.fixture
def master(spawn, token):
    return Master(spawn, token)


PAGE = {"Sec-Fetch-Site": "same-origin"}


@pytest.mark.e2e
def test_without_auth_the_data_is_refused_and_the_page_is_served_with_its_headers(master):
    paths = ("/api/v1/status", "/api/v1/events", "/api/v1/stream", "/api/v1/integrations", "/v1/models")
    for path in (*paths, "/api/v1/manifest"):
        assert master.request("GET", path).status == 401, path
    page = master.request("GET", "/")
    assert page.status == 200 and b"<html" in page.body.lower()
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert master.request("POST", "/api/v1/ui/login", body=b"{}").status == 401


@pytest.mark.e2e
def test_a_session_reads_status_events_the_stream_and_the_client_blocks_and_nothing_else(master):
    cookie = {"Cookie": master.sign_in(), **PAGE}
    status = master.request("GET", "/api/v1/status", cookie)
    assert status.status == 200 and "nodes" in status.json()
    assert master.request("GET", "/api/v1/events?limit=5", cookie).status == 200
    code, event = master.first_stream_event(cookie)
    assert code == 200 and event.startswith("event: status")
    blocks = master.request("GET", "/api/v1/integrations", cookie)
    assert blocks.status == 200 and b"$(genmlx token --show)" in blocks.body
    cross_site = {**cookie, "Sec-Fetch-Site": "cross-site"}
    assert master.request("GET", "/api/v1/integrations", cross_site).status == 401
    # Never for changes, the model API, or the manifest's text.
    assert master.request("POST", "/api/v1/manifest", cookie, b'{"manifest": ""}').status == 401
    assert master.request("GET", "/api/v1/manifest", cookie).status == 401
    assert master.request("GET", "/v1/models", cookie).status == 401
    assert master.request("POST", "/v1/chat/completions", cookie, b"{}").status == 401
    assert master.request("POST", "/api/v1/ui/login", cookie, b"{}").status == 401
    # Another origin cannot read with it either.
    assert master.request("GET", "/api/v1/status", {**cookie, "Sec-Fetch-Site": "cross-site"}).status == 401
    evil = {**cookie, "Origin": "http://evil.example"}
    assert master.request("GET", "/api/v1/status", evil).status == 401
    assert master.first_stream_event(evil)[0] == 401
    forged = {"Cookie": cookie["Cookie"][:-4] + "0000", **PAGE}
    assert master.request("GET", "/api/v1/status", forged).status == 401


@pytest.mark.e2e
def test_a_used_or_unknown_code_shows_how_to_sign_in(master):
    link = master.request("POST", "/api/v1/ui/login", master.bearer(), b"{}").json()["url"]
    assert master.request("GET", link).status == 303
    for path in (link, "/ui/login?code=guess", "/ui/login"):
        again = master.request("GET", path)
        assert again.status == 401 and "Set-Cookie" not in again.headers
        assert b"genmlx ui" in again.body


@pytest.mark.e2e
def test_a_session_outlives_a_master_restart(master):
    cookie = {"Cookie": master.sign_in(), **PAGE}
    master.restart()
    assert master.request("GET", "/api/v1/status", cookie).status == 200


@pytest.mark.e2e
def test_the_token_never_reaches_the_browser(master):
    cookie = {"Cookie": master.sign_in(), **PAGE}
    for path in ("/", "/ui/index.html", "/api/v1/status", "/api/v1/events", "/ui/login?code=used"):
        master.request("GET", path, cookie)
    for name in os.listdir(master_ui_root()):
        master.request("GET", f"/ui/{name}", cookie)
    _, event = master.first_stream_event(cookie)
    assert master.token not in event
    assert len(master.replies) > 6
    for reply in master.replies:
        assert master.token.encode() not in reply.body
        assert all(master.token not in value for value in reply.headers.values())


def master_ui_root():
    from genmlx.master.api.ui_handlers import ui_root

    return ui_root()


@pytest.mark.e2e
def test_paths_outside_the_page_are_refused(master):
    for path in ("/ui/../pyproject.toml", "/ui/%2e%2e/pyproject.toml", "/ui/..%2fpyproject.toml", "/ui/"):
        reply = master.request("GET", path)
        assert reply.status in (403, 404), path
        assert b"[project]" not in reply.body


@pytest.mark.e2e
def test_genmlx_ui_no_open_prints_a_working_link(master):
    env = {**os.environ, "GENMLX_MASTER": f"http://127.0.0.1:{master.port}"}
    command = [sys.executable, "-m", "genmlx", "ui", "--no-open"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    link = urlsplit(done.stdout.strip())
    assert link.netloc == f"127.0.0.1:{master.port}" and link.path == "/ui/login"
    assert master.token not in done.stdout
    login = master.request("GET", f"{link.path}?{link.query}")
    assert login.status == 303 and "genmlx_session=" in login.headers["Set-Cookie"]
