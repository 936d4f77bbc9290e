"""Read YAML into plain values while remembering where each value and key sits in the file.

PyYAML's node API (``compose``) keeps source marks that its constructed dicts lose. We walk the node
tree ourselves so that every later problem can be reported as ``FILE:LINE:COL: yaml.path: message``,
and so that duplicate keys, which PyYAML silently collapses, become errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from genmlx.core.errors import ManifestIssue
from genmlx.manifest.limits import MAX_DEPTH, MAX_MANIFEST_BYTES, MAX_VALUES

PathPart = str | int
YamlPath = tuple[PathPart, ...]

_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


def format_path(path: YamlPath) -> str:
    """``("spec", "models", 0, "nodes")`` → ``spec.models[0].nodes``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


@dataclass(frozen=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class Positions:
    """Source positions of the values (and mapping keys) of one YAML document, by YAML path."""

    values: dict[YamlPath, Position] = field(default_factory=dict)
    keys: dict[YamlPath, Position] = field(default_factory=dict)

    def of_value(self, path: YamlPath) -> Position:
        """Where the value at ``path`` starts, or its nearest ancestor's when it has no position."""
        for length in range(len(path), -1, -1):
            if path[:length] in self.values:
                return self.values[path[:length]]
        return Position(1, 1)

    def of_key(self, path: YamlPath) -> Position:
        """Where the key naming ``path`` sits in its mapping (falls back to the value's position)."""
        return self.keys.get(path) or self.of_value(path)


@dataclass
class ParsedYaml:
    """A document as plain values (``None`` when there is none) with its positions and the problems found."""

    data: Any
    positions: Positions
    issues: list[ManifestIssue]


def parse_yaml(text: str, filename: str) -> ParsedYaml:
    """Parse one YAML document; syntax errors, duplicate keys and documents beyond ``limits``
    come back as issues, never raised."""
    if len(text) > MAX_MANIFEST_BYTES:  # characters: never fewer than its UTF-8 bytes
        message = f"the manifest is larger than {MAX_MANIFEST_BYTES // 2**20} MiB"
        return ParsedYaml(None, Positions(), [ManifestIssue(filename, 1, 1, "", message)])
    try:
        loader = yaml.SafeLoader(text)  # the reader already refuses control characters here
        root = loader.get_single_node()
    except yaml.reader.ReaderError as error:
        return ParsedYaml(None, Positions(), [_reader_issue(error, text, filename)])
    except yaml.YAMLError as error:
        return ParsedYaml(None, Positions(), [_syntax_issue(error, filename)])
    except RecursionError:  # PyYAML composes nested collections recursively
        message = f"the document is nested more than {MAX_DEPTH} levels deep"
        return ParsedYaml(None, Positions(), [ManifestIssue(filename, 1, 1, "", message)])
    walker = _NodeWalker(loader, filename)
    try:
        data = walker.to_value(root, ()) if root is not None else None
    except _TooLarge as error:
        return ParsedYaml(None, Positions(), [ManifestIssue(filename, *error.where, "", error.message)])
    finally:
        loader.dispose()
    return ParsedYaml(data, walker.positions, walker.issues)


class _TooLarge(Exception):
    """The document goes beyond one of ``limits``: nothing of it is worth checking."""

    def __init__(self, where: Position, message: str):
        self.where = (where.line, where.column)
        self.message = message


def _mark_position(mark: yaml.Mark) -> Position:
    return Position(mark.line + 1, mark.column + 1)


def _syntax_issue(error: yaml.YAMLError, filename: str) -> ManifestIssue:
    """A PyYAML error as an issue at the place the parser gave up."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        where = _mark_position(error.problem_mark)
        message = f"YAML syntax error: {error.problem}"
        if error.context and error.context_mark is not None:
            start = _mark_position(error.context_mark)
            message += f" ({error.context} started at {start.line}:{start.column})"
        if "alias" in (error.context or "") + (error.problem or ""):
            # A bare * starts a YAML alias; the one place users type it is `nodes: *`.
            message += '; a literal * must be quoted: "*"'
        return ManifestIssue(filename, where.line, where.column, "", message)
    return ManifestIssue(filename, 1, 1, "", f"YAML syntax error: {error}")


def _reader_issue(error: yaml.reader.ReaderError, text: str, filename: str) -> ManifestIssue:
    """A character PyYAML refuses to read (a control character, say), located by its offset."""
    before = text[: error.position]
    line = before.count("\n") + 1
    column = error.position - (before.rfind("\n") + 1) + 1
    message = f"YAML syntax error: character #x{error.character:04x} is not allowed in YAML"
    return ManifestIssue(filename, line, column, "", message)


class _NodeWalker:
    """Turns composed YAML nodes into dicts, lists and scalars, recording positions on the way."""

    def __init__(self, loader: yaml.SafeLoader, filename: str):
        self.loader = loader
        self.filename = filename
        self.positions = Positions()
        self.issues: list[ManifestIssue] = []
        self.values = 0

    def to_value(self, node: yaml.Node, path: YamlPath) -> Any:
        where = _mark_position(node.start_mark)
        self.values += 1
        if self.values > MAX_VALUES:
            message = f"the document holds more than {MAX_VALUES:,} values once its aliases expand"
            raise _TooLarge(where, message)
        if len(path) > MAX_DEPTH:
            raise _TooLarge(where, f"the document is nested more than {MAX_DEPTH} levels deep")
        self.positions.values[path] = where
        try:
            if node.tag not in (_MAP_TAG, _SEQ_TAG) and not isinstance(node, yaml.ScalarNode):
                return self._unreadable(node.start_mark, path, f"a collection tagged {node.tag}")
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return [self.to_value(item, (*path, index)) for index, item in enumerate(node.value)]
            if node.tag == _TIMESTAMP_TAG:
                # `revision: 2024-05-01` means the text, not a datetime the schema would reject.
                return node.value
            return self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as error:  # an unknown !tag, a bad merge: the value is unusable
            return self._unreadable(error.problem_mark or node.start_mark, path, str(error.problem))
        except (ValueError, OverflowError):  # a number Python will not convert (thousands of digits)
            return self._unreadable(node.start_mark, path, "a number too large to read")

    def _unreadable(self, mark: yaml.Mark, path: YamlPath, problem: str) -> None:
        where = _mark_position(mark)
        message = f"cannot read this value: {problem}"
        self.issues.append(ManifestIssue(self.filename, where.line, where.column, format_path(path), message))

    def _mapping(self, node: yaml.MappingNode, path: YamlPath) -> dict[str, Any]:
        explicit_count = sum(1 for key_node, _ in node.value if key_node.tag != _MERGE_TAG)
        self.loader.flatten_mapping(node)  # puts the entries of `<<: *anchor` merges first
        split = len(node.value) - explicit_count
        result: dict[str, Any] = {}
        for key_node, value_node in node.value[split:]:
            key = _key_text(key_node)
            if key in result:
                self._report_duplicate(key, (*path, key), _mark_position(key_node.start_mark))
                continue
            self.positions.keys[(*path, key)] = _mark_position(key_node.start_mark)
            result[key] = self.to_value(value_node, (*path, key))
        # Merged entries fill only what the mapping does not say itself; among merges the later wins.
        merged = {_key_text(key_node): (key_node, value_node) for key_node, value_node in node.value[:split]}
        for key, (key_node, value_node) in merged.items():
            if key not in result:
                self.positions.keys[(*path, key)] = _mark_position(key_node.start_mark)
                result[key] = self.to_value(value_node, (*path, key))
        return result

    def _report_duplicate(self, key: str, path: YamlPath, where: Position) -> None:
        first = self.positions.keys[path]
        message = f"duplicate key '{key}' (first at line {first.line}); only one may be given"
        self.issues.append(ManifestIssue(self.filename, where.line, where.column, format_path(path), message))


def _key_text(key_node: yaml.Node) -> str:
    """A mapping key as written: `on:` is the text "on", not YAML 1.1's boolean."""
    return str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "<complex key>"
