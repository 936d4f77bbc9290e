"""Talking to a peer agent: its address, signed requests over one ``http.client`` connection, its
signed replies checked, and what its failures mean (``PeerRefused``: it answered no, permanently;
``PeerUnreachable``: no answer, a 5xx or a dropped connection, worth another try)."""

from __future__ import annotations

import http.client
import json
import re
from dataclasses import dataclass, field

from genmlx.core.errors import PermanentError, TemporaryError
from genmlx.core.signing import REPLY_HEADER, Keys, SignatureError, check_reply, signed_headers

PEER_TIMEOUT_S = 60.0
PEER_ADDRESS = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:/\[\]]+)):(?P<port>\d{1,5})")


class PeerRefused(PermanentError):
    """The peer answered, but refused: wrong token, no such model or file, its copy is corrupt."""


class PeerUnreachable(TemporaryError):
    """The peer did not answer, failed (5xx), or the connection dropped mid-file."""


@dataclass(frozen=True)
class Peer:
    """Another agent, and the cluster token to show it."""

    host: str
    port: int
    token: str = field(repr=False)

    @classmethod
    def parse(cls, address: str, token: str) -> Peer:
        """From "host:port" or "[v6 address]:port"; raises ``PeerRefused`` for anything else."""
        match = PEER_ADDRESS.fullmatch(address)
        if match is None or not 0 < int(match["port"]) < 65536:
            raise PeerRefused(f"peer: {address!r} is not a host:port address")
        return cls(match["ipv6"] or match["host"], int(match["port"]), token)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def send(
    connection: http.client.HTTPConnection, peer: Peer, path: str, headers: dict[str, str]
) -> SignedReply:
    """GET ``path`` from the peer, signed; the reply and the nonce its signature must name."""
    keys = Keys.of(peer.token)
    signed, nonce = signed_headers(keys, "GET", f"http://{peer}{path}", None)
    try:
        connection.request("GET", path, headers={**headers, **signed})
        return SignedReply(connection.getresponse(), keys, nonce)
    except (OSError, http.client.HTTPException) as e:
        raise PeerUnreachable(f"peer {peer} did not answer: {e or type(e).__name__}") from None


@dataclass(frozen=True)
class SignedReply:
    """A peer's reply to a signed request: ``checked`` it, with its body where the signature covers
    it (a file's bytes are checked against the listing's sha256 instead)."""

    response: http.client.HTTPResponse
    keys: Keys
    nonce: str

    def checked(self, peer: Peer, body: bytes | None = None) -> None:
        header = self.response.getheader(REPLY_HEADER)
        try:
            check_reply(self.keys, self.nonce, self.response.status, header, body)
        except SignatureError as e:
            raise PeerRefused(f"what answers at {peer} is not an agent of this cluster: {e}") from None


def raise_for_status(reply: SignedReply, peer: Peer, what: str) -> None:
    """Nothing for 200 and 206; ``PeerUnreachable`` for 5xx; ``PeerRefused`` with the peer's own
    message for anything else (a refusal of our signature is not signed; any other is checked)."""
    response = reply.response
    if response.status in (200, 206):
        return
    body = response.read()
    if response.status != 401:
        reply.checked(peer, body)
    message = error_message(body)
    if response.status >= 500:
        raise PeerUnreachable(f"peer {peer} failed to send {what} (HTTP {response.status}): {message}")
    if response.status == 401:
        message = f"it refused our signature (do both agents hold the same cluster token?): {message}"
    raise PeerRefused(f"peer {peer} refused {what} (HTTP {response.status}): {message}")


def error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")
