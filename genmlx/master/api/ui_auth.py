"""How the status page signs in without ever holding the cluster token.

``genmlx ui`` (which has the token) asks the master for a one-time login code; the browser trades
the code for a session cookie. The cookie is stateless, ``{expiry}.{nonce}.{mac}``, its mac an
HMAC-SHA256 keyed by a key derived from the token (never the token itself), so it survives master
restarts and dies with a new token. A session only reads: the handlers decide where it counts.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from tornado.httputil import HTTPHeaders, HTTPServerRequest

COOKIE_NAME = "genmlx_session"
SESSION_TTL_S = 7 * 24 * 3600
CODE_TTL_S = 60.0
KEY_LABEL = b"genmlx ui session v1"
MAX_PENDING_CODES = 64


def session_key(token: str) -> bytes:
    """The key sessions are signed with: derived from the token, so the token never signs."""
    return hmac.new(token.encode(), KEY_LABEL, hashlib.sha256).digest()


def _mac(key: bytes, payload: str) -> str:
    return hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


class Sessions:
    """Mints and verifies session cookie values; ``clock`` is wall time (cookies outlive processes)."""

    def __init__(self, token: str, clock: Callable[[], float] = time.time, ttl_s: int = SESSION_TTL_S):
        self.key = session_key(token)
        self.clock = clock
        self.ttl_s = ttl_s

    def mint(self) -> str:
        payload = f"{int(self.clock()) + self.ttl_s}.{secrets.token_urlsafe(16)}"
        return f"{payload}.{_mac(self.key, payload)}"

    def valid(self, value: str | None) -> bool:
        if not value or len(value) > 256:
            return False
        parts = value.split(".")
        if len(parts) != 3 or not (parts[0].isascii() and parts[0].isdigit()):
            return False
        expected = _mac(self.key, f"{parts[0]}.{parts[1]}")
        if not hmac.compare_digest(expected.encode(), parts[2].encode()):
            return False
        return int(parts[0]) > self.clock()

    def accepts(self, request: HTTPServerRequest) -> bool:
        """Whether ``request`` carries a valid session cookie and comes from our own origin."""
        cookie = request.cookies.get(COOKIE_NAME)
        return cookie is not None and self.valid(cookie.value) and same_origin(request.headers, request.host)


class LoginCodes:
    """One-time codes, each good once and for ``ttl_s`` seconds, kept only in this process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, ttl_s: float = CODE_TTL_S):
        self.clock = clock
        self.ttl_s = ttl_s
        self.pending: dict[str, float] = {}

    def issue(self) -> str:
        self._forget_expired()
        while len(self.pending) >= MAX_PENDING_CODES:
            self.pending.pop(next(iter(self.pending)))
        code = secrets.token_urlsafe(24)
        self.pending[code] = self.clock() + self.ttl_s
        return code

    def redeem(self, code: str | None) -> bool:
        """Whether ``code`` is pending and unexpired; either way it is good no more."""
        self._forget_expired()
        if not code:
            return False
        match = next((c for c in list(self.pending) if hmac.compare_digest(c.encode(), code.encode())), None)
        if match is None:
            return False
        return self.pending.pop(match) > self.clock()

    def _forget_expired(self) -> None:
        now = self.clock()
        for code in [c for c, expiry in self.pending.items() if expiry <= now]:
            del self.pending[code]


def same_origin(headers: HTTPHeaders | dict[str, str], host: str) -> bool:
    """A request the browser says came from our own page (or says nothing: not a browser).
    ``Sec-Fetch-Site`` when present must be ``same-origin`` (or ``none``: typed in the address
    bar); an ``Origin`` when present must name ``host``."""
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = headers.get("Origin")
    if origin is not None:
        if origin == "null":
            return False
        return urlsplit(origin).netloc.lower() == host.lower()
    return True
