"""Each rank's combined stdout and stderr, in ``<log_dir>/<model>.<rank>.log``, kept bounded.

The rank writes to the file itself (opened with ``O_APPEND``), so its output survives the agent.
When the file grows past ``LOG_CAP_BYTES`` the agent keeps only its last ``LOG_KEEP_BYTES``; thanks
to ``O_APPEND`` the rank's next write lands at the new end instead of leaving a hole. Each start
moves the earlier runs' logs along (``.log`` to ``.log.1``, ``.log.1`` to ``.log.2``, ...), keeping
``KEPT_RUNS`` of them: the output of the run that crashed is still there after its restart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LOG_CAP_BYTES = 4 * 1024 * 1024
LOG_KEEP_BYTES = 1024 * 1024
DEFAULT_TAIL_BYTES = 64 * 1024
KEPT_RUNS = 3  # earlier runs' logs kept beside the current one


def rank_log_path(log_dir: Path, key: str) -> Path:
    return log_dir / f"{key}.log"


def rank_hostfile_path(log_dir: Path, key: str) -> Path:
    return log_dir / f"{key}.hostfile.json"


def rank_devices_path(log_dir: Path, key: str) -> Path:
    return log_dir / f"{key}.ibv-devices.json"


def earlier_run_log_path(path: Path, runs_ago: int) -> Path:
    """The log of the run ``runs_ago`` starts before the current one (1: the one just before)."""
    return path.with_name(f"{path.name}.{runs_ago}")


def open_new_run_log(path: Path, kept_runs: int = KEPT_RUNS) -> int:
    """Move the earlier runs' logs along (dropping the oldest), start an empty log for this run and
    return a write-only, append-mode descriptor for the rank."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for runs_ago in range(kept_runs, 0, -1):  # oldest first, each over the one a run older
        newer = path if runs_ago == 1 else earlier_run_log_path(path, runs_ago - 1)
        if newer.exists():
            newer.replace(earlier_run_log_path(path, runs_ago))
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)


def write_hostfile(path: Path, hostfile: tuple[str, ...]) -> None:
    """MLX's ring-backend hostfile: a JSON list holding one list of ``"ip:port"`` per rank."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([[address] for address in hostfile]))


def log_needs_trimming(path: Path) -> bool:
    try:
        return path.stat().st_size > LOG_CAP_BYTES
    except FileNotFoundError:
        return False


def trim_log(path: Path, keep: int = LOG_KEEP_BYTES) -> None:
    """Keep the last ``keep`` bytes of ``path`` in place. A line the rank writes between the read
    and the truncate is lost: acceptable for a log, and far rarer than the bound is useful."""
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size <= keep:
            return
        f.seek(size - keep)
        tail = f.read()
        f.seek(0)
        f.write(b"[... earlier output trimmed by the agent ...]\n" + tail)
        f.truncate()


def read_log_tail(path: Path, max_bytes: int) -> bytes:
    """The last ``max_bytes`` of ``path``; empty when the file is gone."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read()
    except FileNotFoundError:
        return b""
