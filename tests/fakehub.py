"""A local stand-in for the Hugging Face Hub, speaking the parts of its HTTP API that
huggingface_hub 2.4 uses to list a repo and download its files, for tests that cannot reach the
real Hub.

    GET  /api/models/{org}/{name}[/revision/{rev}][?blobs=true]   repo info: "sha" and "siblings"
    HEAD /{org}/{name}/resolve/{rev}/{path}                        file metadata in headers
    GET  /{org}/{name}/resolve/{rev}/{path}                        the file (Range answered with 206)
    GET  {cdn}/{sha256}?filename=...                               LFS content, on a second port

What the client reads is answered as the Hub answers it: ``X-Repo-Commit`` on every resolve reply;
``ETag`` quoted, the git blob sha1 for small files; LFS files redirected (302) to a CDN on another
origin, the redirect carrying ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``, so that the
client must drop its token before following; errors with ``X-Error-Code`` (RepoNotFound,
GatedRepo, RevisionNotFound, EntryNotFound) and ``X-Error-Message``, and 401 rather than 404 for
a missing repo asked without a token. Repo info stays public for a gated repo; its files do not.

Knobs for tests: ``fail_next`` (answer the next requests with an error), ``throttle`` (bytes per
second, to kill a client mid-file), ``corrupt_next`` (flip a byte of the next bodies of a file),
``drop_next`` (hang up mid-body), ``ignore_range`` (answer a Range with the whole file),
``on_info`` (run something after a repo info reply, e.g. move a branch), and what was asked:
``requests`` and ``bytes_served``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

# Suffixes the Hub's default .gitattributes sends to LFS.
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".model", ".gguf", ".h5", ".msgpack")
SEND_CHUNK = 64 * 1024
RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def files_from_dir(path: Path) -> dict[str, bytes]:
    """Every regular file under ``path``, keyed by its repo path (forward slashes)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    oid = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()


@dataclass(frozen=True)
class HubFile:
    path: str
    data: bytes

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def etag(self) -> str:
        """What the Hub puts in ETag / X-Linked-Etag: sha256 for LFS, the git blob sha1 otherwise."""
        return self.sha256 if self.lfs else git_blob_sha1(self.data)

    def sibling(self) -> dict[str, Any]:
        """The file as ``siblings[]`` lists it with ``blobs=true``."""
        if not self.lfs:
            return {"rfilename": self.path, "size": len(self.data), "blobId": git_blob_sha1(self.data)}
        pointer = lfs_pointer(self.data)
        lfs = {"sha256": self.sha256, "size": len(self.data), "pointerSize": len(pointer)}
        return {"rfilename": self.path, "size": len(self.data), "blobId": git_blob_sha1(pointer), "lfs": lfs}


@dataclass
class HubRepo:
    name: str
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated_tokens: frozenset[str] | None = None  # None: public; else the tokens granted access

    def commit_of(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.commits else None)


@dataclass(frozen=True)
class SeenRequest:
    served_by: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]  # names in lower case


@dataclass(frozen=True)
class HubError(Exception):
    status: int
    code: str | None
    message: str


class FakeHub:
    """The Hub and its CDN on two free ports of ``host`` (loopback unless a test's hosts must reach
    it, as the network-namespace bench's do at its bridge address), served from a thread of their own."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[SeenRequest] = []
        self.bytes_served: Counter[str] = Counter()  # by repo file path
        self.bodies_in_flight = 0
        self.on_info: Callable[[], None] | None = None
        self.bytes_per_s: float | None = None
        self._failures: list[tuple[int, str]] = []  # (status, path substring), one per request
        self._corruptions: Counter[str] = Counter()
        self._drops: dict[str, int] = {}  # repo file path -> bytes to send before hanging up
        self.ignore_range = False  # answer Range requests with the whole file (200), as some CDNs do
        self._lock = threading.Lock()
        self._hub_sockets = bind_sockets(0, host)
        self._cdn_sockets = bind_sockets(0, host)
        self.url = f"http://{host}:{self._hub_sockets[0].getsockname()[1]}"
        self.cdn_url = f"http://{host}:{self._cdn_sockets[0].getsockname()[1]}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ----- content -----

    def add_commit(self, repo: str, files: dict[str, bytes], ref: str = "main") -> str:
        """Add a commit holding ``files`` and point ``ref`` at it; returns the commit sha."""
        hub_files = {path: HubFile(path, data) for path, data in files.items()}
        listing = json.dumps(sorted((f.path, f.etag) for f in hub_files.values()))
        commit = hashlib.sha1(f"{repo}\0{listing}".encode()).hexdigest()
        with self._lock:
            entry = self.repos.setdefault(repo, HubRepo(repo))
            entry.commits[commit] = hub_files
            entry.refs[ref] = commit
        return commit

    def gate(self, repo: str, tokens: tuple[str, ...] = ()) -> None:
        """Make ``repo`` gated: its files answer only to ``tokens``."""
        self.repos[repo].gated_tokens = frozenset(tokens)

    def move_ref(self, repo: str, ref: str, commit: str) -> None:
        self.repos[repo].refs[ref] = commit

    # ----- knobs -----

    def fail_next(self, count: int, status: int = 500, path_contains: str = "") -> None:
        """Answer the next ``count`` requests whose path contains ``path_contains`` with ``status``."""
        with self._lock:
            self._failures.extend([(status, path_contains)] * count)

    def corrupt_next(self, path: str, times: int = 1) -> None:
        """Flip one byte in the next ``times`` bodies sent for repo file ``path``."""
        with self._lock:
            self._corruptions[path] += times

    def drop_next(self, path: str, after_bytes: int) -> None:
        """Hang up in the middle of the next body sent for ``path``, after ``after_bytes``."""
        with self._lock:
            self._drops[path] = after_bytes

    def take_drop(self, path: str) -> int | None:
        with self._lock:
            return self._drops.pop(path, None)

    def throttle(self, bytes_per_s: float | None) -> None:
        self.bytes_per_s = bytes_per_s

    def take_failure(self, path: str) -> int | None:
        with self._lock:
            for i, (status, needle) in enumerate(self._failures):
                if needle in path:
                    del self._failures[i]
                    return status
        return None

    def take_corruption(self, path: str) -> bool:
        with self._lock:
            if self._corruptions[path] <= 0:
                return False
            self._corruptions[path] -= 1
            return True

    def seen(self, method: str, path_contains: str = "", served_by: str | None = None) -> list[SeenRequest]:
        """The requests seen so far with this method, path part and server, oldest first."""
        return [
            r
            for r in self.requests
            if r.method == method and path_contains in r.path and served_by in (None, r.served_by)
        ]

    # ----- running -----

    def start(self) -> FakeHub:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="fakehub", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        args = {"hub": self}
        hub_app = Application(
            [
                (r"/api/models/([^/]+/[^/]+)", RepoInfoHandler, args),
                (r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", RepoInfoHandler, args),
                (r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", ResolveHandler, args),
            ],
            default_handler_class=UnknownPathHandler,
            default_handler_args=args,
        )
        cdn_app = Application([(r"/([0-9a-f]{64})", CdnHandler, args)])
        servers = [HTTPServer(hub_app), HTTPServer(cdn_app)]
        servers[0].add_sockets(self._hub_sockets)
        servers[1].add_sockets(self._cdn_sockets)
        ready.set()
        self._loop.run_forever()
        for server in servers:
            server.stop()
        self._loop.close()


class FakeHubHandler(RequestHandler):
    """Records each request, plays queued failures, and renders ``HubError`` the Hub's way."""

    served_by = "hub"

    def initialize(self, hub: FakeHub) -> None:
        self.hub = hub

    def prepare(self) -> None:
        headers = {k.lower(): v for k, v in self.request.headers.get_all()}
        seen = SeenRequest(self.served_by, self.request.method or "", self.request.path, headers)
        self.hub.requests.append(seen)
        status = self.hub.take_failure(self.request.path)
        if status is not None:
            self.send_error_reply(HubError(status, None, "Internal Error - We're working hard to fix this"))

    def send_error_reply(self, error: HubError, commit: str | None = None) -> None:
        self.set_status(error.status)
        if error.code:
            self.set_header("X-Error-Code", error.code)
        self.set_header("X-Error-Message", error.message)
        if commit:
            self.set_header("X-Repo-Commit", commit)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": error.message}))

    def authorization_token(self) -> str | None:
        value = self.request.headers.get("Authorization", "")
        return value[len("Bearer ") :] if value.startswith("Bearer ") else None

    def find_repo(self, name: str) -> HubRepo:
        repo = self.hub.repos.get(name)
        if repo is None:
            # The Hub does not tell an anonymous caller whether a private repo exists: 401 for both.
            status = 404 if self.authorization_token() else 401
            raise HubError(status, "RepoNotFound", "Repository not found")
        return repo

    def find_commit(self, repo: HubRepo, revision: str) -> str:
        commit = repo.commit_of(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    async def send_body(self, data: bytes, name: str) -> None:
        """Send ``data`` (or the asked byte range of it), throttled and corrupted as the knobs say."""
        start, end = self.byte_range(len(data))
        self.set_header("Accept-Ranges", "bytes")
        self.set_header("Content-Length", str(end - start))
        if self.request.method == "HEAD":
            return
        if self.hub.take_corruption(name) and end > start:
            middle = (start + end) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        self.hub.bodies_in_flight += 1
        try:
            await self.send_chunks(data, start, end, name)
        finally:
            self.hub.bodies_in_flight -= 1

    async def send_chunks(self, data: bytes, start: int, end: int, name: str) -> None:
        drop_after = self.hub.take_drop(name)
        if drop_after is not None:
            data, end = data[: start + drop_after], min(end, start + drop_after)
        for offset in range(start, end, SEND_CHUNK):
            chunk = data[offset : min(offset + SEND_CHUNK, end)]
            # Counted before the client can have it: a test that saw a download end sees its bytes.
            self.hub.bytes_served[name] += len(chunk)
            self.write(chunk)
            try:
                await self.flush()
            except StreamClosedError:
                return
            if self.hub.bytes_per_s:
                await asyncio.sleep(len(chunk) / self.hub.bytes_per_s)
        if drop_after is not None:
            self.request.connection.close()  # fewer bytes than Content-Length said: the client sees a cut

    def byte_range(self, size: int) -> tuple[int, int]:
        """The ``Range`` asked for as (start, end), setting 206 and Content-Range when there is one."""
        header = self.request.headers.get("Range")
        if not header or self.hub.ignore_range:
            return 0, size
        match = RANGE.fullmatch(header.strip())
        first = int(match.group(1)) if match else size
        last = min(int(match.group(2)), size - 1) if match and match.group(2) else size - 1
        if first >= size or last < first:
            self.set_header("Content-Range", f"bytes */{size}")
            raise HubError(416, None, f"Range Not Satisfiable: {header}")
        self.set_status(206)
        self.set_header("Content-Range", f"bytes {first}-{last}/{size}")
        return first, last + 1


class RepoInfoHandler(FakeHubHandler):
    def get(self, name: str, revision: str = "main") -> None:
        try:
            repo = self.find_repo(name)
            commit = self.find_commit(repo, revision)
        except HubError as e:
            self.send_error_reply(e)
            return
        self.finish(self.describe(repo, commit, self.get_query_argument("blobs", "") == "true"))
        if self.hub.on_info is not None:
            self.hub.on_info()

    def describe(self, repo: HubRepo, commit: str, blobs: bool) -> dict[str, Any]:
        files = repo.commits[commit].values()
        siblings = [f.sibling() if blobs else {"rfilename": f.path} for f in files]
        org = repo.name.split("/")[0]
        return {
            "_id": commit[:24],
            "id": repo.name,
            "modelId": repo.name,
            "author": org,
            "sha": commit,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2025-01-01T00:00:00.000Z",
            "private": False,
            "gated": False if repo.gated_tokens is None else "manual",
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["mlx", "safetensors"],
            "library_name": "mlx",
            "siblings": siblings,
            "usedStorage": sum(len(f.data) for f in files),
        }


class ResolveHandler(FakeHubHandler):
    async def head(self, name: str, revision: str, path: str) -> None:
        await self.get(name, revision, path)

    async def get(self, name: str, revision: str, path: str) -> None:
        commit = None
        try:
            repo = self.find_repo(name)
            self.check_access(repo)
            commit = self.find_commit(repo, revision)
            hub_file = repo.commits[commit].get(path)
            if hub_file is None:
                raise HubError(404, "EntryNotFound", f'{path} does not exist on "{revision}"')
            self.set_header("X-Repo-Commit", commit)
            if hub_file.lfs:
                self.redirect_to_cdn(hub_file)
                return
            self.set_header("ETag", f'"{hub_file.etag}"')
            await self.send_body(hub_file.data, hub_file.path)
        except HubError as e:
            self.send_error_reply(e, commit)

    def check_access(self, repo: HubRepo) -> None:
        if repo.gated_tokens is None:
            return
        token = self.authorization_token()
        if token is None:
            message = (
                f"Access to model {repo.name} is restricted. You must have access to it and be authenticated."
            )
            raise HubError(401, "GatedRepo", message)
        if token not in repo.gated_tokens:
            message = f"Access to model {repo.name} is restricted and you are not in the authorized list."
            raise HubError(403, "GatedRepo", message)

    def redirect_to_cdn(self, hub_file: HubFile) -> None:
        self.set_header("X-Linked-Etag", f'"{hub_file.sha256}"')
        self.set_header("X-Linked-Size", str(len(hub_file.data)))
        self.set_header("ETag", f'"{git_blob_sha1(lfs_pointer(hub_file.data))}"')
        self.redirect(f"{self.hub.cdn_url}/{hub_file.sha256}?filename={hub_file.path}", status=302)


class CdnHandler(FakeHubHandler):
    """Content-addressed LFS storage: no Hub headers, no auth, Range supported."""

    served_by = "cdn"

    async def head(self, sha256: str) -> None:
        await self.get(sha256)

    async def get(self, sha256: str) -> None:
        name = self.get_query_argument("filename", "")
        data = self.find_content(sha256)
        try:
            if data is None:
                raise HubError(404, None, "NoSuchKey")
            self.set_header("ETag", f'"{sha256}"')
            self.set_header("Content-Disposition", f'inline; filename="{name}";')
            await self.send_body(data, name)
        except HubError as e:
            self.send_error_reply(e)

    def find_content(self, sha256: str) -> bytes | None:
        for repo in list(self.hub.repos.values()):
            for files in list(repo.commits.values()):
                for hub_file in files.values():
                    if hub_file.lfs and hub_file.sha256 == sha256:
                        return hub_file.data
        return None


class UnknownPathHandler(FakeHubHandler):
    """Anything else the client asks for is recorded (so tests see it) and not found."""

    def prepare(self) -> None:
        super().prepare()
        if not self._finished:
            self.send_error_reply(HubError(404, None, "Sorry, we can't find the page you are looking for."))
