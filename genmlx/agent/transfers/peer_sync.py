"""Copying a model from another agent (a peer) into a partial directory, then publishing it.

The peer lists the model's files with size and sha256 (``GET /api/v1/models/{name}/files``). Files
the partial directory already holds whole and intact are kept, and so are the intact files of a
copy being replaced (hard-linked in: a copy with one damaged file costs one file's transfer); a
file cut short by an interruption is resumed with a Range request from its current size; the rest
are fetched whole. Every byte is hashed as it is written, so checking a file costs no second read;
a file whose sha256 does not match is deleted and fetched once more, then the sync fails. The
whole directory is published atomically with the peer's source, revision and commit. A write that
finds the disk full is ``NoRoom`` (ours, not the peer's): the partial directory stays to resume.

Everything here blocks (plain ``http.client`` over one connection per file, large reads straight into
one reused buffer): the transfer manager runs it in a worker thread, off the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from genmlx.agent.store.metadata import (
    METADATA_NAME,
    InvalidMetadata,
    ModelFile,
    ModelMetadata,
    parse_metadata,
)
from genmlx.agent.store.model_store import (
    check_room,
    holds_revision,
    out_of_room,
    partial_dir,
    publish,
    sha256_file,
)
from genmlx.agent.transfers.peer_client import (
    PEER_TIMEOUT_S,
    Peer,
    PeerRefused,
    PeerUnreachable,
    raise_for_status,
    send,
)
from genmlx.agent.transfers.progress import TransferProgress
from genmlx.core.errors import PermanentError, TemporaryError
from genmlx.wire.agent_state import FetchRequest

log = logging.getLogger(__name__)

RECEIVE_CHUNK_BYTES = 4 * 1024 * 1024
ATTEMPTS_PER_FILE = 3  # connection failures, each resuming where the last one stopped


class PeerHoldsOtherRevision(PermanentError):
    """The peer's copy is not of the source and revision the request asks for."""


class PeerCopyCorrupt(PermanentError):
    """A file from the peer did not match the sha256 the peer lists for it, twice."""


def sync_model(
    request: FetchRequest, storage_root: Path, token: str, progress: TransferProgress
) -> tuple[Path, ModelMetadata]:
    """Make ``request.model`` complete in ``storage_root`` by copying it from ``request.peer``;
    returns the published directory and its metadata."""
    peer = Peer.parse(request.peer or "", token)
    remote_name = request.peer_model or request.model
    listed = list_peer_model(peer, remote_name)
    if request.source is not None and not holds_revision(listed, request.source, request.revision):
        held = f"{listed.source}@{listed.revision} ({listed.commit or 'no commit'})"
        raise PeerHoldsOtherRevision(
            f"peer {peer} holds {held} as {remote_name}, not {request.source}@{request.revision}"
        )
    partial = partial_dir(storage_root, request.model)
    partial.mkdir(parents=True, exist_ok=True)
    progress.total = listed.total_bytes
    remove_unlisted(partial, listed.files)
    link_existing_copy(storage_root / request.model, partial, listed.files)
    wanted = files_to_fetch(partial, listed.files)
    committed = listed.total_bytes - sum(f.size for f in wanted)
    progress.done = committed
    check_room(storage_root, request.model, sum(f.size - existing_size(partial / f.path, f) for f in wanted))
    for file in wanted:
        fetch_verified(peer, remote_name, file, partial / file.path, progress, committed)
        committed += file.size
    metadata = ModelMetadata(listed.source, listed.revision, listed.commit, listed.files, time.time())
    # A copy already at the destination is of another revision (the agent checked before starting).
    final = publish(partial, storage_root, request.model, metadata, replace=True, hashes_checked=True)
    return final, metadata


def list_peer_model(peer: Peer, name: str) -> ModelMetadata:
    """The peer's metadata of its complete model ``name``."""
    connection = http.client.HTTPConnection(peer.host, peer.port, timeout=PEER_TIMEOUT_S)
    try:
        reply = send(connection, peer, f"/api/v1/models/{quote(name, safe='')}/files", {})
        raise_for_status(reply, peer, f"the file list of {name}")
        body = reply.response.read()
        reply.checked(peer, body)
        listing = json.loads(body)
        return checked_listing(parse_metadata(listing), peer)
    except (InvalidMetadata, ValueError) as e:
        raise PeerRefused(f"peer {peer} sent an unusable file list for {name}: {e}") from None
    finally:
        connection.close()


def checked_listing(metadata: ModelMetadata, peer: Peer) -> ModelMetadata:
    paths = [f.path for f in metadata.files]
    if len(set(paths)) != len(paths) or METADATA_NAME in paths:
        raise PeerRefused(f"peer {peer} listed a file twice, or our own metadata file")
    return metadata


def files_to_fetch(partial: Path, files: tuple[ModelFile, ...]) -> list[ModelFile]:
    """The files ``partial`` lacks: any not there whole with the right sha256 (a whole file is hashed
    once here; a wrong one is deleted)."""
    wanted = []
    for file in files:
        target = partial / file.path
        if target.is_file() and target.stat().st_size == file.size:
            if sha256_file(target) == file.sha256:
                continue
            log.warning("%s is whole but its sha256 is wrong: fetching it again", target)
            target.unlink()
        wanted.append(file)
    return wanted


def link_existing_copy(existing: Path, partial: Path, files: tuple[ModelFile, ...]) -> None:
    """Hard-link into ``partial`` the files of the copy being replaced (one the scrub found damaged,
    or another revision) that have the listed size, so only what differs crosses the network:
    ``files_to_fetch`` hashes each and drops the ones that do not match. A link is only ever kept
    whole or unlinked, never written into, so the copy still in place is not touched."""
    if not existing.is_dir() or existing.is_symlink():
        return
    for file in files:
        source, target = existing / file.path, partial / file.path
        if target.exists() or source.is_symlink() or existing_size(source, file) != file.size:
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)
        except OSError as e:  # another file system, or links refused: fetched whole instead
            log.debug("not reusing %s: %s", source, e)


def existing_size(target: Path, file: ModelFile) -> int:
    """How many bytes of ``file`` are already at ``target`` (0 when absent or too long)."""
    try:
        size = target.stat().st_size
    except FileNotFoundError:
        return 0
    return size if size <= file.size else 0


def fetch_verified(
    peer: Peer, name: str, file: ModelFile, target: Path, progress: TransferProgress, committed: int
) -> None:
    """Fetch ``file`` into ``target`` until its sha256 matches: a mismatch is fetched once more
    from scratch; a second one fails (the peer's copy is likely corrupt)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        digest = with_retries(receive_file, peer, name, file, target, progress, committed)
        if digest == file.sha256:
            return
        target.unlink()
        log.warning("%s from peer %s failed its sha256 check (attempt %d)", file.path, peer, attempt)
    raise PeerCopyCorrupt(
        f"{file.path} from peer {peer} did not match the sha256 the peer lists for it, twice: "
        "its copy of the model may be corrupt"
    )


def with_retries(fn: Callable[..., str], *args: Any) -> str:
    """``fn(*args)``, again after a ``TemporaryError`` (a dropped connection resumes where it stopped)."""
    retrying = Retrying(
        stop=stop_after_attempt(ATTEMPTS_PER_FILE),
        wait=wait_exponential(multiplier=0.5, max=4),
        retry=retry_if_exception_type(TemporaryError),
        reraise=True,
    )
    return retrying(fn, *args)


def receive_file(
    peer: Peer, name: str, file: ModelFile, target: Path, progress: TransferProgress, committed: int
) -> str:
    """One attempt: continue ``target`` from its current size and return the sha256 of the whole
    file as written."""
    offset = existing_size(target, file)
    connection = http.client.HTTPConnection(peer.host, peer.port, timeout=PEER_TIMEOUT_S)
    try:
        with progress.interruptible(lambda: shut_down(connection)):
            return receive_body(connection, peer, name, file, target, progress, committed, offset)
    except (OSError, http.client.HTTPException) as e:
        if isinstance(e, OSError) and (full := out_of_room(e, f"{name}/{file.path}")):
            raise full from None  # our disk, not the peer
        raise PeerUnreachable(f"peer {peer}: {file.path}: {e or type(e).__name__}") from None
    finally:
        connection.close()


def shut_down(connection: http.client.HTTPConnection) -> None:
    """Wake a thread blocked reading from ``connection`` (called from another thread)."""
    if connection.sock is not None:
        connection.sock.shutdown(socket.SHUT_RDWR)


def receive_body(
    connection: http.client.HTTPConnection,
    peer: Peer,
    name: str,
    file: ModelFile,
    target: Path,
    progress: TransferProgress,
    committed: int,
    offset: int,
) -> str:
    """Ask for ``file`` from ``offset`` and write what comes, hashing the whole file as written."""
    response = request_file(connection, peer, name, file, offset)
    offset = response_start(response, peer, file, offset)
    hasher = hashlib.sha256()
    if offset:
        hash_prefix(target, offset, hasher)
    with open(target, "r+b" if offset else "wb", buffering=0) as out:
        out.truncate(offset)
        out.seek(offset)
        copy_body(
            response, out, hasher, offset, file, lambda position: progress.set_done(committed + position)
        )
    return hasher.hexdigest()


def request_file(
    connection: http.client.HTTPConnection, peer: Peer, name: str, file: ModelFile, offset: int
) -> http.client.HTTPResponse:
    path = f"/api/v1/models/{quote(name, safe='')}/files/{quote(file.path, safe='/')}"
    reply = send(connection, peer, path, {"Range": f"bytes={offset}-"} if offset else {})
    raise_for_status(reply, peer, f"{name}/{file.path}")
    reply.checked(peer)
    return reply.response


def response_start(response: http.client.HTTPResponse, peer: Peer, file: ModelFile, offset: int) -> int:
    """Where the body starts in the file: ``offset`` for a 206 that honours our Range, 0 for a 200."""
    length = int(response.getheader("Content-Length") or -1)
    if response.status == 200 and length == file.size:
        return 0
    content_range = response.getheader("Content-Range") or ""
    if (
        response.status == 206
        and content_range.startswith(f"bytes {offset}-")
        and length == file.size - offset
    ):
        return offset
    raise PeerRefused(
        f"peer {peer} sent {file.path} with unexpected length or range ({content_range or length})"
    )


def hash_prefix(path: Path, length: int, hasher: Any) -> None:
    """Feed the first ``length`` bytes of ``path`` to ``hasher`` (a resumed file's existing part)."""
    buffer = bytearray(RECEIVE_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while length > 0 and (n := f.readinto(view[: min(len(view), length)])):
            hasher.update(view[:n])
            length -= n


def copy_body(
    response: http.client.HTTPResponse,
    out: Any,
    hasher: Any,
    position: int,
    file: ModelFile,
    on_position: Callable[[int], None],
) -> None:
    """Read the body into one reused buffer, hashing and writing each chunk as it arrives."""
    view = memoryview(bytearray(RECEIVE_CHUNK_BYTES))
    while position < file.size:
        n = response.readinto(view[: min(len(view), file.size - position)])
        if not n:
            raise PeerUnreachable(
                f"the connection closed after {position} of {file.size} bytes of {file.path}"
            )
        chunk = view[:n]
        hasher.update(chunk)
        write_all(out, chunk)
        position += n
        on_position(position)


def write_all(out: Any, chunk: memoryview) -> None:
    while chunk:
        chunk = chunk[out.write(chunk) :]


def remove_unlisted(partial: Path, files: tuple[ModelFile, ...]) -> None:
    """Delete whatever an earlier attempt (a sync of another revision, a download) left in the
    partial directory that is not a file of the model, hidden entries included, so that only the
    model is published."""
    listed = {f.path for f in files}
    for directory, subdirectories, names in os.walk(partial, topdown=False):
        for name in names:
            path = Path(directory, name)
            if path.relative_to(partial).as_posix() not in listed:
                log.info("removing %s: not a file of the model being synced", path)
                path.unlink()
        for name in subdirectories:
            with contextlib.suppress(OSError):  # only empty ones go
                Path(directory, name).rmdir()
