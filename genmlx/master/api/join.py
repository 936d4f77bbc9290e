"""Joining a node over HTTP (``genmlx.master.runtime.joining`` says how the code protects it):

- ``POST /api/v1/join-codes`` (token): a one-time code, and the package a new node installs.
- ``POST /api/v1/join``, signed with the code's key (the code itself never travels): the
  cluster token, sealed under that key; the reply is signed with it too. The node then counts as
  found (at the address it joined from and the port it names) and shows as unmanaged until the
  manifest declares it.
- ``GET /join/package/FILE``: the wheel of the genmlx the master runs. Open: it holds no secret,
  and the line that installs it pins its SHA-256.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from genmlx.core.errors import Forbidden, InvalidRequest, Unauthorized, UnknownRoute
from genmlx.core.http import ApiHandler, ClusterAuth
from genmlx.core.signing import SignatureError, host_is_ours, parse_signature, verify_request
from genmlx.core.tokens import JOIN_CODE_LABEL, seal_token
from genmlx.manifest.types import NAME
from genmlx.master.runtime.discovery import DiscoveredAgent
from genmlx.master.runtime.joining import (
    DEFAULT_TTL_S,
    MAX_TTL_S,
    JoinCodes,
    JoinedNode,
    PackageUnavailable,
    Wheel,
    own_wheel,
)
from genmlx.master.runtime.loop import Reconciler

MAX_STORAGE_PATHS = 16
INVALID_CODE = (
    "This join code is not valid: each works once, for the minutes `genmlx join-command` said. "
    "Run `genmlx join-command` on the master's machine for a new one."
)


class Joining:
    """What the join endpoints share: the codes, the packages offered, the reconciler told."""

    def __init__(self, reconciler: Reconciler, package_dir: Path):
        self.codes = JoinCodes()
        self.reconciler = reconciler
        self.package_dir = package_dir
        self.packages: dict[str, Wheel] = {}


class JoinCodesHandler(ApiHandler):
    def initialize(self, auth: ClusterAuth, joining: Joining) -> None:
        super().initialize(auth)
        self.joining = joining

    async def post(self) -> None:
        if self.signed_by is None:  # a bearer token: nothing to seal the code under
            raise InvalidRequest("Ask for a join code with a signed request: `genmlx join-command`.")
        body = self.json_body()
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or not NAME.match(name)):
            raise InvalidRequest(
                "name must be a node name: lowercase letters, digits, '.', '_', '-'", param="name"
            )
        ttl = body.get("ttlSeconds", DEFAULT_TTL_S)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 60 <= ttl <= MAX_TTL_S:
            raise InvalidRequest(f"ttlSeconds must be from 60 to {MAX_TTL_S:.0f}", param="ttlSeconds")
        package = None
        try:  # building the wheel takes a moment: off the event loop
            wheel = await asyncio.get_running_loop().run_in_executor(
                None, own_wheel, self.joining.package_dir
            )
            self.joining.packages[wheel.name] = wheel
            package = {"file": wheel.name, "sha256": wheel.sha256, "path": f"/join/package/{wheel.name}"}
        except PackageUnavailable as e:
            package = {"unavailable": str(e)}
        code = self.joining.codes.issue(name, float(ttl))
        expires = (
            datetime.fromtimestamp(code.expires, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        )
        sealed = seal_token(code.code, self.signed_by, JOIN_CODE_LABEL)  # the code is a secret too
        self.write_json(200, {"code": sealed, "expires": expires, "name": name, "package": package})


class JoinHandler(ApiHandler):
    """Takes a request signed with an open join code's key, and nothing else (any method)."""

    requires_token = False  # the join code's signature is checked instead

    def initialize(self, auth: ClusterAuth, joining: Joining) -> None:
        super().initialize(auth)
        self.joining = joining

    def prepare(self) -> None:
        request = self.request
        try:
            signature = parse_signature(request.headers.get("Authorization"))
        except SignatureError:
            signature = None
        code = self.joining.codes.find(signature.key_id) if signature else None
        if code is None:
            raise Unauthorized(INVALID_CODE)
        try:
            if not host_is_ours(request.host, self.auth.own_addresses()):
                raise SignatureError(f"it is addressed to {request.host}, which is not this machine")
            key = verify_request(
                code.keys, signature, request.method, request.host, request.uri, request.body, self.auth.guard
            )
        except SignatureError as e:
            raise Unauthorized(f"The join request's signature is refused: {e}.") from None
        self.signed_by, self.request_nonce = key, signature.nonce  # the reply is signed with it
        self.code = code

    def post(self) -> None:
        code, key, request = self.code, self.signed_by, self.request
        name, storage, port = joining_node(self.json_body())
        if code.name is not None and name != code.name:
            raise Forbidden(f"This join code was issued for node {code.name!r}, not {name!r}.")
        reconciler = self.joining.reconciler
        declared = {node.name for node in reconciler.applied.manifest.nodes} if reconciler.applied else set()
        if code.name is None and (name in declared or name in reconciler.announced()):
            raise Forbidden(  # a machine named like a node already there would pose as it
                f"Node {name!r} is already in cluster.yaml or another agent goes by it: join with another "
                f"--name, or, to replace that machine, use a code from `genmlx join-command --name {name}`."
            )
        node = JoinedNode(name, f"{request.remote_ip}:{port}", storage, time.time())
        self.joining.codes.use(code, node)
        known = DiscoveredAgent(name, node.address, "", "", last_seen=node.at, storage=storage)
        reconciler.known_agents[name] = known
        reconciler.wake()
        self.write_json(200, {"node": name, "token": seal_token(self.auth.token, key, name)})


def joining_node(body: dict[str, Any]) -> tuple[str, tuple[str, ...], int]:
    """The name, storage paths and agent port a join request names, checked."""
    name, storage, port = body.get("name"), body.get("storage"), body.get("port")
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidRequest(
            "name must be a node name: lowercase letters, digits, '.', '_', '-'", param="name"
        )
    if (
        not isinstance(storage, list)
        or not 1 <= len(storage) <= MAX_STORAGE_PATHS
        or not all(isinstance(p, str) and PurePosixPath(p).is_absolute() and len(p) < 1024 for p in storage)
    ):
        raise InvalidRequest(f"storage must be 1 to {MAX_STORAGE_PATHS} absolute paths", param="storage")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidRequest("port must be the agent's port, 1 to 65535", param="port")
    return name, tuple(storage), port


class PackageHandler(ApiHandler):
    requires_token = False

    def initialize(self, auth: ClusterAuth, joining: Joining) -> None:
        super().initialize(auth)
        self.joining = joining

    def get(self, name: str) -> None:
        wheel = self.joining.packages.get(name)
        if wheel is None or not wheel.path.is_file():
            raise UnknownRoute(f"No package {name!r} is offered here: run `genmlx join-command` first.")
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Content-Disposition", f'attachment; filename="{wheel.name}"')
        self.finish(wheel.path.read_bytes())


def join_routes(auth: ClusterAuth, reconciler: Reconciler, package_dir: Path) -> list[tuple]:
    joining = Joining(reconciler, package_dir)
    deps = {"auth": auth, "joining": joining}
    return [
        (r"/api/v1/join-codes", JoinCodesHandler, deps),
        (r"/api/v1/join", JoinHandler, deps),
        (r"/join/package/([^/]+)", PackageHandler, deps),
    ]
