"""Fuzzed manifests: every one is loaded whole or refused whole with ``FILE:LINE:COL`` issues.

Hypothesis generates manifests two ways: the example manifest with one field mutated (a value of
another type, a huge number, unicode, deep nesting, a key removed or an unknown one added), and
the example's text with hostile YAML spliced in (anchors and aliases, merge keys, tags, duplicate
keys, directives, stray documents, control characters). Hand-written cases add what random search
would not find in time: billion-laughs alias expansion, nesting deeper than Python's stack, a huge
file, invalid UTF-8. Each must come back as a ``Manifest`` or a ``ManifestError`` whose every
issue is ``FILE:LINE:COL: path: message`` inside the file: never another exception, never a hang
(the test's timeout). The same texts go through ``genmlx validate`` (no traceback, exit 1) and a
real master's ``POST /api/v1/manifest`` (applied whole, or refused with nothing changed:
``test_fuzzed_manifests_applied_to_a_master_change_it_whole_or_not_at_all``).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genmlx.core.errors import ManifestError
from genmlx.manifest import load_manifest_text
from genmlx.manifest.limits import MAX_DEPTH, MAX_MANIFEST_BYTES, MAX_VALUES
from genmlx.manifest.types import Manifest

# Examples per property: a few hundred in the suite; `GENMLX_FUZZ_EXAMPLES=20000` searches longer.
EXAMPLES = int(os.environ.get("GENMLX_FUZZ_EXAMPLES", "300"))
EXAMPLE = (Path(__file__).parent.parent / "examples" / "cluster.yaml").read_text()
ISSUE = re.compile(r"^f\.yaml:(\d+):(\d+):( [^\s:]+:)? .+")
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # YAML cannot carry surrogates
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
SNIPPETS = st.sampled_from(
    [
        "x: &a {cpu: 1}\n",
        "y: *a\n",
        "<<: *a\n",
        "z: *undefined\n",
        "apiVersion: !!python/object/apply:os.system ['true']\n",
        "kind: !custom tagged\n",
        "w: !!binary aGVsbG8=\n",
        "spec: {}\n",
        "spec:\n",
        "apiVersion: genmlx.dev/v1\n",
        "? [complex, key]\n: value\n",
        "%YAML 1.1\n---\n",
        "---\nsecond: document\n",
        "...\n",
        "\t- tab\n",
        "  - indented: [unclosed\n",
        "key: 'unterminated\n",
        "nodes: *\n",
        "\x07\n",
        "revision: 2024-05-01\n",
        "port: 0x1F\n",
        "port: 1e400\n",
        "on: yes\n",
    ]
)


def outcome(text: str) -> Manifest | ManifestError:
    try:
        return load_manifest_text(text, "f.yaml")
    except ManifestError as e:
        return e


def check_whole(text: str) -> Manifest | ManifestError:
    """Loaded, or refused with issues that each point inside the file."""
    result = outcome(text)
    if isinstance(result, ManifestError):
        assert result.issues, "a refusal names at least one problem"
        lines = text.count("\n") + 1
        for issue in result.issues:
            match = ISSUE.match(str(issue))
            assert match, str(issue)
            assert 1 <= int(match[1]) <= lines and int(match[2]) >= 1, str(issue)
    else:
        assert isinstance(result, Manifest)
    return result


def paths(value, prefix=()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths(child, (*prefix, index))
    return found


@st.composite
def mutated_manifests(draw) -> str:
    """The example manifest with one place changed."""
    data = copy.deepcopy(yaml.safe_load(EXAMPLE))
    path = draw(st.sampled_from(paths(data)[1:]))
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    operation = draw(st.sampled_from(["replace", "delete", "add"]))
    if operation == "replace":
        parent[path[-1]] = draw(VALUES)
    elif operation == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(TEXT)] = draw(VALUES)
    else:
        parent.insert(path[-1], draw(VALUES))
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


@st.composite
def spliced_manifests(draw) -> str:
    """The example's text with hostile YAML put in at a line, indented or not."""
    lines = EXAMPLE.splitlines(keepends=True)
    at = draw(st.integers(0, len(lines)))
    indent = draw(st.sampled_from(["", "  ", "    "]))
    snippet = "".join(indent + line for line in draw(SNIPPETS).splitlines(keepends=True))
    return "".join(lines[:at]) + snippet + "".join(lines[at:])


def test_the_example_manifest_loads():
    assert isinstance(check_whole(EXAMPLE), Manifest)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_manifests())
def test_a_mutated_manifest_is_loaded_whole_or_refused_with_located_issues(text):
    check_whole(text)


@settings(max_examples=EXAMPLES, deadline=None)
@given(spliced_manifests())
def test_hostile_yaml_is_loaded_whole_or_refused_with_located_issues(text):
    check_whole(text)


@settings(max_examples=EXAMPLES // 3, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_are_refused_with_located_issues(data):
    from genmlx.manifest.loader import load_manifest

    with tempfile.NamedTemporaryFile(suffix=".yaml") as file:
        file.write(data)
        file.flush()
        try:
            result = load_manifest(file.name)
        except ManifestError as e:
            assert all(issue.line >= 1 and issue.column >= 1 for issue in e.issues)
        else:
            assert isinstance(result, Manifest)


def billion_laughs(levels: int = 9) -> str:
    text = 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for level in range(1, levels):
        aliases = ", ".join([f"*a{level - 1}"] * 9)
        text += f"a{level}: &a{level} [{aliases}]\n"
    return text


HOSTILE = {
    "billion laughs": (billion_laughs(), "aliases expand"),
    "nested deeper than the stack": ("spec: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested"),
    "nested mappings": ("spec:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 600)), "nested"),
    "a huge file": (
        "apiVersion: genmlx.dev/v1\n" + "# padding\n" * (MAX_MANIFEST_BYTES // 10),
        "larger than",
    ),
    "a python tag": ("apiVersion: !!python/object/apply:os.system ['true']\n", "cannot read this value"),
    "a huge integer": (EXAMPLE.replace("port: 6789", "port: " + "9" * 5000), "port"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_manifests_are_refused_in_bounded_time_and_space(name):
    text, words = HOSTILE[name]
    result = check_whole(text)
    assert isinstance(result, ManifestError), name
    assert words in str(result), str(result)[:500]


def test_the_limits_are_what_the_docs_say():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert f"{MAX_MANIFEST_BYTES // 2**20} MiB" in readme and f"{MAX_DEPTH} levels" in readme
    assert f"{MAX_VALUES:,} values" in readme


@pytest.mark.timeout(120)
def test_genmlx_validate_refuses_hostile_files_without_a_traceback(tmp_path):
    for name, (text, _) in HOSTILE.items():
        path = tmp_path / "f.yaml"
        path.write_text(text)
        done = subprocess.run(
            [sys.executable, "-m", "genmlx", "validate", "-f", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, (name, done.stdout, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and done.stderr.startswith(str(path)), (
            name,
            done.stderr[-2000:],
        )
