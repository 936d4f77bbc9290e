"""The model store on disk: one directory per model in a storage path, described by a metadata file.

    <storage>/<model>/.genmlx-model.json       source, revision, commit, every file's size and sha256
    <storage>/<model>/<files...>               the model's files (relative paths, maybe in subdirectories)
    <storage>/<model>/.genmlx-damaged          what the scrub found wrong (one line); the copy counts as
                                               incomplete until it is replaced or scrubbed clean again
    <storage>/.genmlx-partial/<model>/         a download or sync in progress (a stable path, so an
                                               interrupted transfer resumes where it stopped)

A transfer writes into the partial directory; ``publish`` verifies every file, writes the metadata
and renames the directory into place, so a model is never half there. ``adopt`` gives a directory
put there by hand its metadata in place. Names starting with "." are the store's own and are never
models or model files. Everything here blocks on the disk: call it from an executor.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from genmlx.agent.store.metadata import (
    InvalidMetadata,
    ModelFile,
    ModelMetadata,
    read_metadata,
    safe_model_name,
    write_metadata,
)
from genmlx.core.errors import GenMLXError, PermanentError

log = logging.getLogger(__name__)

PARTIAL_DIR_NAME = ".genmlx-partial"
DAMAGE_NAME = ".genmlx-damaged"
HASH_CHUNK_BYTES = 4 * 1024 * 1024


class VerificationFailed(PermanentError):
    """Files do not match their recorded size or sha256; ``problems`` says which and how."""

    def __init__(self, where: Path, problems: list[str]):
        self.problems = problems
        super().__init__(f"{where} failed verification: " + "; ".join(problems))


class ModelAlreadyPresent(PermanentError):
    """Publishing would replace a complete model that is already in place."""


class NoRoom(GenMLXError):
    """A storage path has too little free space for a model, found before writing or when a write
    failed for want of room. Not permanent: room comes back when someone frees it, and the master
    asks again once the path reports room; the partial directory stays, so the transfer resumes."""


def out_of_room(error: OSError, what: str) -> NoRoom | None:
    """``NoRoom`` for a write that failed because the file system (or a quota) is full, else None."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return NoRoom(f"no room left while writing {what} ({error.strerror}): free space; it resumes from here")


@dataclass(frozen=True)
class DownloadResult:
    """What a download from a source (``hf_download.download_model``) leaves in its partial
    directory: the commit the revision resolved to and every file, verified as it arrived."""

    commit: str
    files: tuple[ModelFile, ...]


def sha256_file(path: Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """The hex sha256 of a file, read in large chunks into one reused buffer."""
    hasher = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            hasher.update(view[:n])
    return hasher.hexdigest()


def verify_files(model_dir: Path, files: tuple[ModelFile, ...], check_hashes: bool = True) -> list[str]:
    """What is wrong with ``files`` in ``model_dir``, one line per problem; empty when all match.
    Without ``check_hashes`` only presence and sizes are checked (cheap enough for every state poll)."""
    problems = []
    for file in files:
        problem = file_problem(model_dir / file.path, file, check_hashes)
        if problem:
            problems.append(f"{file.path}: {problem}")
    return problems


def file_problem(path: Path, file: ModelFile, check_hash: bool) -> str | None:
    try:
        info = path.stat()
    except OSError:
        return "missing"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size != file.size:
        return f"{info.st_size} bytes, expected {file.size}"
    if check_hash and sha256_file(path) != file.sha256:
        return "sha256 does not match"
    return None


def partial_dir(storage_root: Path, name: str) -> Path:
    """Where a transfer of model ``name`` into ``storage_root`` writes until it is published."""
    return storage_root / PARTIAL_DIR_NAME / name


def publish(
    partial: Path,
    storage_root: Path,
    name: str,
    metadata: ModelMetadata,
    *,
    replace: bool = False,
    hashes_checked: bool = False,
) -> Path:
    """Verify ``partial`` against ``metadata``, write the metadata, and rename it to
    ``<storage_root>/<name>``. ``hashes_checked`` skips re-reading files whose sha256 the caller
    computed while writing them (sizes are still checked). An existing complete model there is
    replaced only with ``replace``. Returns the published directory."""
    problems = verify_files(partial, metadata.files, check_hashes=not hashes_checked)
    if problems:
        raise VerificationFailed(partial, problems)
    final = storage_root / name
    if final.exists() and not replace and is_complete(final):
        raise ModelAlreadyPresent(f"{final} already holds a complete model; not replacing it")
    write_metadata(partial, metadata)
    if final.exists():
        discard_directory(final)
    os.replace(partial, final)
    log.info("published %s (%d files, %d bytes)", final, len(metadata.files), metadata.total_bytes)
    return final


def holds_revision(metadata: ModelMetadata, source: str, revision: str) -> bool:
    """Whether a copy is of ``source`` at ``revision`` (a branch or tag by name, a commit by prefix).
    A file:// source has no revisions: the source alone decides."""
    if metadata.source != source:
        return False
    if source.startswith("file://"):
        return True
    return metadata.revision == revision or bool(metadata.commit and metadata.commit.startswith(revision))


def is_complete(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds every file its metadata lists with the recorded size (sha256 is
    not re-read here) and the scrub found nothing wrong with it; without metadata, whether it has
    config.json and safetensors weights."""
    return completeness_problem(model_dir) is None


def completeness_problem(model_dir: Path) -> str | None:
    """Why ``model_dir`` is not a complete model, in one line naming the file; None when it is."""
    try:
        metadata = read_metadata(model_dir)
    except InvalidMetadata as e:
        return str(e)
    if metadata is None:
        return None if is_bare_model_dir(model_dir) else "no metadata, config.json or *.safetensors weights"
    damage = read_damage(model_dir)
    if damage is not None:
        return damage
    problems = verify_files(model_dir, metadata.files, check_hashes=False)
    if len(problems) > 1:
        return f"{problems[0]} (and {len(problems) - 1} more)"
    return problems[0] if problems else None


def read_damage(model_dir: Path) -> str | None:
    """What the scrub recorded as wrong with ``model_dir``, or None when it recorded nothing."""
    try:
        text = (model_dir / DAMAGE_NAME).read_text(errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{DAMAGE_NAME}: {e.strerror}"
    return text or "the scrub found it damaged"


def record_damage(model_dir_fd: int, problem: str) -> None:
    """Mark the directory open as ``model_dir_fd`` damaged. Through the descriptor, so a directory
    replaced meanwhile (a sync publishing a fresh copy) is never marked in its stead."""
    fd = os.open(DAMAGE_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=model_dir_fd)
    with os.fdopen(fd, "w") as f:
        f.write(problem + "\n")


def clear_damage(model_dir_fd: int) -> bool:
    """Remove the damage mark of the directory open as ``model_dir_fd``; whether there was one."""
    try:
        os.unlink(DAMAGE_NAME, dir_fd=model_dir_fd)
    except FileNotFoundError:
        return False
    return True


def is_bare_model_dir(model_dir: Path) -> bool:
    """The rule for a directory without metadata: ``config.json`` and ``*.safetensors`` weights."""
    has_weights = any(p.is_file() for p in model_dir.glob("*.safetensors"))
    return (model_dir / "config.json").is_file() and has_weights


def adopt(model_dir: Path) -> ModelMetadata:
    """Give a model directory that has no metadata (put there by hand, or a ``file://`` source)
    its metadata, in place: every visible regular file hashed, source ``file://<dir>``. Returns
    the metadata (the existing one, untouched, where there is one)."""
    existing = read_metadata(model_dir)
    if existing is not None:
        return existing
    files = tuple(
        ModelFile(rel, (model_dir / rel).stat().st_size, sha256_file(model_dir / rel))
        for rel in list_model_files(model_dir)
    )
    metadata = ModelMetadata(model_dir.resolve().as_uri(), None, None, files, time.time())
    write_metadata(model_dir, metadata)
    log.info("adopted %s (%d files, %d bytes)", model_dir, len(files), metadata.total_bytes)
    return metadata


def list_model_files(model_dir: Path) -> list[str]:
    """Relative paths of the visible files under ``model_dir``, sorted. A symlink counts only when
    it resolves to a regular file inside ``model_dir``: a link leading out is skipped, with a warning."""
    root = model_dir.resolve()
    found = []
    for path in walk_visible(model_dir):
        if path.is_symlink() and not resolves_inside(path, root):
            log.warning("not adopting %s: it links outside %s", path, model_dir)
            continue
        if path.is_file():
            found.append(path.relative_to(model_dir).as_posix())
    return sorted(found)


def walk_visible(directory: Path) -> Iterator[Path]:
    """Every entry under ``directory`` whose name does not start with ".", without entering links."""
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            yield Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                yield from walk_visible(Path(entry.path))


def resolves_inside(path: Path, root: Path) -> bool:
    """Whether ``path``, with every symlink resolved, lies strictly inside the real path ``root``."""
    real = Path(os.path.realpath(path))
    return real != root and real.is_relative_to(root)


def discard_directory(directory: Path) -> None:
    """Remove a directory tree so that it disappears at once: renamed to a hidden name beside it
    first, then deleted (a crash in between leaves only a hidden entry, never half a model)."""
    doomed = directory.with_name(f".genmlx-deleting-{directory.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(directory, doomed)
    shutil.rmtree(doomed)


def remove_model(storage_root: Path, name: str) -> list[Path]:
    """Remove model ``name`` and its partial directory from ``storage_root``; the paths removed."""
    removed = []
    for directory in (storage_root / safe_model_name(name), partial_dir(storage_root, name)):
        if directory.is_dir() and not directory.is_symlink():
            discard_directory(directory)
            removed.append(directory)
    return removed


def check_room(storage_root: Path, name: str, needed_bytes: int) -> None:
    """Raise ``NoRoom``, with the numbers, when ``storage_root`` cannot take ``needed_bytes`` more."""
    free = shutil.disk_usage(storage_root).free
    if needed_bytes > free:
        raise NoRoom(
            f"model {name} needs {needed_bytes} more bytes ({needed_bytes / 1e9:.2f} GB) in {storage_root}, "
            f"but only {free} bytes ({free / 1e9:.2f} GB) are free: free space or choose another storage path"
        )
