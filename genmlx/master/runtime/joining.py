"""Joining a new node: one-time join codes, and the package a new node installs.

``genmlx join-command`` asks the master for a code (``JoinCodes.issue``; the reply carries it
sealed under the asking request's key, so it crosses the network unread) and prints the line a
new machine runs. The code is a secret of its own, worth one exchange within its lifetime: the
new node signs its request with the code's key (``genmlx.core.signing``, as if the code were a
token), so the code itself never travels, and the master answers with the cluster token sealed
under that key (``genmlx.core.tokens.seal_token``). Whoever watches the network sees neither the
code nor the token; whoever answers in the master's place cannot seal a token the node opens.

The master also serves the genmlx it runs as a wheel (``own_wheel``), which the printed line
installs pinned to its SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlsplit

from genmlx.core.errors import GenMLXError
from genmlx.core.signing import Keys

CODE_PREFIX = "gmxj_"
CODE_BYTES = 24  # 192 random bits: nothing to guess, and nothing to brute-force from a sealed reply
DEFAULT_TTL_S = 900.0
MAX_TTL_S = 86400.0
MAX_OPEN_CODES = 64


class PackageUnavailable(GenMLXError):
    """The master cannot find or build a wheel of the genmlx it runs."""


@dataclass
class JoinCode:
    code: str
    expires: float
    name: str | None  # the node name it was issued for, if one was given

    @property
    def keys(self) -> Keys:
        return Keys.of(self.code)


@dataclass(frozen=True)
class JoinedNode:
    """A node that joined with a code: where its agent listens and what it keeps models in."""

    name: str
    address: str  # "ip:port" of its agent, as the master saw it join
    storage: tuple[str, ...]
    at: float


@dataclass
class JoinCodes:
    """The codes issued and not yet used, and the nodes that joined (kept in memory: a code does
    not outlive the master that issued it)."""

    clock: object = time.time
    _open: dict[str, JoinCode] = field(default_factory=dict)  # key id -> code
    joined: dict[str, JoinedNode] = field(default_factory=dict)

    def issue(self, name: str | None = None, ttl_s: float = DEFAULT_TTL_S) -> JoinCode:
        self._forget_expired()
        if len(self._open) >= MAX_OPEN_CODES:
            oldest = min(self._open, key=lambda k: self._open[k].expires)
            del self._open[oldest]
        code = JoinCode(CODE_PREFIX + secrets.token_urlsafe(CODE_BYTES), self.clock() + ttl_s, name)
        self._open[code.keys.signing_id] = code
        return code

    def find(self, key_id: str) -> JoinCode | None:
        """The open code whose key signed a request, if it has not expired."""
        self._forget_expired()
        return self._open.get(key_id)

    def use(self, code: JoinCode, node: JoinedNode) -> None:
        """``code`` is spent; ``node`` joined with it."""
        self._open.pop(code.keys.signing_id, None)
        self.joined[node.name] = node

    def _forget_expired(self) -> None:
        now = self.clock()
        for key_id in [k for k, c in self._open.items() if c.expires <= now]:
            del self._open[key_id]


# ----- the package -----


@dataclass(frozen=True)
class Wheel:
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


def own_wheel(cache_dir: Path) -> Wheel:
    """A wheel of the genmlx this process runs: built from its source checkout (an editable
    install, with hatchling, its build backend: the same files give the same wheel), or the wheel
    it was installed from where that is still there."""
    try:
        distribution = metadata.distribution("genmlx")
    except metadata.PackageNotFoundError:
        raise PackageUnavailable("genmlx is not installed as a package here") from None
    origin = json.loads(distribution.read_text("direct_url.json") or "{}")
    location = Path(unquote(urlsplit(origin.get("url", "")).path)) if origin.get("url") else None
    if origin.get("dir_info", {}).get("editable") and location and (location / "pyproject.toml").is_file():
        return build_wheel(location, cache_dir)
    if location and location.suffix == ".whl" and location.is_file():
        return Wheel(location, file_sha256(location))
    raise PackageUnavailable(
        f"genmlx {distribution.version} was installed from neither a source checkout nor a wheel "
        "that is still here: the master has no package to give a new node"
    )


def build_wheel(source: Path, cache_dir: Path) -> Wheel:
    from hatchling.builders.wheel import WheelBuilder

    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        (built,) = WheelBuilder(str(source)).build(directory=scratch, versions=["standard"])
        target = cache_dir / Path(built).name
        shutil.move(built, target)
    return Wheel(target, file_sha256(target))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
