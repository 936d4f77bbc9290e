"""The last applied manifest: the one piece of state the master owns, kept on disk so a
restarted master serves the same cluster. Written atomically (temporary file, then rename)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from genmlx.core.errors import ManifestError
from genmlx.core.files import write_whole
from genmlx.manifest import load_manifest_text
from genmlx.manifest.types import Manifest
from genmlx.wire.status import Revision

log = logging.getLogger("genmlx.master")


@dataclass(frozen=True)
class AppliedManifest:
    manifest: Manifest
    text: str  # the YAML as applied, so it can be shown and re-validated
    filename: str
    revision: Revision | None
    generation: int  # grows by one whenever the manifest's content changes
    applied_at: float  # unix time


class AppliedStore:
    """``<folder>/applied.yaml`` holds the text, ``applied.json`` the rest."""

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self) -> AppliedManifest | None:
        try:
            text = (self.folder / "applied.yaml").read_text()
            meta = json.loads((self.folder / "applied.json").read_text())
        except FileNotFoundError:
            return None
        try:
            manifest = load_manifest_text(text, meta["filename"])
        except ManifestError as e:
            log.error("the stored manifest no longer validates, starting without one:\n%s", e)
            return None
        revision = Revision.from_json(meta["revision"]) if meta.get("revision") else None
        return AppliedManifest(
            manifest, text, meta["filename"], revision, meta["generation"], meta["appliedAt"]
        )

    def save(self, applied: AppliedManifest) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "filename": applied.filename,
            "revision": applied.revision.to_json() if applied.revision else None,
            "generation": applied.generation,
            "appliedAt": applied.applied_at,
        }
        write_whole(self.folder / "applied.yaml", applied.text)
        write_whole(self.folder / "applied.json", json.dumps(meta, indent=2))
