"""Files written whole: a reader sees the old text or the new, never part of one."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_whole(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` through a partial file beside it, renamed over ``path`` once
    written; on failure the partial is removed, ``path`` is as it was, and the error raised.

    ``mode``: the file's permissions, exactly, from its first byte (0o600: its owner's alone);
    None: as any new file gets them (0o666 less the umask). The partial's name is this writer's
    own (process and random suffix), so writers racing each other never share one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "w") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # the umask does not narrow it
            f.write(text)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
