"""The token file through a rotation (``genmlx.core.tokens``): the old token counts beside the new one
until its moment, a process follows its file as it changes, a sealed token opens only for the node
and key it was sealed for, and a rotation never cuts off a token still in use."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from genmlx.cli.rotate import RotationRefused, grace_seconds, rotate_token
from genmlx.core.signing import Keys, signing_key
from genmlx.core.tokens import (
    TokenFile,
    TokenFileError,
    TokenSource,
    read_token_file,
    seal_token,
    unseal_token,
    write_token_file,
)


def test_a_plain_token_file_is_a_token_alone(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("abc\n")
    assert read_token_file(tmp_path / "token") == TokenFile("abc")
    assert TokenFile("abc").tokens(0) == ("abc",)


def test_the_previous_token_counts_until_its_moment_and_the_file_reads_back(tmp_path: Path) -> None:
    tokens = TokenFile("new", "old", 1000.0, manual=True)
    write_token_file(tmp_path / "token", tokens)
    assert (tmp_path / "token").read_text() == "new\nprevious old until 1000 manual\n"
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    assert read_token_file(tmp_path / "token") == tokens
    assert tokens.tokens(999.0) == ("new", "old") and tokens.tokens(1000.0) == ("new",)


@pytest.mark.parametrize(
    "text", ["", "\n\n", "abc\nprevious old", "abc\nprevious old until soon", "abc\nold"]
)
def test_a_token_file_that_is_not_one_says_what_to_do(tmp_path: Path, text: str) -> None:
    (tmp_path / "token").write_text(text)
    with pytest.raises(TokenFileError, match="genmlx token"):
        read_token_file(tmp_path / "token")


def test_a_source_follows_its_file_and_keeps_the_last_good_content(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    source = TokenSource(path)
    assert source.token == "first"
    write_token_file(path, TokenFile("second", "first", time.time() + 60))
    bump(path)
    assert wait_for(lambda: source.token == "second")
    assert source.keys() == Keys.of("second", "first")
    path.write_text("")  # half-copied
    bump(path)
    time.sleep(1.1)
    assert source.token == "second"


def bump(path: Path) -> None:
    """A modification time unlike the last (a fast filesystem may reuse it within one tick)."""
    stamp = time.time_ns() + 5_000_000_000
    os.utime(path, ns=(stamp, stamp))


def wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_sealed_token_opens_only_for_its_node_and_key() -> None:
    key = signing_key("old-token")
    sealed = seal_token("new-token", key, "studio-a")
    assert unseal_token(sealed, key, "studio-a") == "new-token"
    assert "new-token" not in str(sealed)
    for other_key, node in [(signing_key("another"), "studio-a"), (key, "mini-b")]:
        with pytest.raises(ValueError):
            unseal_token(sealed, other_key, node)
    with pytest.raises(ValueError):
        unseal_token({**sealed, "sealed": sealed["sealed"][:-4] + "AAAA"}, key, "studio-a")


def test_a_rotation_keeps_the_old_token_for_the_grace_and_refuses_a_second_one_meanwhile(
    tmp_path: Path, capsys
) -> None:
    path = tmp_path / "token"
    path.write_text("original\n")
    rotate_token(path, "30m", manual=False, now=1000.0)
    rotated = read_token_file(path)
    assert rotated.previous == "original" and rotated.previous_until == 1000.0 + 1800
    assert rotated.current != "original" and len(rotated.current) >= 40
    assert "new key id" in capsys.readouterr().out
    with pytest.raises(RotationRefused, match="under way"):
        rotate_token(path, "30m", manual=False, now=1001.0)
    rotate_token(path, "1h", manual=True, now=1000.0 + 1800)
    assert read_token_file(path).previous == rotated.current and read_token_file(path).manual


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400)])
def test_a_grace_is_a_number_and_a_unit(text: str, seconds: int) -> None:
    assert grace_seconds(text) == seconds


@pytest.mark.parametrize("text", ["0s", "1 h", "soon", "-5m", "1y"])
def test_a_grace_that_does_not_parse_is_refused(text: str) -> None:
    with pytest.raises(RotationRefused):
        grace_seconds(text)
