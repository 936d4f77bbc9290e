"""A file a download writes over several attempts, hashed as its bytes arrive.

``PartialFile`` appends to what an earlier attempt left on disk, reading that prefix once to seed
its hashes, so a file is read at most once in all however often its download is interrupted.
``ContentHashes`` keeps the sha256 we record and, where the source names files by git blob id
(small files on the Hugging Face Hub), the git blob sha1 as well.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

READ_BYTES = 4 * 1024 * 1024


class ContentHashes:
    """sha256 of the bytes fed so far, and optionally their git blob sha1, which needs the final
    size up front (git hashes ``b"blob <size>\\0" + content``)."""

    def __init__(self, size: int, with_git_sha1: bool):
        self.size = size
        self._sha256 = hashlib.sha256()
        self._git_sha1 = hashlib.sha1(b"blob %d\0" % size) if with_git_sha1 else None

    def update(self, chunk: bytes) -> None:
        self._sha256.update(chunk)
        if self._git_sha1 is not None:
            self._git_sha1.update(chunk)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    @property
    def git_sha1(self) -> str | None:
        return self._git_sha1.hexdigest() if self._git_sha1 is not None else None


def hash_file(path: Path, size: int, with_git_sha1: bool) -> ContentHashes:
    """The hashes of the file at ``path`` (one read); ``size`` is what it is expected to hold."""
    hashes = ContentHashes(size, with_git_sha1)
    with open(path, "rb") as f:
        feed(hashes, f)
    return hashes


def feed(hashes: ContentHashes, f: BinaryIO) -> int:
    """Feed ``hashes`` from ``f`` to its end; returns the bytes read."""
    total = 0
    while chunk := f.read(READ_BYTES):
        hashes.update(chunk)
        total += len(chunk)
    return total


class PartialFile:
    """An append-only file that hashes every byte written and reports its size after each write.

    Opened (as a context manager), it continues what is at ``path`` when that can be a prefix of a
    ``size``-byte file, and starts afresh otherwise; ``restart`` empties it (for a server that
    answers a Range request with the whole file).
    """

    def __init__(self, path: Path, size: int, with_git_sha1: bool, on_size: Callable[[int], None]):
        self.path = path
        self.expected_size = size
        self.with_git_sha1 = with_git_sha1
        self.on_size = on_size
        self.hashes = ContentHashes(size, with_git_sha1)
        self.size = 0
        self._file: BinaryIO | None = None

    def __enter__(self) -> PartialFile:
        if self.path.exists() and self.path.stat().st_size > self.expected_size:
            self.path.unlink()  # longer than the file: not a prefix of it
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed in __exit__
        with open(self.path, "rb") as f:
            self.size = feed(self.hashes, f)
        self.on_size(self.size)
        return self

    def __exit__(self, *exc: object) -> None:
        self.opened().close()

    def opened(self) -> BinaryIO:
        if self._file is None:
            raise ValueError(f"{self.path} is not open: use PartialFile as a context manager")
        return self._file

    @property
    def complete(self) -> bool:
        return self.size == self.expected_size

    def write(self, chunk: bytes) -> None:
        self.opened().write(chunk)
        self.hashes.update(chunk)
        self.size += len(chunk)
        self.on_size(self.size)

    def restart(self) -> None:
        self.opened().truncate(0)
        self.hashes = ContentHashes(self.expected_size, self.with_git_sha1)
        self.size = 0
        self.on_size(0)
