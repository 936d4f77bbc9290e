"""Where GenMLX keeps its state on a machine, and the cluster's token.

Everything lives under ``GENMLX_HOME`` (default ``~/.genmlx``). The token is a shared secret
that every agent and the master hold in a file readable only by their user; it never travels
in a manifest, never appears in a log and is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

TOKEN_BYTES = 32


def genmlx_home() -> Path:
    """The state directory: ``$GENMLX_HOME`` or ``~/.genmlx``."""
    return Path(os.environ.get("GENMLX_HOME") or "~/.genmlx").expanduser()


def default_token_path() -> Path:
    return genmlx_home() / "token"


def ensure_token(path: Path | None = None) -> tuple[Path, bool]:
    """Create the token file (mode 0600) if absent. Returns its path and whether it was created."""
    path = path or default_token_path()
    if path.exists():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(TOKEN_BYTES) + "\n")
    return path, True


def read_token(path: Path | None = None) -> str:
    """Read the token, raising ``AuthError`` with what to do when it is missing or empty."""
    from genmlx.core.errors import AuthError

    path = path or default_token_path()
    try:
        lines = path.read_text().split("\n", 1)  # a rotation keeps the old token on a second line
        token = lines[0].strip()
    except FileNotFoundError:
        raise AuthError(f"no token at {path}: run `genmlx token` to create one") from None
    if not token:
        raise AuthError(f"the token file {path} is empty: delete it and run `genmlx token`")
    return token


CLIENT_KEY_PREFIX = "gmx_"  # what tells a client key from the cluster token at a glance


def new_client_key() -> str:
    """A fresh client key (``gmx_`` and 43 URL-safe characters, 256 random bits)."""
    return CLIENT_KEY_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def client_key_digest(key: str) -> str:
    """The SHA-256 of a client key, in hex: what the manifest keeps instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_matches(header: str | None, token: str) -> bool:
    """Whether an ``x-api-key`` header (how Anthropic's clients send their key) carries ``token``,
    compared in constant time."""
    return header is not None and hmac.compare_digest(header.strip().encode(), token.encode())


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token``, compared in constant time."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token.encode())
