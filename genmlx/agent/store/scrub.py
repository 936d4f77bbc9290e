"""The scrub: re-hashing stored models in the background, so that a file that changed on disk (same
size, other bytes) is found before a rank loads it or a peer copies it.

Every model directory with metadata is re-hashed, one file at a time, against the sha256 its
metadata records: once after the agent starts, then every ``AgentConfig.scrub_interval_s`` (a day
by default), and at once for a model whose rank exited with a non-zero code. Reading never
competes with serving: 4 MiB chunks, paced to ``scrub_bytes_per_s`` on average (64 MiB/s by
default), and dropped from the page cache behind us where the OS lets us say so.

A mismatch is logged and recorded in the model directory (``store.record_damage``); the inventory
then reports the copy incomplete, with the problem, and the master has it synced from a peer, which
publishes a fresh copy in its place. Nothing is deleted here. A copy found intact loses an earlier
mark (a file put back by hand). Directories without metadata (put there by hand) are not scrubbed:
there is nothing to check them against until they are adopted. A model that a transfer is writing
is skipped, and a directory is hashed and marked through one descriptor, so a copy published over
it meanwhile is never marked in its stead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import monotonic

from genmlx.agent.config import DEFAULT_SCRUB_BYTES_PER_S, DEFAULT_SCRUB_INTERVAL_S
from genmlx.agent.store.file_serving import VerifiedFiles
from genmlx.agent.store.inventory import model_dirs_in
from genmlx.agent.store.metadata import (
    METADATA_NAME,
    InvalidMetadata,
    ModelFile,
    ModelMetadata,
    parse_metadata,
)
from genmlx.agent.store.model_store import clear_damage, record_damage
from genmlx.core.errors import GenMLXError
from genmlx.core.threads import run_in_worker_thread

log = logging.getLogger(__name__)

SCRUB_CHUNK_BYTES = 4 * 1024 * 1024
STOP_WAIT_S = 5.0

Wait = Callable[[float], bool]  # wait up to that many seconds; True when the scrub must stop


class ScrubStopped(GenMLXError):
    """The agent is stopping: the scrub gives up where it is (the next start scrubs again)."""


@dataclass(frozen=True)
class ScrubSettings:
    """How often and how fast the scrub reads."""

    interval_s: float = DEFAULT_SCRUB_INTERVAL_S
    bytes_per_s: float = DEFAULT_SCRUB_BYTES_PER_S
    chunk_bytes: int = SCRUB_CHUNK_BYTES


class Pacer:
    """Holds reading to ``bytes_per_s`` on average: after a chunk that got ahead of that rate, it
    waits until the rate is met again."""

    def __init__(self, bytes_per_s: float, wait: Wait, clock: Callable[[], float] | None = None):
        self._bytes_per_s = bytes_per_s
        self._wait = wait
        self._clock = clock or monotonic
        self._started = self._clock()
        self._done = 0

    def count(self, n: int) -> None:
        """Count ``n`` bytes read, waiting while ahead; raises ``ScrubStopped`` if told to stop."""
        self._done += n
        ahead = self._done / self._bytes_per_s - (self._clock() - self._started)
        if ahead > 0 and self._wait(ahead):
            raise ScrubStopped()


def scrub_model_dir(
    model_dir: Path, settings: ScrubSettings, wait: Wait, verified: VerifiedFiles | None = None
) -> str | None:
    """Re-hash every file of ``model_dir`` against its metadata; record and return the first problem,
    or None when the copy is intact or has no metadata (then it is not scrubbed). Blocks."""
    dir_fd = os.open(model_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        metadata = metadata_at(dir_fd, model_dir)
        if metadata is None:
            return None
        problem = first_problem(dir_fd, model_dir, metadata.files, settings, wait, verified)
        if not same_directory(dir_fd, model_dir):
            log.info("scrub: %s was replaced while being scrubbed; the new copy waits its turn", model_dir)
            return None
        if problem is not None:
            record_damage(dir_fd, problem)
            log.error("scrub: %s: %s: the copy is reported incomplete until synced again", model_dir, problem)
        elif clear_damage(dir_fd):
            log.info("scrub: %s is intact again: its damage mark is removed", model_dir)
        return problem
    finally:
        os.close(dir_fd)


def metadata_at(dir_fd: int, model_dir: Path) -> ModelMetadata | None:
    """The metadata of the directory open as ``dir_fd``; None without (or with unreadable) metadata,
    which the inventory reports on its own."""
    try:
        fd = os.open(METADATA_NAME, os.O_RDONLY, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        raw = f.read()
    try:
        return parse_metadata(json.loads(raw))
    except (ValueError, InvalidMetadata) as e:
        log.debug("scrub: skipping %s: its metadata is unusable (%s)", model_dir, e)
        return None


def same_directory(dir_fd: int, model_dir: Path) -> bool:
    """Whether ``model_dir`` still names the directory open as ``dir_fd``."""
    try:
        now = os.stat(model_dir)
    except FileNotFoundError:
        return False
    opened = os.fstat(dir_fd)
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


def first_problem(
    dir_fd: int,
    model_dir: Path,
    files: tuple[ModelFile, ...],
    settings: ScrubSettings,
    wait: Wait,
    verified: VerifiedFiles | None,
) -> str | None:
    """The first file that is not as recorded, as "path: what is wrong"; one bad file is enough to
    have the copy synced again, so the rest are not read."""
    for file in files:
        problem = scrub_file(dir_fd, model_dir, file, settings, wait, verified)
        if problem is not None:
            return f"{file.path}: {problem}"
    return None


def scrub_file(
    dir_fd: int,
    model_dir: Path,
    file: ModelFile,
    settings: ScrubSettings,
    wait: Wait,
    verified: VerifiedFiles | None,
) -> str | None:
    """What is wrong with one file, or None when its size and sha256 match."""
    try:
        fd = os.open(file.path, os.O_RDONLY, dir_fd=dir_fd)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        if info.st_size != file.size:
            return f"{info.st_size} bytes, expected {file.size}"
        good = paced_sha256(fd, settings, Pacer(settings.bytes_per_s, wait)) == file.sha256
    finally:
        os.close(fd)
    if verified is not None:
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        verified.remember(model_dir / file.path, file.sha256, identity, good=good)
    return None if good else "sha256 does not match"


def paced_sha256(fd: int, settings: ScrubSettings, pacer: Pacer) -> str:
    """The sha256 of the open file ``fd``, read in ``settings.chunk_bytes`` chunks at the pacer's rate."""
    hasher = hashlib.sha256()
    view = memoryview(bytearray(settings.chunk_bytes))
    offset = 0
    while n := os.readv(fd, [view]):
        hasher.update(view[:n])
        drop_from_cache(fd, offset, n)
        offset += n
        pacer.count(n)
    return hasher.hexdigest()


def drop_from_cache(fd: int, offset: int, length: int) -> None:
    # A scrub reads every model once: keeping it cached would evict what serving uses. Pages a rank
    # has mapped stay. macOS has no such advice; there the cache keeps what it read.
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def scrubbable_dirs(storage_paths: tuple[Path, ...]) -> list[Path]:
    """The model directories with metadata in every storage path, in order. Blocks."""
    return [d for root in storage_paths for d in model_dirs_in(root) if (d / METADATA_NAME).is_file()]


class Scrubber:
    """Runs the scrub on the event loop, its reading in a worker thread, one model at a time."""

    def __init__(
        self,
        storage_paths: tuple[Path, ...],
        settings: ScrubSettings,
        *,
        busy: Callable[[str], bool] = lambda model: False,
        verified: VerifiedFiles | None = None,
    ):
        self._storage_paths = storage_paths
        self._settings = settings
        self._busy = busy  # whether a transfer is writing that model
        self._verified = verified
        self._urgent: list[Path] = []
        self._wake = asyncio.Event()
        self._stopping = threading.Event()
        self._task: asyncio.Future | None = None

    def start(self) -> None:
        """Scrub every model now, then every interval; call on the running event loop."""
        self._task = asyncio.ensure_future(self._run())

    def scrub_soon(self, model_dir: Path) -> None:
        """Scrub ``model_dir`` before anything else (a rank running on it failed)."""
        if model_dir not in self._urgent:
            self._urgent.append(model_dir)
        self._wake.set()

    async def stop(self) -> None:
        """Stop within a chunk; the scrub in progress is abandoned (the next start scrubs again)."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await asyncio.wait([self._task], timeout=STOP_WAIT_S)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            found = await loop.run_in_executor(None, scrubbable_dirs, self._storage_paths)
            for model_dir in found:
                await self._scrub_urgent()
                await self._scrub(model_dir)
            log.info("scrub: %d models checked; next pass in %.0f s", len(found), self._settings.interval_s)
            await self._idle_until(loop.time() + self._settings.interval_s)

    async def _idle_until(self, deadline: float) -> None:
        """Wait for the next pass, scrubbing what is asked for meanwhile."""
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set() and (remaining := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return
            await self._scrub_urgent()

    async def _scrub_urgent(self) -> None:
        self._wake.clear()
        while self._urgent and not self._stopping.is_set():
            await self._scrub(self._urgent.pop(0))

    async def _scrub(self, model_dir: Path) -> None:
        if self._stopping.is_set() or self._busy(model_dir.name):
            return
        try:
            await run_in_worker_thread(
                f"scrub-{model_dir.name}",
                scrub_model_dir,
                model_dir,
                self._settings,
                self._stopping.wait,
                self._verified,
            )
        except ScrubStopped:
            return
        except OSError as e:  # vanished (deleted, replaced) or unreadable: the next pass looks again
            log.warning("scrub: could not scrub %s: %s", model_dir, e)
        except Exception:
            log.exception("scrub: scrubbing %s failed unexpectedly", model_dir)
