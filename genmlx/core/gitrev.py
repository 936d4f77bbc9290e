"""The git revision of a manifest file: the commit it was applied from, and whether the file
differed from that commit (dirty). Asked of the ``git`` command; no repository means no
revision, which is fine (a manifest need not live in git)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Revision:
    commit: str
    dirty: bool  # the file has uncommitted changes, or is not tracked at all

    def __str__(self) -> str:
        return self.commit[:12] + ("-dirty" if self.dirty else "")

    def to_json(self) -> dict[str, Any]:
        return {"commit": self.commit, "dirty": self.dirty}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Revision | None:
        return cls(commit=d["commit"], dirty=bool(d["dirty"])) if d else None


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
