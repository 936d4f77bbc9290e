"""Files written whole (``genmlx.core.files``): the new text or the old, never part; the mode asked
for from the first byte, whatever the umask; nothing left behind when writing fails."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from genmlx.core.files import write_whole


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_text_replaces_the_file_whole_in_the_mode_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("old")
    old_umask = os.umask(0o077)  # a umask that would narrow 0o644
    try:
        write_whole(path, "new\n", mode=0o644)
        assert path.read_text() == "new\n" and mode_of(path) == 0o644
        write_whole(path, "secret\n", mode=0o600)
        assert path.read_text() == "secret\n" and mode_of(path) == 0o600
        write_whole(path, "plain\n")  # as any new file: 0o666 less the umask
        assert mode_of(path) == 0o600
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


def test_a_write_that_fails_leaves_the_file_as_it_was_and_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()  # a directory with something in it: the rename over it fails, for any user
    (target / "theirs").write_text("stays")
    with pytest.raises(OSError):
        write_whole(target, "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (target / "theirs").read_text() == "stays"
