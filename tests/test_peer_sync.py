"""Peer sync between two real agents on loopback: B pulls a model from A through A's file endpoints.

What A served is read from A's own log ("served <model>/<path> bytes <first>-<last>: <n> bytes"),
so the tests see exactly which bytes crossed the wire.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from agent_harness import Agent, start_agent
from conftest import free_port, http_status, wait_until

from genmlx.agent.store.metadata import METADATA_NAME, read_metadata
from genmlx.agent.store.model_store import partial_dir
from genmlx.wire.agent_state import FetchRequest, StoredModel, Transfer
from genmlx.wire.rank_launch import RankLaunch
from genmlx.wire.serving import ServingSettings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SERVED = re.compile(
    r"served (?P<model>\S+?)/(?P<path>\S+) bytes (?P<first>\d+)-(?P<last>\d+): (?P<sent>\d+) bytes"
)
BIG_FILE_BYTES = 200 * 1024 * 1024


def served(agent: Agent, since: int = 0) -> list[tuple[str, int, int]]:
    """(path, first byte, bytes sent) of every file request ``agent`` answered, after log offset ``since``."""
    return [
        (m["path"], int(m["first"]), int(m["sent"])) for m in SERVED.finditer(agent.proc.output()[since:])
    ]


def model_files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != METADATA_NAME
    }


@pytest.fixture
def storage_a(tmp_path: Path, demo_model_dir: Path) -> Path:
    root = tmp_path / "a-storage"
    shutil.copytree(demo_model_dir, root / "demo-llama")
    return root


@pytest.fixture
def agent_a(spawn, token: str, storage_a: Path) -> Agent:
    return start_agent(spawn, token, "node-a", (storage_a,))


@pytest.fixture
def storage_b(tmp_path: Path) -> Path:
    root = tmp_path / "b-storage"
    root.mkdir()
    return root


@pytest.fixture
def agent_b(spawn, token: str, storage_b: Path) -> Agent:
    return start_agent(spawn, token, "node-b", (storage_b,))


def sync_request(storage_b: Path, agent_a: Agent, model: str = "demo-llama") -> FetchRequest:
    return FetchRequest(model, str(storage_b), peer=agent_a.address)


def test_b_copies_a_model_from_a_and_serves_it(
    agent_a: Agent, agent_b: Agent, storage_a: Path, storage_b: Path
):
    reply = agent_b.fetch(sync_request(storage_b, agent_a))
    assert reply.status == 202, reply.body
    started = Transfer.from_json(reply.json()["transfer"])
    assert (started.kind, started.origin, started.storage_path) == (
        "sync",
        f"peer {agent_a.address}/demo-llama",
        str(storage_b),
    )
    done = agent_b.wait_transfer("demo-llama")
    assert (done.state, done.error) == ("done", None)

    original = model_files(storage_a / "demo-llama")
    assert model_files(storage_b / "demo-llama") == original
    assert done.bytes_done == done.bytes_total == sum(len(d) for d in original.values())
    ours, theirs = read_metadata(storage_b / "demo-llama"), read_metadata(storage_a / "demo-llama")
    assert (ours.source, ours.revision, ours.commit, ours.files) == (
        theirs.source,
        theirs.revision,
        theirs.commit,
        theirs.files,
    ), "B keeps A's source, revision, commit and file list"
    assert not partial_dir(storage_b, "demo-llama").exists()
    model = next(m for m in agent_b.state().storage[0].models if m.name == "demo-llama")
    assert (model.complete, model.source) == (True, (storage_a / "demo-llama").resolve().as_uri())
    assert sorted(path for path, _, _ in served(agent_a)) == sorted(original)

    again = agent_b.fetch(sync_request(storage_b, agent_a))
    assert again.status == 200, "a model already complete is not fetched again"
    assert StoredModel.from_json(again.json()["model"]).path == str(storage_b / "demo-llama")

    serving = ServingSettings(context_length=256)

    launch = RankLaunch("demo", str(storage_b / "demo-llama"), 0, 1, free_port(), "spec", serving=serving)
    assert agent_b.call("POST", "/api/v1/ranks", launch.to_json()).status == 201
    health = f"http://127.0.0.1:{launch.port}/health"
    wait_until(lambda: http_status(health) == 200, timeout=90, what="B's rank to load the synced model")
    assert agent_b.call("DELETE", "/api/v1/ranks/demo/0").status == 200


def add_big_file(agent_a: Agent, storage_a: Path) -> None:
    """A file big enough that a sync is still under way when the test stops its peer."""
    with open(storage_a / "demo-llama" / "big.safetensors", "wb") as f:
        for _ in range(BIG_FILE_BYTES // (8 << 20)):
            f.write(os.urandom(8 << 20))
    assert agent_a.call("GET", "/api/v1/models/demo-llama/files").status == 200  # A adopts it now


def start_sync_then_freeze_a(agent_a: Agent, agent_b: Agent, storage_b: Path) -> None:
    """Start the sync and SIGSTOP A as soon as the big file starts arriving, so B cannot finish.
    The file is watched on disk (a stat), not through B's state, to react within microseconds."""
    arriving = partial_dir(storage_b, "demo-llama") / "big.safetensors"
    assert agent_b.fetch(sync_request(storage_b, agent_a)).status == 202
    wait_until(
        lambda: arriving.is_file() and arriving.stat().st_size > 0,
        timeout=30,
        interval=0.0005,
        what="B to write its first bytes of the big file",
    )
    os.kill(agent_a.proc.pid, signal.SIGSTOP)


def test_b_killed_mid_sync_fetches_only_what_was_missing_after_a_restart(
    spawn, token: str, agent_a: Agent, agent_b: Agent, storage_a: Path, storage_b: Path
):
    add_big_file(agent_a, storage_a)
    start_sync_then_freeze_a(agent_a, agent_b, storage_b)
    try:
        running = agent_b.transfer("demo-llama")
        assert running.state == "running" and 0 < running.bytes_done < running.bytes_total, running
        duplicate = agent_b.fetch(sync_request(storage_b, agent_a))
        assert (duplicate.status, duplicate.error_type()) == (409, "TransferRunning")
        agent_b.proc.signal(signal.SIGKILL)
        agent_b.proc.popen.wait(10)
    finally:
        os.kill(agent_a.proc.pid, signal.SIGCONT)
    total = running.bytes_total

    partial = partial_dir(storage_b, "demo-llama")
    listed = read_metadata(storage_a / "demo-llama").files
    present = {f.path: (partial / f.path).stat().st_size for f in listed if (partial / f.path).is_file()}
    missing = sum(f.size - present.get(f.path, 0) for f in listed)
    assert 0 < missing < total, (present, missing, total)
    assert not (storage_b / "demo-llama").exists(), "a killed sync publishes nothing"

    # A logs the interrupted request once it notices B is gone; what it serves after that is the resume.
    wait_until(
        lambda: any(path == "big.safetensors" for path, _, _ in served(agent_a)),
        timeout=10,
        what="A to log the request B's death cut short",
    )
    mark = len(agent_a.proc.output())
    restarted = start_agent(spawn, token, "node-b", (storage_b,), port=agent_b.port)
    assert [m.name for m in restarted.state().storage[0].partials] == ["demo-llama"]
    assert restarted.fetch(sync_request(storage_b, agent_a)).status == 202
    done = restarted.wait_transfer("demo-llama")
    assert (done.state, done.bytes_done, done.bytes_total) == ("done", total, total), done

    resent = served(agent_a, since=mark)
    assert sum(sent for _, _, sent in resent) == missing, "only the missing bytes crossed the wire again"
    for path, first, _ in resent:
        assert first == present.get(path, 0), f"{path} resumed from where B stopped"
    assert model_files(storage_b / "demo-llama") == model_files(storage_a / "demo-llama")


def test_an_agent_stopped_mid_sync_exits_at_once_and_keeps_its_partial(
    agent_a: Agent, agent_b: Agent, storage_a: Path, storage_b: Path
):
    add_big_file(agent_a, storage_a)
    start_sync_then_freeze_a(agent_a, agent_b, storage_b)
    try:
        began = time.monotonic()
        agent_b.proc.signal(signal.SIGTERM)
        assert agent_b.proc.popen.wait(15) == 0
        assert time.monotonic() - began < 5, "a sync blocked on a silent peer does not hold the agent up"
    finally:
        os.kill(agent_a.proc.pid, signal.SIGCONT)
    assert (partial_dir(storage_b, "demo-llama") / "big.safetensors").is_file()
    assert not (storage_b / "demo-llama").exists()


def test_a_corrupted_byte_on_a_is_detected_and_nothing_is_published(
    agent_a: Agent, agent_b: Agent, storage_a: Path, storage_b: Path
):
    assert agent_a.call("GET", "/api/v1/models/demo-llama/files").status == 200  # A records the sha256s
    weights = storage_a / "demo-llama" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 0x01]))

    assert agent_b.fetch(sync_request(storage_b, agent_a)).status == 202
    failed = agent_b.wait_transfer("demo-llama")
    assert (failed.state, failed.permanent) == ("failed", True), failed
    assert "sha256" in failed.error and "model.safetensors" in failed.error, failed.error
    assert not (storage_b / "demo-llama").exists()
    assert [m.name for m in agent_b.state().storage[0].models] == []
    assert "does not match its recorded sha256" in agent_a.proc.output()
    refused = agent_a.call("GET", "/api/v1/models/demo-llama/files/model.safetensors")
    assert (refused.status, refused.error_type()) == (409, "CorruptFile")
    assert (
        sum(sent for path, _, sent in served(agent_a) if path == "model.safetensors") < weights.stat().st_size
    )


def test_a_damaged_partial_on_b_is_detected_and_fetched_again(
    agent_a: Agent, agent_b: Agent, storage_a: Path, storage_b: Path
):
    original = model_files(storage_a / "demo-llama")
    partial = partial_dir(storage_b, "demo-llama")
    partial.mkdir(parents=True)
    (partial / "config.json").write_bytes(original["config.json"])  # whole and intact: kept
    damaged = bytearray(original["model.safetensors"])
    damaged[1000] ^= 0xFF
    (partial / "model.safetensors").write_bytes(damaged)  # whole but wrong: fetched again
    half = bytearray(original["tokenizer.json"][: len(original["tokenizer.json"]) // 2])
    half[10] ^= 0xFF
    (partial / "tokenizer.json").write_bytes(half)  # a damaged prefix: resumed, then fetched again
    (partial / "stale.bin").write_bytes(b"left by an older attempt")
    (partial / ".scratch" / "deep").mkdir(parents=True)
    (partial / ".scratch" / "deep" / "x.part").write_bytes(b"a download's scratch file")

    assert agent_b.fetch(sync_request(storage_b, agent_a)).status == 202
    done = agent_b.wait_transfer("demo-llama")
    assert done.state == "done", done
    assert model_files(storage_b / "demo-llama") == original
    assert sorted(p.name for p in (storage_b / "demo-llama").iterdir()) == sorted([*original, METADATA_NAME])

    requests = served(agent_a)
    assert [r for r in requests if r[0] == "config.json"] == []
    assert [(first, sent) for path, first, sent in requests if path == "model.safetensors"] == [
        (0, len(original["model.safetensors"]))
    ]
    assert [(first, sent) for path, first, sent in requests if path == "tokenizer.json"] == [
        (len(half), len(original["tokenizer.json"]) - len(half)),
        (0, len(original["tokenizer.json"])),
    ]
    assert "failed its sha256 check" in agent_b.proc.output()


def test_a_peer_that_refuses_our_token_or_does_not_answer_fails_the_sync(
    spawn, tmp_path: Path, agent_a: Agent, storage_b: Path
):
    home = tmp_path / "other-cluster"
    home.mkdir()
    (home / "token").write_text("another-clusters-token\n")
    port = free_port()
    args = ["-m", "genmlx", "agent", "--name", "node-x", "--port", str(port), "--host", "127.0.0.1"]
    proc = spawn(
        [*args, "--storage", str(storage_b)],
        "node-x",
        env={"GENMLX_HOME": str(home), "GENMLX_DISCOVERY": "off"},
    )
    wait_until(lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200, timeout=30, interval=0.05)
    stranger = Agent("node-x", port, (storage_b,), "another-clusters-token", proc)

    assert stranger.fetch(sync_request(storage_b, agent_a)).status == 202
    refused = stranger.wait_transfer("demo-llama")
    assert (refused.state, refused.permanent) == ("failed", True)
    assert "refused our signature" in refused.error
    assert "another-clusters-token" not in proc.output() + agent_a.proc.output()

    nobody = FetchRequest("demo-llama", str(storage_b), peer=f"127.0.0.1:{free_port()}")
    assert stranger.fetch(nobody).status == 202
    unreachable = stranger.wait_transfer("demo-llama")
    assert (unreachable.state, unreachable.permanent) == ("failed", False), unreachable
    assert "did not answer" in unreachable.error
