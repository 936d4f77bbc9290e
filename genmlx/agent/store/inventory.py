"""What a node holds: the model directories in each storage path (complete ones, and partial ones
that a transfer is writing), and which paths a rank may load.

Every function here touches the disk and may take a while on a large model (sizes walk every
file), so the server calls them through an executor, never on the event loop. A state poll must
stay cheap, so completeness here checks presence, sizes and the scrub's damage mark only; sha256
is checked when a model is published or adopted, when its files are served or synced (see
``store``), and by the scrub in the background (see ``scrub``).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

from genmlx.agent.store.metadata import (
    METADATA_NAME,
    InvalidMetadata,
    ModelMetadata,
    read_metadata,
    safe_model_name,
)
from genmlx.agent.store.model_shape import model_shape_or_none
from genmlx.agent.store.model_store import PARTIAL_DIR_NAME, completeness_problem, is_complete
from genmlx.core.errors import AgentRequestError, ModelNotFound
from genmlx.wire.agent_state import StorageReport, StoredModel

log = logging.getLogger(__name__)


class ModelPathRefused(AgentRequestError):
    """A launch named a model path outside every storage path of this agent."""


def scan_storage(paths: tuple[Path, ...]) -> tuple[StorageReport, ...]:
    """One report per storage path, in the configured order."""
    return tuple(scan_storage_path(path) for path in paths)


def scan_storage_path(path: Path) -> StorageReport:
    """Capacity of ``path`` and every model directory directly under it."""
    if not path.is_dir():
        return StorageReport(path=str(path), exists=False, total_bytes=0, free_bytes=0)
    usage = shutil.disk_usage(path)
    return StorageReport(
        path=str(path),
        exists=True,
        total_bytes=usage.total,
        free_bytes=usage.free,
        models=tuple(describe_model_dir(child) for child in model_dirs_in(path)),
        partials=tuple(describe_partial_dir(child) for child in model_dirs_in(path / PARTIAL_DIR_NAME)),
    )


def model_dirs_in(path: Path) -> list[Path]:
    """Immediate subdirectories of ``path``, by name, leaving out hidden ones (the store's own) and
    symlinks (a model lives whole in one storage path, and a link could lead anywhere)."""
    try:
        with os.scandir(path) as entries:
            found = [
                Path(e.path)
                for e in entries
                if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
            ]
    except FileNotFoundError:
        return []
    return sorted(found, key=lambda p: p.name)


def describe_model_dir(path: Path) -> StoredModel:
    metadata = metadata_or_none(path)
    problem = completeness_problem(path)
    complete = problem is None
    return StoredModel(
        name=path.name,
        path=str(path),
        size_bytes=directory_size(path),
        complete=complete,
        source=metadata.source if metadata else None,
        revision=metadata.revision if metadata else None,
        commit=metadata.commit if metadata else None,
        shape=model_shape_or_none(path) if complete else None,  # a half-written config says nothing
        problem=problem,
        published_at=published_at(path) if metadata else None,
    )


def published_at(model_dir: Path) -> float | None:
    """When the copy's metadata was written, which publishing a copy does last (unix time)."""
    try:
        return (model_dir / METADATA_NAME).stat().st_mtime
    except OSError:
        return None


def describe_partial_dir(path: Path) -> StoredModel:
    """A model a transfer is writing (or left when interrupted): never complete."""
    return StoredModel(name=path.name, path=str(path), size_bytes=directory_size(path), complete=False)


def metadata_or_none(path: Path) -> ModelMetadata | None:
    try:
        return read_metadata(path)
    except InvalidMetadata as e:
        log.warning("%s", e)  # reported as incomplete by is_complete_model_dir
        return None


def is_complete_model_dir(path: Path) -> bool:
    """Every file the metadata lists is there with its size and the scrub found no damage; without
    metadata (a model put there by hand), ``config.json`` and at least one ``*.safetensors`` file."""
    return is_complete(path)


def directory_size(path: Path) -> int:
    """Bytes in the regular files under ``path``, without following symlinks."""
    total = 0
    pending = [path]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    total += regular_file_size(entry, pending)
        except OSError as e:
            # A download may rename or delete directories while we walk; the next scan counts them.
            log.debug("skipped %s while sizing %s: %s", directory, path, e)
    return total


def regular_file_size(entry: os.DirEntry, pending: list[Path]) -> int:
    """The size of ``entry`` if it is a regular file; a real directory is queued for walking."""
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError as e:
        log.debug("skipped %s while sizing: %s", entry.path, e)
        return 0
    if stat.S_ISDIR(info.st_mode):
        pending.append(Path(entry.path))
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def find_complete_model(storage_paths: tuple[Path, ...], name: str) -> Path | None:
    """The first directory ``<storage>/<name>`` (not a symlink) that holds a complete model."""
    safe_model_name(name)
    for root in storage_paths:
        candidate = root / name
        if candidate.is_dir() and not candidate.is_symlink() and is_complete(candidate):
            return candidate
    return None


def resolve_model_dir(model_path: str, storage_paths: tuple[Path, ...]) -> Path:
    """The real path of a complete model directory inside one of ``storage_paths``.

    Symlinks and ``..`` are resolved before the check, so no spelling of a path escapes its
    storage root. Raises ``ModelPathRefused`` or ``ModelNotFound`` naming the ``modelPath`` field.
    """
    if not os.path.isabs(model_path):
        raise ModelPathRefused(f"modelPath: {model_path!r} is not an absolute path")
    real = Path(os.path.realpath(model_path))
    roots = [Path(os.path.realpath(root)) for root in storage_paths]
    if not any(real != root and real.is_relative_to(root) for root in roots):
        where = ", ".join(str(p) for p in storage_paths) or "none configured"
        raise ModelPathRefused(f"modelPath: {model_path} is outside this agent's storage paths ({where})")
    if not real.is_dir():
        raise ModelNotFound(f"modelPath: {model_path} is not a directory")
    if not is_complete_model_dir(real):
        raise ModelNotFound(
            f"modelPath: {model_path} is not a complete model (files missing, or without metadata "
            "no config.json and *.safetensors weights)"
        )
    return real
