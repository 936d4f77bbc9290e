"""The package layout holds its contract: the import layers of pyproject.toml (import-linter), a
stated contract in every package, and few loose modules at the top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import genmlx

PACKAGE = Path(genmlx.__file__).parent
ROOT = PACKAGE.parent


def test_the_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("lint-imports is missing: install the test extras (pip install -e '.[test]')")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_every_package_states_its_contract() -> None:
    missing = [
        str(init.relative_to(ROOT))
        for init in PACKAGE.rglob("__init__.py")
        if not ast.get_docstring(ast.parse(init.read_text()))
    ]
    assert missing == [], f"packages without a docstring saying what they promise: {missing}"


def test_the_top_level_holds_only_a_handful_of_loose_modules() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= 5, f"modules at genmlx/'s top level belong in a layer: {loose}"


def test_no_module_is_over_400_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > 400
    }
    assert long == {}, f"split these by what they do: {long}"
