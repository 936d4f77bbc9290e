"""cluster.yaml → Manifest, or a ManifestError listing every problem at once.

The pipeline: decode → parse YAML (positions kept, duplicate keys caught) → JSON Schema → schema
defaults → semantic checks → dataclasses. Each stage adds issues rather than stopping, except where a
later stage would have nothing to look at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genmlx.core.errors import ManifestError, ManifestIssue
from genmlx.manifest.build import build_manifest
from genmlx.manifest.checks import semantic_issues
from genmlx.manifest.positions import parse_yaml
from genmlx.manifest.schema import with_defaults
from genmlx.manifest.schema_issues import schema_issues
from genmlx.manifest.types import Manifest

_TOP_LEVEL_KEYS = "apiVersion, kind, metadata and spec"


def load_manifest(path: str | Path) -> Manifest:
    """Load and validate the manifest file at ``path``; issues name the file as ``path`` was given."""
    filename = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise ManifestError(
            [ManifestIssue(filename, 1, 1, "", f"cannot read the file: {error.strerror}")]
        ) from None
    return load_manifest_text(_decoded(raw, filename), filename)


def load_manifest_text(text: str, filename: str) -> Manifest:
    """Validate manifest ``text`` (``filename`` is only used in issues) and build the dataclasses."""
    issues, data = _checked(text, filename)
    if issues:
        raise ManifestError(issues)
    return build_manifest(data)


def _checked(text: str, filename: str) -> tuple[list[ManifestIssue], Any]:
    """Every issue of ``text``, and its data with defaults filled in (meaningful only without issues)."""
    parsed = parse_yaml(text.removeprefix("\ufeff"), filename)
    if parsed.issues and parsed.data is None:
        return parsed.issues, None  # a syntax error: there is no document to check
    if not isinstance(parsed.data, dict):
        return [*parsed.issues, _not_a_mapping(parsed.data, filename)], None
    issues = list(parsed.issues)
    data = with_defaults(parsed.data)
    for found in (
        schema_issues(parsed.data, parsed.positions, filename),
        semantic_issues(data, parsed.positions, filename),
    ):
        # One report per place: a value already rejected by an earlier stage needs no second opinion.
        rejected_paths = {issue.path for issue in issues if issue.path}
        issues += [issue for issue in found if issue.path not in rejected_paths]
    return issues, data


def format_issues(error: ManifestError) -> str:
    """One ``FILE:LINE:COL: yaml.path: message`` line per issue, in file order."""
    return "\n".join(str(issue) for issue in error.issues)


def _not_a_mapping(data: Any, filename: str) -> ManifestIssue:
    if data is None:
        return ManifestIssue(filename, 1, 1, "", f"the file is empty; a manifest needs {_TOP_LEVEL_KEYS}")
    kind = "a list" if isinstance(data, list) else f"a single {type(data).__name__} value"
    return ManifestIssue(filename, 1, 1, "", f"a manifest is a mapping of {_TOP_LEVEL_KEYS}, not {kind}")


def _decoded(raw: bytes, filename: str) -> str:
    """The file as text; bytes that are not UTF-8 become an issue at their line and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        byte = raw[error.start]
        message = f"the file is not valid UTF-8 (byte 0x{byte:02x}); save it as UTF-8"
        raise ManifestError([ManifestIssue(filename, line, column, "", message)]) from None
