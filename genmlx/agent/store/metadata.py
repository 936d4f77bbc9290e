"""A model directory's metadata file, ``.genmlx-model.json``: where the model came from and every
file's size and sha256, read and written through the wire codec (``genmlx.wire.codec``), and the
rules for names and relative paths inside the store."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from genmlx.core.errors import AgentRequestError, PermanentError
from genmlx.core.files import write_whole
from genmlx.wire.agent_state import MODEL_RECORD_NAME
from genmlx.wire.codec import WireError, WireType, bounded, decode
from genmlx.wire.rank_launch import MODEL_NAME

METADATA_NAME = MODEL_RECORD_NAME
SHA256 = re.compile(r"[0-9a-f]{64}")


class UnsafePath(AgentRequestError):
    """A relative path that would leave its directory: absolute, with "..", or otherwise odd."""


class InvalidMetadata(PermanentError):
    """A model's metadata file exists but cannot be read as ours."""


@dataclass(frozen=True)
class ModelFile(WireType):
    """One file of a model, by its path relative to the model directory ("/" separated)."""

    path: str
    size: int = bounded(minimum=0)
    sha256: str = bounded(pattern=SHA256, rule="must be 64 lowercase hex digits")

    def check(self) -> None:
        try:
            safe_relative_path(self.path)
        except UnsafePath as e:
            raise WireError("", str(e)) from None


@dataclass(frozen=True)
class ModelMetadata(WireType):
    """Where a model came from and what it holds, as kept in ``.genmlx-model.json``."""

    source: str | None  # "hf://org/repo", "file:///path", or None when unknown
    revision: str | None  # the revision asked for
    commit: str | None  # what it resolved to, where the source has commits
    files: tuple[ModelFile, ...]
    published_at: float = 0.0  # unix time

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def safe_relative_path(path: Any) -> str:
    """``path`` if it names a file inside a directory: relative, "/" separated, no "." or ".."
    component, no empty component, no backslash or NUL. Raises ``UnsafePath`` otherwise."""
    if not isinstance(path, str) or not path:
        raise UnsafePath(f"path: {path!r} must be a non-empty relative path")
    if "\\" in path or "\0" in path or path.startswith("/"):
        raise UnsafePath(f"path: {path!r} must be a relative path with '/' separators")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePath(f"path: {path!r} may not contain '..', '.' or empty components")
    return path


def safe_model_name(name: Any) -> str:
    """``name`` if it can be a model directory: one path segment of letters, digits, ".", "_" or
    "-", not starting with "." (those are the store's own). Raises ``UnsafePath`` otherwise."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise UnsafePath(
            f"model: {name!r} must be 1 to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def is_hidden(relative_path: str) -> bool:
    """Whether any component starts with "." (the store's own entries, caches, ``.DS_Store``)."""
    return any(part.startswith(".") for part in PurePosixPath(relative_path).parts)


def parse_metadata(data: Any) -> ModelMetadata:
    """Metadata as read from its file or a peer's listing; ``InvalidMetadata`` naming the field."""
    try:
        return decode(ModelMetadata, data, unknown="ignore")
    except WireError as e:
        raise InvalidMetadata(str(e)) from None


def read_metadata(model_dir: Path) -> ModelMetadata | None:
    """The directory's metadata, or None when it has none. Raises ``InvalidMetadata`` when the file
    is there but unreadable, so a damaged store is reported rather than taken for a bare directory."""
    try:
        raw = (model_dir / METADATA_NAME).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InvalidMetadata(f"{model_dir / METADATA_NAME}: {e.strerror}") from None
    try:
        return parse_metadata(json.loads(raw))
    except InvalidMetadata as e:
        raise InvalidMetadata(f"{model_dir / METADATA_NAME}: {e}") from None
    except ValueError as e:
        raise InvalidMetadata(f"{model_dir / METADATA_NAME}: not valid JSON ({e})") from None


def write_metadata(model_dir: Path, metadata: ModelMetadata) -> None:
    """Write the metadata file atomically (a temporary file renamed over it)."""
    write_whole(model_dir / METADATA_NAME, json.dumps(metadata.to_json(), indent=1) + "\n")
