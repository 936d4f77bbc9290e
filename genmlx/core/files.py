"""Files written whole: a reader sees the old text or the new, never part of one."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a partial file beside it, renamed over ``path`` once
    written; on failure the partial is removed, ``path`` is as it was, and the ``OSError`` raised."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise
