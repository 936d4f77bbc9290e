"""The prefix cache's disk tier: KV state kept on the node's disk in blocks of ``block_tokens``
tokens, found again after a restart.

A block holds, for every layer, the keys and values of one run of ``block_tokens`` positions. Its
name is a hash chain over the token blocks up to and including its own (the first block's key
hashes the tier's namespace and its tokens, each next one the previous key and its tokens), so any
prompt finds the longest run of leading blocks any earlier sequence stored, and a block can only
ever be read back for exactly the tokens it was computed from. The namespace (a directory of its
own) is a digest of everything the KV state depends on besides the tokens: the model's files, the
rank's place in its group, the cache's format.

Blocks are safetensors files (``layers.<i>.keys``/``values``, the arrays as MLX holds them) whose
metadata carries the SHA-256 of their data: a block that does not match is a miss, never used.
The model thread only copies a finished sequence's blocks to host memory; a writer thread hashes
and writes them (to a temporary name, then renamed into place) and evicts the least recently used blocks
beyond ``max_bytes``. A read touches the file's modification time, which is what recency means.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

log = logging.getLogger(__name__)

FORMAT = "genmlx-kv-block/1"
SUFFIX = ".safetensors"
# safetensors' dtype names, and the unsigned integer of the same width that carries the raw bytes.
DTYPES = {
    mx.float16: ("F16", mx.uint16),
    mx.bfloat16: ("BF16", mx.uint16),
    mx.float32: ("F32", mx.uint32),
    mx.uint32: ("U32", mx.uint32),  # a quantized cache's packed values
    mx.int32: ("I32", mx.uint32),
}
RAW = {name: (dtype, raw) for dtype, (name, raw) in DTYPES.items()}
NUMPY_RAW = {mx.uint16: np.uint16, mx.uint32: np.uint32}
Record = tuple[dict[str, mx.array], dict[str, str]]  # a block's arrays, and what its metadata adds
HostArray = tuple[str, str, list[int], np.ndarray]  # name, safetensors dtype, shape, raw values
WRITE_QUEUE = 64  # blocks waiting to be written; more are dropped (the cache is best effort)


@dataclass(frozen=True)
class DiskTierSettings:
    """Where a dispatcher keeps its blocks and how much of the disk they may fill."""

    root: Path  # this model's and this rank's namespace directory
    max_bytes: int
    block_tokens: int = 256


@dataclass
class TierStats:
    """What the tier holds and how it was used since the dispatcher started."""

    entries: int = 0
    bytes: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    damaged: int = 0  # blocks found not to match their checksum (each was a miss, then deleted)


def namespace(identity: dict[str, Any]) -> str:
    """The directory name of a namespace: a digest of what the KV state depends on."""
    return hashlib.sha256(json.dumps({"format": FORMAT, **identity}, sort_keys=True).encode()).hexdigest()[
        :32
    ]


def block_keys(namespace_key: str, tokens: Sequence[int], block_tokens: int) -> list[str]:
    """The key of every whole block of ``tokens``, in order (a hash chain)."""
    keys, previous = [], namespace_key.encode()
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        block = struct.pack(f"<{block_tokens}q", *tokens[start : start + block_tokens])
        previous = hashlib.sha256(previous + block).hexdigest().encode()
        keys.append(previous.decode())
    return keys


class DiskTier:
    """Blocks of KV state under ``settings.root``, written in the background."""

    def __init__(self, settings: DiskTierSettings):
        self.settings = settings
        self.stats = TierStats()
        self._sizes: dict[str, int] = {}  # key -> file size, of the blocks on disk
        self._pending: set[str] = set()  # queued, not yet written
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, list[HostArray], dict[str, str] | None] | None] = queue.Queue(
            WRITE_QUEUE
        )
        settings.root.mkdir(parents=True, exist_ok=True)
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="genmlx-kv-writer", daemon=True)
        self._writer.start()

    # ----- reading, on the model thread -----

    def cached_run(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, are on disk."""
        with self._lock:
            return next((i for i, key in enumerate(keys) if key not in self._sizes), len(keys))

    def holds(self, key: str) -> bool:
        with self._lock:
            return key in self._sizes

    def absent(self, keys: Sequence[str]) -> list[int]:
        """The positions of ``keys`` neither on disk nor queued for writing."""
        with self._lock:
            return [i for i, key in enumerate(keys) if key not in self._sizes and key not in self._pending]

    def load(self, keys: Sequence[str]) -> list[Record]:
        """The blocks of ``keys``, each checked, up to the first that is missing or damaged (a
        damaged one is removed)."""
        blocks = []
        for key in keys:
            block = self._read(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def stored(self) -> list[str]:
        """Every key on disk."""
        with self._lock:
            return list(self._sizes)

    def _read(self, key: str) -> Record | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
            record = decode_block(data)
        except (OSError, ValueError) as e:
            self._forget(key, damaged=not isinstance(e, FileNotFoundError))
            log.warning("prompt cache block %s is unusable (%s): treated as a miss", key[:12], e)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: evicted last
        self.stats.read_bytes += len(data)
        return record

    # ----- writing -----

    def store(self, key: str, arrays: dict[str, mx.array], meta: dict[str, str] | None = None) -> None:
        """Queue block ``key`` (with ``meta`` in its metadata) unless it is on disk or queued;
        copies it to host memory here (on the model thread, while the arrays are valid) and writes
        it in the background."""
        with self._lock:
            if key in self._sizes or key in self._pending:
                return
            self._pending.add(key)
        try:
            self._queue.put_nowait((key, to_host(arrays), meta))
        except queue.Full:
            with self._lock:
                self._pending.discard(key)
            log.info("prompt cache writer is behind: block %s not written", key[:12])

    def close(self) -> None:
        """Finish the queued writes and stop the writer."""
        self._queue.put(None)
        self._writer.join()

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            key, host, meta = item
            try:
                self._write(key, encode_host(host, meta))
            except OSError as e:
                log.warning("could not write prompt cache block %s: %s", key[:12], e)
            finally:
                with self._lock:
                    self._pending.discard(key)
            self._evict()

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_bytes(data)
        os.replace(partial, path)
        with self._lock:
            self._sizes[key] = len(data)
            self.stats.written_bytes += len(data)
            self._count()

    def _evict(self) -> None:
        """Delete the least recently used blocks until the tier fits ``max_bytes``."""
        with self._lock:
            over = sum(self._sizes.values()) - self.settings.max_bytes
            keys = list(self._sizes)
        if over <= 0:
            return
        ages = sorted((self._mtime(key), key) for key in keys)
        for _, key in ages:
            if over <= 0:
                break
            over -= self._sizes.get(key, 0)
            self._forget(key)

    # ----- bookkeeping -----

    def _scan(self) -> None:
        for path in self.settings.root.glob(f"*/*{SUFFIX}"):
            with contextlib.suppress(OSError):
                self._sizes[path.name.removesuffix(SUFFIX)] = path.stat().st_size
        for partial in self.settings.root.glob("*/.*.partial"):  # a write cut short by a crash
            with contextlib.suppress(OSError):
                partial.unlink()
        self._count()
        if self._sizes:
            log.info(
                "prompt cache on disk: %d blocks, %.1f MB in %s",
                len(self._sizes),
                self.stats.bytes / 1e6,
                self.settings.root,
            )

    def _forget(self, key: str, damaged: bool = False) -> None:
        with contextlib.suppress(OSError):
            self._path(key).unlink()
        with self._lock:
            self._sizes.pop(key, None)
            self.stats.damaged += damaged
            self._count()

    def _count(self) -> None:
        self.stats.entries, self.stats.bytes = len(self._sizes), sum(self._sizes.values())

    def _mtime(self, key: str) -> float:
        try:
            return self._path(key).stat().st_mtime
        except OSError:
            return 0.0

    def _path(self, key: str) -> Path:
        return self.settings.root / key[:2] / f"{key}{SUFFIX}"


# ----------------------------------------------------------------------------------------------
# The block file: safetensors


def encode_block(arrays: dict[str, mx.array], meta: dict[str, str] | None = None) -> bytes:
    """A safetensors file of ``arrays``, its metadata carrying ``meta`` and the SHA-256 of its
    data."""
    return encode_host(to_host(arrays), meta)


def to_host(arrays: dict[str, mx.array]) -> list[HostArray]:
    """A copy of ``arrays`` in host memory, in name order: what ``encode_host`` needs, taken while
    the arrays are valid (the model thread's part of writing a block)."""
    host = []
    for name in sorted(arrays):
        array = arrays[name]
        dtype_name, raw = DTYPES[array.dtype]
        host.append((name, dtype_name, list(array.shape), np.array(array.view(raw))))
    return host


def encode_host(host: Sequence[HostArray], meta: dict[str, str] | None = None) -> bytes:
    """The safetensors file of arrays copied by ``to_host``."""
    header: dict[str, Any] = {}
    chunks, offset = [], 0
    for name, dtype_name, shape, values in host:
        data = values.tobytes()
        header[name] = {"dtype": dtype_name, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    body = b"".join(chunks)
    header["__metadata__"] = {**(meta or {}), "format": FORMAT, "sha256": hashlib.sha256(body).hexdigest()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + body


def decode_block(data: bytes) -> Record:
    """The arrays and metadata of a block file; ``ValueError`` unless it is one of ours and its
    data matches."""
    if len(data) < 8:
        raise ValueError("truncated")
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError:
        raise ValueError("unreadable header") from None
    metadata = header.pop("__metadata__", {})
    body = memoryview(data)[8 + length :]
    if metadata.get("format") != FORMAT or hashlib.sha256(body).hexdigest() != metadata.get("sha256"):
        raise ValueError("checksum mismatch")
    arrays = {}
    for name, spec in header.items():
        dtype, raw = RAW[spec["dtype"]]
        start, end = spec["data_offsets"]
        values = np.frombuffer(body[start:end], dtype=NUMPY_RAW[raw]).reshape(spec["shape"])
        arrays[name] = mx.array(values).view(dtype)
    return arrays, metadata
