"""Serving a stored model's files to peers: finding a file safely, HTTP byte ranges, and streaming
it in large chunks with its sha256 checked on the way.

A file is checked against its recorded sha256 whenever it is served whole, while it streams (no
extra read pass); the last chunk is held back until the digest matches, so a corrupt file never
reaches a peer complete. Files this agent has verified since it started (published, adopted, or
served whole) are remembered by their stat identity and not hashed again; a file found corrupt is
refused from then on. Ranges are served as they are: the receiver hashes the whole file anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from tornado.iostream import StreamClosedError
from tornado.web import RequestHandler

from genmlx.agent.store.inventory import find_complete_model
from genmlx.agent.store.metadata import ModelFile, ModelMetadata, read_metadata, safe_relative_path
from genmlx.agent.store.model_store import adopt, resolves_inside
from genmlx.core.errors import AgentConflict, AgentNotFound, AgentRequestError

log = logging.getLogger(__name__)

SEND_CHUNK_BYTES = 4 * 1024 * 1024
SINGLE_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.ASCII)

Verdict = Literal["verified", "corrupt", "unknown"]
StatIdentity = tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns


class FileNotServed(AgentNotFound):
    """No complete model of that name, or no such file in its metadata."""


class PathRefused(AgentRequestError):
    """A requested file resolves outside its model directory."""

    status = 403


class CorruptFile(AgentConflict):
    """The file on this agent no longer matches its recorded sha256: fetch the model
    here again, or from another peer."""


class RangeNotSatisfiable(AgentRequestError):
    """A Range that starts past the end of the file; answered with ``Content-Range: bytes */size``."""

    status = 416

    def __init__(self, message: str, size: int):
        super().__init__(message)
        self.headers = {"Content-Range": f"bytes */{size}"}


@dataclass(frozen=True)
class ServedFile:
    """A file of a complete model, located and checked to lie inside its model directory."""

    model: str
    file: ModelFile
    real_path: Path
    identity: StatIdentity


def stat_identity(path: Path) -> StatIdentity:
    """What changes when a file's content is rewritten in any ordinary way (ctime even on utime)."""
    info = os.stat(path)
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class VerifiedFiles:
    """The files whose sha256 this agent checked, and what it found, keyed by real path and valid
    only while the file's stat identity is unchanged. Used from the event loop and executor
    threads: each operation is a single dict access."""

    def __init__(self) -> None:
        self._found: dict[Path, tuple[StatIdentity, str, bool]] = {}

    def remember(
        self, path: Path, sha256: str, identity: StatIdentity | None = None, good: bool = True
    ) -> None:
        real = Path(os.path.realpath(path))
        self._found[real] = (identity or stat_identity(real), sha256, good)

    def remember_model(self, model_dir: Path, files: tuple[ModelFile, ...]) -> None:
        """Record every file of a directory that was just verified (published or adopted)."""
        for file in files:
            self.remember(model_dir / file.path, file.sha256)

    def verdict(self, served: ServedFile) -> Verdict:
        known = self._found.get(served.real_path)
        if known is None or known[:2] != (served.identity, served.file.sha256):
            return "unknown"
        return "verified" if known[2] else "corrupt"


def locate_model_file(
    storage_paths: tuple[Path, ...], name: str, relative: str, verified: VerifiedFiles
) -> ServedFile:
    """The file ``relative`` of the complete model ``name``, refusing paths that are malformed,
    not in the model's metadata, or that resolve (through symlinks) outside the model directory.
    A model without metadata is adopted first. Blocks on the disk."""
    relative = safe_relative_path(relative)
    model_dir, metadata = complete_model_metadata(storage_paths, name, verified)
    listed = {f.path: f for f in metadata.files}
    if relative not in listed:
        raise FileNotServed(f"model {name!r} has no file {relative!r}")
    path = model_dir / relative
    if not resolves_inside(path, Path(os.path.realpath(model_dir))):
        raise PathRefused(f"{relative!r} of model {name!r} resolves outside its model directory")
    real = Path(os.path.realpath(path))
    return ServedFile(name, listed[relative], real, stat_identity(real))


def complete_model_metadata(
    storage_paths: tuple[Path, ...], name: str, verified: VerifiedFiles
) -> tuple[Path, ModelMetadata]:
    """The directory and metadata of the complete model ``name``, adopting it when it has none
    (the files it hashed then count as verified)."""
    model_dir = find_complete_model(storage_paths, name)
    if model_dir is None:
        raise FileNotServed(f"no complete model {name!r} on this agent")
    metadata = read_metadata(model_dir)
    if metadata is None:
        metadata = adopt(model_dir)
        verified.remember_model(model_dir, metadata.files)
    return model_dir, metadata


def parse_byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte of a single ``Range: bytes=...`` header, or None to serve
    the whole file (no header, several ranges, or one we cannot parse: RFC 9110 lets us ignore
    those). Raises ``RangeNotSatisfiable`` for a range that selects nothing of the file."""
    match = SINGLE_RANGE.fullmatch(header.strip()) if header else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first_text, last_text = match.groups()
    if not first_text:  # "bytes=-n": the last n bytes
        if int(last_text) == 0 or size == 0:
            raise RangeNotSatisfiable(f"Range {header!r}: nothing to send of a {size}-byte file", size)
        return max(0, size - int(last_text)), size - 1
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None
    if first >= size:
        raise RangeNotSatisfiable(f"Range {header!r} starts past the end of a {size}-byte file", size)
    return first, min(int(last_text), size - 1) if last_text else size - 1


def read_chunk(f: IO[bytes], n: int, hasher: Any) -> bytes:
    chunk = f.read(n)
    if hasher is not None:
        hasher.update(chunk)
    return chunk


async def send_file_range(
    handler: RequestHandler, served: ServedFile, first: int, last: int, verified: VerifiedFiles
) -> int:
    """Stream bytes ``first..last`` of ``served`` to the client, reading the next chunk while the
    current one is sent. A whole file not yet verified is hashed on the way; if its digest does not
    match, the connection is dropped before the last chunk and the file remembered as corrupt.
    Returns the bytes sent (fewer when the client went away)."""
    whole = (first, last) == (0, served.file.size - 1)
    hasher = hashlib.sha256() if whole and verified.verdict(served) == "unknown" else None
    loop = asyncio.get_running_loop()
    sent = 0
    with open(served.real_path, "rb", buffering=0) as f:
        f.seek(first)
        remaining = last - first + 1
        pending = loop.run_in_executor(None, read_chunk, f, min(SEND_CHUNK_BYTES, remaining), hasher)
        try:
            while remaining > 0:
                chunk = await pending
                if not chunk:
                    raise OSError(f"{served.real_path} shrank while being served")
                remaining -= len(chunk)
                if remaining == 0 and hasher is not None and not digest_matches(served, hasher, verified):
                    handler.request.connection.close()  # the peer must not take this copy as whole
                    return sent
                if remaining > 0:
                    pending = loop.run_in_executor(
                        None, read_chunk, f, min(SEND_CHUNK_BYTES, remaining), hasher
                    )
                handler.write(chunk)
                await handler.flush()
                sent += len(chunk)
        except StreamClosedError:
            log.info("peer went away after %d bytes of %s/%s", sent, served.model, served.file.path)
        finally:
            if not pending.done():
                await asyncio.wait([pending])  # the file stays open until the last read returns
    return sent


def digest_matches(served: ServedFile, hasher: Any, verified: VerifiedFiles) -> bool:
    good = hasher.hexdigest() == served.file.sha256
    verified.remember(served.real_path, served.file.sha256, served.identity, good=good)
    if not good:
        log.error(
            "%s of model %s does not match its recorded sha256: not serving it (fetch the model again)",
            served.file.path,
            served.model,
        )
    return good
