"""The cluster manifest: cluster.yaml in, frozen ``Manifest`` dataclasses or a ``ManifestError`` out.

Nothing past this package sees raw YAML: ``load_manifest`` validates against
``schemas/cluster.schema.json`` plus the rules the schema cannot state, and reports every problem at
once as ``FILE:LINE:COL: yaml.path: message``.
"""

from __future__ import annotations

from genmlx.manifest.loader import format_issues, load_manifest, load_manifest_text
from genmlx.manifest.schema import schema_path
from genmlx.manifest.types import Manifest

__all__ = [
    "Manifest",
    "format_issues",
    "load_manifest",
    "load_manifest_text",
    "schema_path",
]
