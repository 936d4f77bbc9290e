"""Signed requests and replies: how GenMLX's processes prove to each other that they hold the
cluster token without ever sending it.

A request carries ``Authorization: GenMLX-HMAC-SHA256 key=<id>, ts=<unix>, nonce=<random>,
sig=<hex>``: an HMAC-SHA256, keyed by a key derived from the token (``signing_key``), over the
method, the host it was sent to, its path and query, the timestamp, the nonce and the SHA-256 of
its body. The receiver refuses a timestamp more than ``WINDOW_S`` away from its clock and a nonce
it has already seen within that window (``ReplayGuard``), so a captured request is worth nothing
later, and one changed in any signed part fails. Because the host is signed, a request sent to an
impostor cannot be relayed to the real node under the impostor's address (``host_is_ours``).

The reply to a signed request carries ``GenMLX-Reply-Signature: key=<id>, sig=<hex>``: the
receiver's HMAC over the request's nonce, the reply's status and its body's SHA-256 (or the word
``stream`` for a reply sent in pieces, whose content the sender checks otherwise), so the sender
knows its request reached a holder of the token. ``key`` names a key by a digest of it, never the
key, so a receiver can hold the keys of a new and an old token at once. Standard library only:
``hmac``, ``hashlib`` and ``secrets``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

SCHEME = "GenMLX-HMAC-SHA256"
REPLY_HEADER = "GenMLX-Reply-Signature"
WINDOW_S = 60  # how far a request's timestamp may be from the receiver's clock, either way
STREAMED = "stream"  # the body digest of a reply that is sent in pieces
_KEY_LABEL = b"genmlx/request-signing/v1"
_KEY_ID_LABEL = b"genmlx/key-id/v1"
_FIELD = re.compile(r"\s*([a-z]+)=([A-Za-z0-9_\-]{1,128})\s*")


class SignatureError(Exception):
    """A signed request or reply that does not hold; the message says what, never a secret."""


# How a receiver says that a request was signed with a key it does not hold, so that a sender that
# holds two tokens (a rotation's grace) can try the other.
KEY_NOT_HELD = "signed with a key this process does not hold"


def signing_key(token: str) -> bytes:
    """The key requests are signed with: derived from the token, so the token itself never signs."""
    return hmac.new(token.encode(), _KEY_LABEL, hashlib.sha256).digest()


def key_id(key: bytes) -> str:
    """A short public name of a key (a digest of it), so a receiver knows which key to check with."""
    return hashlib.sha256(_KEY_ID_LABEL + key).hexdigest()[:16]


def body_digest(body: bytes | None) -> str:
    return hashlib.sha256(body or b"").hexdigest()


@dataclass(frozen=True)
class Keys:
    """The signing keys a process holds: the one it signs with first, then any it still accepts."""

    signing: bytes
    accepted: tuple[bytes, ...] = ()

    @classmethod
    def of(cls, token: str, *older_tokens: str) -> Keys:
        return cls(signing_key(token), tuple(signing_key(t) for t in older_tokens))

    @property
    def signing_id(self) -> str:
        return key_id(self.signing)

    def preferring(self, wanted_id: str) -> Keys:
        """These keys, signing with the one of ``wanted_id`` where it is held (a peer that still
        holds an older token during a rotation), else as they are."""
        held = (self.signing, *self.accepted)
        first = next((key for key in held if key_id(key) == wanted_id), self.signing)
        return Keys(first, tuple(key for key in held if key != first))

    def each(self) -> tuple[Keys, ...]:
        """These keys with each one signing in turn, this order's first first."""
        return tuple(self.preferring(key_id(key)) for key in (self.signing, *self.accepted))

    def find(self, wanted_id: str) -> bytes | None:
        for key in (self.signing, *self.accepted):
            if hmac.compare_digest(key_id(key), wanted_id):
                return key
        return None


@dataclass(frozen=True)
class RequestSignature:
    """The fields of a signed request's ``Authorization`` header."""

    key_id: str
    timestamp: int
    nonce: str
    signature: str

    def header(self) -> str:
        return f"{SCHEME} key={self.key_id}, ts={self.timestamp}, nonce={self.nonce}, sig={self.signature}"


def request_text(method: str, host: str, target: str, timestamp: int, nonce: str, digest: str) -> bytes:
    """What a request's signature covers, one field a line."""
    fields = ("genmlx-request/1", method.upper(), host.lower(), target, str(timestamp), nonce, digest)
    return "\n".join(fields).encode()


def sign_request(
    keys: Keys, method: str, host: str, target: str, body: bytes | None, now: float | None = None
) -> RequestSignature:
    """Sign a request to ``host`` ("name:port", as its Host header says) for ``target`` (path and
    query) with a fresh nonce."""
    timestamp = int(time.time() if now is None else now)
    nonce = secrets.token_urlsafe(18)
    text = request_text(method, host, target, timestamp, nonce, body_digest(body))
    signature = hmac.new(keys.signing, text, hashlib.sha256).hexdigest()
    return RequestSignature(keys.signing_id, timestamp, nonce, signature)


def parse_signature(header: str | None) -> RequestSignature | None:
    """The signature an ``Authorization`` header carries; None when it is of another scheme. A
    header of this scheme that is malformed raises ``SignatureError``."""
    if not header or not header.startswith(SCHEME + " "):
        return None
    fields = _fields(header[len(SCHEME) + 1 :])
    try:
        return RequestSignature(fields["key"], int(fields["ts"]), fields["nonce"], fields["sig"])
    except (KeyError, ValueError):
        raise SignatureError("a signed request needs key, ts, nonce and sig") from None


def _fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in text.split(","):
        match = _FIELD.fullmatch(part)
        if match is None or match[1] in fields:
            raise SignatureError("the signature header is malformed")
        fields[match[1]] = match[2]
    return fields


class ReplayGuard:
    """The nonces of the requests accepted within the window: each is good once. Bounded, oldest
    forgotten first; a request older than the window is refused by its timestamp anyway."""

    def __init__(self, window_s: int = WINDOW_S, capacity: int = 200_000):
        self.window_s = window_s
        self._capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it stops mattering

    def first_use(self, nonce: str, now: float) -> bool:
        while self._seen and (next(iter(self._seen.values())) < now or len(self._seen) >= self._capacity):
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now + 2 * self.window_s
        return True


def verify_request(
    keys: Keys,
    signature: RequestSignature,
    method: str,
    host: str,
    target: str,
    body: bytes | None,
    guard: ReplayGuard,
    now: float | None = None,
) -> bytes:
    """The key a request was signed with, or ``SignatureError`` saying why it is refused."""
    now = time.time() if now is None else now
    key = keys.find(signature.key_id)
    if key is None:
        raise SignatureError(f"{KEY_NOT_HELD} (another or an old cluster token)")
    if abs(now - signature.timestamp) > guard.window_s:
        raise SignatureError(f"its timestamp is more than {guard.window_s} s from this machine's clock")
    text = request_text(method, host, target, signature.timestamp, signature.nonce, body_digest(body))
    expected = hmac.new(key, text, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature.signature):
        raise SignatureError("the signature does not match the request")
    if not guard.first_use(signature.nonce, now):
        raise SignatureError("this request was already received once (a replay)")
    return key


def reply_text(nonce: str, status: int, digest: str) -> bytes:
    return "\n".join(("genmlx-reply/1", nonce, str(status), digest)).encode()


def sign_reply(key: bytes, nonce: str, status: int, body: bytes | None, streamed: bool = False) -> str:
    """The reply signature header's value for the request of ``nonce``: over the body, or (a reply
    sent in pieces, ``streamed``) over the status alone."""
    digest = STREAMED if streamed else body_digest(body)
    signature = hmac.new(key, reply_text(nonce, status, digest), hashlib.sha256).hexdigest()
    scope = "stream" if streamed else "body"
    return f"key={key_id(key)}, scope={scope}, sig={signature}"


def reply_covers_body(header: str | None) -> bool:
    """Whether a reply's signature covers its body (else only its status: a streamed reply)."""
    try:
        return bool(header) and _fields(header).get("scope") == "body"
    except SignatureError:
        return False


def check_reply(keys: Keys, nonce: str, status: int, header: str | None, body: bytes | None = None) -> None:
    """Nothing when the reply to the request of ``nonce`` was signed by a holder of one of ``keys``;
    else ``SignatureError`` saying what was wrong. A signature over the body needs the ``body``."""
    if not header:
        raise SignatureError("the reply is not signed")
    fields = _fields(header)
    key = keys.find(fields.get("key", ""))
    if key is None or "sig" not in fields:
        raise SignatureError("the reply is signed with no key of this cluster")
    if fields.get("scope") == "body":
        if body is None:
            raise SignatureError("the reply is signed over a body that was not read")
        digest = body_digest(body)
    elif fields.get("scope") == "stream":
        digest = STREAMED
    else:
        raise SignatureError("the reply's signature names no scope")
    expected = hmac.new(key, reply_text(nonce, status, digest), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, fields["sig"]):
        raise SignatureError("the reply's signature does not match it")


def signed_headers(keys: Keys, method: str, url: str, body: bytes | None) -> tuple[dict[str, str], str]:
    """The ``Host`` and ``Authorization`` headers of a signed request to ``url``, and its nonce
    (which the reply's signature names). The Host is sent as signed, whatever the HTTP client
    would have written."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    signature = sign_request(keys, method, parts.netloc, target, body)
    return {"Host": parts.netloc, "Authorization": signature.header()}, signature.nonce


def host_is_ours(host: str, own_addresses: Iterable[str]) -> bool:
    """Whether a request's Host names this machine: any name, or an IP address of its own (or
    loopback). A signed request that names another machine's IP was relayed here by whoever
    received it, and is refused."""
    try:
        address = ipaddress.ip_address(host_without_port(host))
    except ValueError:
        return True  # a name: which addresses it stands for is the resolver's business
    return address.is_loopback or str(address) in set(own_addresses)


def host_without_port(host: str) -> str:
    if host.startswith("["):  # [v6]:port
        return host[1 : host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
