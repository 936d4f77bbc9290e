"""How `genmlx status`, `get`, `describe` and `ui` find the master: `--master`, `$GENMLX_MASTER`, the
manifest given with `-f`, else the default port, and what they say when nothing answers there.
(test_cluster.py runs them against a real master.)"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import free_port

import genmlx.cli.master_client as master_client
from genmlx.cli.main import main
from genmlx.cli.read_commands import NAME_THE_MASTER, reading_master


def manifest_file(tmp_path: Path, master_port: int, token_file: Path | None = None) -> Path:
    auth = f"  auth: {{tokenFile: {token_file}}}\n" if token_file else ""
    path = tmp_path / "cluster.yaml"
    path.write_text(
        f"""\
apiVersion: genmlx/v1
kind: Cluster
metadata: {{name: reads}}
spec:
  master: {{node: b, port: {master_port}}}
{auth}  nodes:
    - {{name: a, address: "127.0.0.2:6790", storage: [{{path: /tmp/a}}]}}
    - {{name: b, address: "127.0.0.1:6790", storage: [{{path: /tmp/b}}]}}
  models: []
"""
    )
    return path


def read_args(file: Path | None = None, master: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(file=file, master=master)


@pytest.fixture
def no_master_named(monkeypatch: pytest.MonkeyPatch) -> str:
    """No $GENMLX_MASTER, and a default URL where nothing listens (never a real 6789)."""
    monkeypatch.delenv("GENMLX_MASTER", raising=False)
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(master_client, "DEFAULT_MASTER_URL", url)
    return url


def test_the_manifest_names_the_master_node_its_port_and_the_token(
    tmp_path: Path, token: str, no_master_named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "other-token"
    token_file.write_text("the-manifest's-token\n")
    manifest = manifest_file(tmp_path, 7123, token_file)
    assert reading_master(read_args(manifest)) == ("http://127.0.0.1:7123", "the-manifest's-token")
    assert reading_master(read_args()) == (no_master_named, token)
    monkeypatch.setenv("GENMLX_MASTER", "10.1.2.3:7000")
    assert reading_master(read_args(manifest))[0] == "http://10.1.2.3:7000", "GENMLX_MASTER wins over -f"
    assert reading_master(read_args(manifest, "http://m:1"))[0] == "http://m:1", "--master wins over both"


@pytest.mark.parametrize(
    "command", [["status"], ["get", "models"], ["describe", "node", "a"], ["ui", "--no-open"]]
)
def test_nothing_at_the_default_says_how_to_name_the_master(
    command: list[str], token: str, no_master_named: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(command) == 2
    error = capsys.readouterr().err
    assert f"no master answers at {no_master_named}" in error
    assert NAME_THE_MASTER in error and "--master URL" in error and "GENMLX_MASTER" in error
    assert "-f cluster.yaml" in error


def test_a_named_master_that_does_not_answer_is_named_without_the_hint(
    tmp_path: Path, token: str, no_master_named: str, capsys: pytest.CaptureFixture
) -> None:
    port = free_port()
    assert main(["status", "-f", str(manifest_file(tmp_path, port))]) == 2
    error = capsys.readouterr().err
    assert f"no master answers at http://127.0.0.1:{port}" in error
    assert NAME_THE_MASTER not in error
    assert main(["get", "nodes", "--master", no_master_named]) == 2
    assert NAME_THE_MASTER not in capsys.readouterr().err


def test_status_text_lists_impostors_and_a_token_rotation() -> None:
    from genmlx.wire.status import ClusterStatus, ConditionReport, ImpostorReport, TokenRotationReport

    status = ClusterStatus(
        generation=1,
        observed_generation=1,
        conditions=(ConditionReport("Ready", "True", "AllReady", "every node and model is Ready", "t"),),
        name="desk",
        impostors=(ImpostorReport("b", "10.0.0.9:6790", "the reply is not signed"),),
        token_rotation=TokenRotationReport("2026-12-06T12:00:00Z", ("b",), manual=True),
    )
    text = master_client.format_status(status)
    assert "token rotation: the old token counts until 2026-12-06T12:00:00Z; nodes still on it: b" in text
    assert "(copy the token file to them)" in text
    assert "impostors (announce a node's name, cannot prove they hold the token; never used):" in text
    assert "b     10.0.0.9:6790  the reply is not signed" in text


def test_describe_model_says_how_its_batch_was_chosen_in_one_line():
    from genmlx.wire.status import ConditionReport, ModelBatching, ModelStatus

    reason = "maxBatch 12: serving.maxBatch; maxQueue 96: 8 per batch slot, at least 64"
    model = ModelStatus(
        "demo",
        "file:///models/demo",
        "main",
        ("a",),
        "auto",
        "Ready",
        (ConditionReport("Ready", "True", "Serving", "serving at http://127.0.0.1:8100/v1"),),
        batching=ModelBatching(12, 96, reason),
    )
    lines = master_client.format_described(model, ()).splitlines()
    assert f"Batching: {reason}" in lines
    assert not any(line.strip().startswith("batching:") for line in lines), "not the raw object as well"
