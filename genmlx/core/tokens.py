"""The cluster token over its lifetime: the token file with an older token beside the current one
while a rotation's grace window lasts, read again whenever it changes, and the sealed copy of a
new token the master pushes to agents.

The file's first line is the token (what every earlier version wrote, and all ``read_token``
reads). During a rotation a second line keeps the old token until a moment: ``previous TOKEN
until UNIX-SECONDS`` (and ``manual`` at its end when the new token is to be copied to the nodes by
hand, never pushed). ``TokenSource`` is how a process holds its token: it looks at the file's
modification time at most once a second and takes a new content at once, so a token copied onto a
node, or pushed by the master, is used without a restart; an older token counts only until its
moment.

A new token travels to an agent only sealed: AES-GCM (``cryptography``) under a key derived from the
signing key of the token the agent holds, bound to the agent's node name, inside a request signed
with that same key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from genmlx.core.files import write_whole
from genmlx.core.home import TOKEN_BYTES
from genmlx.core.signing import Keys

WRAP_LABEL = b"genmlx/token-wrap/v1"
JOIN_CODE_LABEL = "join-code"  # what a join code is sealed for, in the master's reply that carries it
TOKEN_FILE_ENV = "GENMLX_TOKEN_FILE"  # where a dispatcher rank finds the token file it follows
RECHECK_S = 1.0


class TokenFileError(Exception):
    """The token file cannot be read as one; the message says what to do."""


@dataclass(frozen=True)
class TokenFile:
    """The token, and the one it replaced while that one still counts."""

    current: str
    previous: str | None = None
    previous_until: float = 0.0  # unix time: the previous token counts until then
    manual: bool = False  # the rotation is distributed by hand: the master pushes nothing

    def tokens(self, now: float) -> tuple[str, ...]:
        """The tokens that count at ``now``: the current one first."""
        if self.previous is not None and now < self.previous_until:
            return (self.current, self.previous)
        return (self.current,)

    def text(self) -> str:
        lines = [self.current]
        if self.previous is not None:
            manual = " manual" if self.manual else ""
            lines.append(f"previous {self.previous} until {int(self.previous_until)}{manual}")
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str, path: Path) -> TokenFile:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise TokenFileError(f"the token file {path} is empty: delete it and run `genmlx token`")
        if len(lines) == 1:
            return cls(lines[0])
        words = lines[1].split()
        shaped = len(words) in (4, 5) and (words[0], words[2]) == ("previous", "until")
        if not shaped or not words[3].isdigit():
            raise TokenFileError(
                f"{path}: its second line must be 'previous TOKEN until UNIX-SECONDS [manual]' "
                "(what `genmlx token rotate` writes)"
            )
        return cls(lines[0], words[1], float(words[3]), manual=words[4:] == ["manual"])


def read_token_file(path: Path) -> TokenFile:
    try:
        return TokenFile.parse(path.read_text(), path)
    except FileNotFoundError:
        raise TokenFileError(f"no token at {path}: run `genmlx token` to create one") from None


def write_token_file(path: Path, tokens: TokenFile) -> None:
    """Replace the token file at once (readable by its owner alone): a reader never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, tokens.text(), mode=0o600)


class TokenSource:
    """A process's token: fixed, or its token file's, followed as the file changes."""

    def __init__(self, path: Path | None = None, fixed: str | None = None):
        if (path is None) == (fixed is None):
            raise ValueError("a token source is a file or a fixed token")
        self.path = path
        self._file = TokenFile(fixed) if fixed is not None else read_token_file(path)
        self._stamp = self._modified()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def fixed(cls, token: str) -> TokenSource:
        return cls(fixed=token)

    def _modified(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns if self.path else None
        except FileNotFoundError:
            return None

    def current(self, recheck: bool = False) -> TokenFile:
        """The file as it is now (looked at again at most once a second, or now with ``recheck``; a
        file that cannot be read keeps what was read last)."""
        with self._lock:
            now = time.monotonic()
            if self.path is not None and (recheck or now - self._checked >= RECHECK_S):
                self._checked = now
                stamp = self._modified()
                if stamp != self._stamp:
                    self._stamp = stamp
                    with contextlib.suppress(TokenFileError):  # half-copied: keep what was read
                        self._file = read_token_file(self.path)
            return self._file

    @property
    def token(self) -> str:
        return self.current().current

    def keys(self) -> Keys:
        """The signing key of the token, and those of any older token that still counts."""
        return Keys.of(*self.current().tokens(time.time()))


def wrap_key(key: bytes) -> bytes:
    """The key a new token is sealed with, for a holder of the signing ``key``."""
    return hmac.new(key, WRAP_LABEL, hashlib.sha256).digest()


def seal_token(new_token: str, holder_key: bytes, node: str) -> dict[str, str]:
    """``new_token`` sealed for the agent of ``node`` that holds ``holder_key``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(12)
    sealed = AESGCM(wrap_key(holder_key)).encrypt(nonce, new_token.encode(), node.encode())
    return {"nonce": base64.b64encode(nonce).decode(), "sealed": base64.b64encode(sealed).decode()}


def unseal_token(document: dict, holder_key: bytes, node: str) -> str:
    """The token ``seal_token`` sealed; ``ValueError`` when it was not sealed for us."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        nonce, sealed = base64.b64decode(document["nonce"]), base64.b64decode(document["sealed"])
        return AESGCM(wrap_key(holder_key)).decrypt(nonce, sealed, node.encode()).decode()
    except (KeyError, TypeError, ValueError, InvalidTag):
        raise ValueError("the sealed token does not open with this node's key") from None


def rotated(tokens: TokenFile, grace_s: float, manual: bool, now: float) -> TokenFile:
    """A new token, with the current one kept for ``grace_s`` seconds."""
    return TokenFile(secrets.token_urlsafe(TOKEN_BYTES), tokens.current, now + grace_s, manual)
