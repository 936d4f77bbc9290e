"""The git revision of a manifest file: the commit it was applied from, and whether the file
differed from that commit (dirty). Asked of the ``git`` command; no repository means no
revision, which is fine (a manifest need not live in git)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from genmlx.wire.status import Revision


def file_revision(path: Path) -> Revision | None:
    """The HEAD commit of the repository holding ``path``, or None outside a repository."""
    folder = path.resolve().parent
    commit = run_git(folder, "rev-parse", "HEAD")
    if commit is None:
        return None
    status = run_git(folder, "status", "--porcelain", "--", path.resolve().name)
    return Revision(commit=commit, dirty=bool(status))


def run_git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
