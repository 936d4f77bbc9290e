"""GitOps watch: re-apply the manifest file whenever it changes on disk (an edit, a `git pull`).

The folder is watched rather than the file, since editors and git replace files by renaming.
An invalid edit is recorded (status shows it as Stalled, with every error) and the last good
manifest keeps serving until a valid one arrives.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import watchfiles

from genmlx.core.errors import ManifestError
from genmlx.manifest.revision import file_revision
from genmlx.master.runtime.loop import Reconciler

log = logging.getLogger("genmlx.master")

DEBOUNCE_MS = 200


def apply_file(reconciler: Reconciler, path: Path) -> None:
    """Apply ``path`` as it is now, logging the outcome either way."""
    try:
        outcome = reconciler.apply(path.read_text(), str(path), file_revision(path))
    except ManifestError as e:
        keeps = (
            f"generation {reconciler.applied.generation} keeps serving"
            if reconciler.applied
            else "nothing runs"
        )
        log.error("%s is invalid (%d error(s)); %s:\n%s", path, len(e.issues), keeps, e)
        return
    except OSError as e:  # mid-rename, or deleted: the next change event brings it back
        log.warning("could not read %s: %s", path, e)
        return
    what = "applied" if outcome.changed else "unchanged"
    log.info("%s %s (generation %d)", path, what, outcome.applied.generation)


async def watch_manifest(path: Path, reconciler: Reconciler, stop: asyncio.Event) -> None:
    """Re-apply ``path`` after every change until ``stop`` is set."""
    target = path.resolve()

    def is_target(_change: watchfiles.Change, changed: str) -> bool:
        return Path(changed).resolve() == target

    log.info("watching %s for changes", path)
    async for _ in watchfiles.awatch(
        target.parent, watch_filter=is_target, debounce=DEBOUNCE_MS, stop_event=stop
    ):
        apply_file(reconciler, path)
