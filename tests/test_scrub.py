"""The agent's scrub: stored models re-hashed in the background, a changed or missing file reported
so the master re-syncs the copy from a peer. Unit tests on real files, the rank-exit hook with a
real process, and a real master with two agents on loopback."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, wait_until
from test_rollout import TwoNodes

from genmlx.agent.config import SCRUB_INTERVAL_ENV
from genmlx.agent.ranks.supervisor import RankSupervisor
from genmlx.agent.store.file_serving import ServedFile, VerifiedFiles, stat_identity
from genmlx.agent.store.inventory import describe_model_dir, find_complete_model
from genmlx.agent.store.metadata import read_metadata
from genmlx.agent.store.model_store import DAMAGE_NAME, adopt
from genmlx.agent.store.scrub import Pacer, Scrubber, ScrubSettings, ScrubStopped, scrub_model_dir
from genmlx.agent.transfers.peer_sync import files_to_fetch, link_existing_copy
from genmlx.wire.agent_state import StoredModel
from genmlx.wire.rank_launch import RankLaunch

WEIGHTS = "model.safetensors"
CHUNK = 64 * 1024
FAST = ScrubSettings(bytes_per_s=1e12, chunk_bytes=CHUNK)


def never_stop(seconds: float) -> bool:
    return False


def stored_model(root: Path, name: str = "tiny", weight_bytes: int = 5 * CHUNK + 123) -> Path:
    """A model directory with metadata (adopted): config.json, and weights in a subdirectory too."""
    model_dir = root / name
    (model_dir / "extra").mkdir(parents=True)
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / WEIGHTS).write_bytes(os.urandom(weight_bytes))
    (model_dir / "extra" / "more.safetensors").write_bytes(os.urandom(1000))
    adopt(model_dir)
    return model_dir


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place: same size, other content."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_flipped_byte_makes_the_copy_incomplete_with_the_file_named_and_nothing_deleted(tmp_path):
    model_dir = stored_model(tmp_path)
    flip_byte(model_dir / WEIGHTS, 3 * CHUNK + 7)
    assert describe_model_dir(model_dir).complete, "sizes alone cannot see a changed byte"

    problem = scrub_model_dir(model_dir, FAST, never_stop)

    assert problem == f"{WEIGHTS}: sha256 does not match"
    reported = describe_model_dir(model_dir)
    assert (reported.complete, reported.problem) == (False, problem)
    assert find_complete_model((tmp_path,), "tiny") is None  # neither served to peers nor launched
    assert (model_dir / WEIGHTS).stat().st_size == 5 * CHUNK + 123


def test_an_intact_model_is_not_reported_and_a_repaired_one_loses_its_mark(tmp_path):
    model_dir = stored_model(tmp_path)
    assert scrub_model_dir(model_dir, FAST, never_stop) is None
    assert not (model_dir / DAMAGE_NAME).exists()
    assert describe_model_dir(model_dir).problem is None

    original = (model_dir / WEIGHTS).read_bytes()
    flip_byte(model_dir / WEIGHTS, 0)
    assert scrub_model_dir(model_dir, FAST, never_stop) is not None
    (model_dir / WEIGHTS).write_bytes(original)  # put back by hand
    assert scrub_model_dir(model_dir, FAST, never_stop) is None
    reported = describe_model_dir(model_dir)
    assert (reported.complete, reported.problem) == (True, None)


def test_a_deleted_file_is_reported_by_the_inventory_and_by_the_scrub(tmp_path):
    model_dir = stored_model(tmp_path)
    (model_dir / "extra" / "more.safetensors").unlink()
    reported = describe_model_dir(model_dir)
    assert (reported.complete, reported.problem) == (False, "extra/more.safetensors: missing")
    assert scrub_model_dir(model_dir, FAST, never_stop) == "extra/more.safetensors: missing"


def test_a_directory_without_metadata_is_not_scrubbed(tmp_path):
    model_dir = tmp_path / "by-hand"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / WEIGHTS).write_bytes(b"anything")
    assert scrub_model_dir(model_dir, FAST, never_stop) is None
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", WEIGHTS]
    assert describe_model_dir(model_dir).complete


class SimulatedTime:
    """A clock that moves only when the scrub waits, recording every wait."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return False


def test_reading_is_paced_to_the_rate_in_chunks_of_the_configured_size(tmp_path, monkeypatch):
    weight_bytes = 10 * CHUNK
    model_dir = stored_model(tmp_path, weight_bytes=weight_bytes)
    reads: list[int] = []
    real_readv = os.readv

    def recording_readv(fd: int, buffers: list) -> int:
        reads.append(sum(len(b) for b in buffers))
        return real_readv(fd, buffers)

    monkeypatch.setattr(os, "readv", recording_readv)
    simulated = SimulatedTime()
    monkeypatch.setattr("genmlx.agent.store.scrub.monotonic", simulated.clock)
    settings = ScrubSettings(bytes_per_s=CHUNK * 4.0, chunk_bytes=CHUNK)

    assert scrub_model_dir(model_dir, settings, simulated.wait) is None

    assert set(reads) == {CHUNK}, "every read asks for one chunk"
    # The weights take 10 chunks at 4 chunks a second: 2.5 s of waiting for them alone.
    total_bytes = sum(f.size for f in read_metadata(model_dir).files)
    assert simulated.now == pytest.approx(total_bytes / settings.bytes_per_s, rel=0.01)
    assert max(simulated.waits) <= CHUNK / settings.bytes_per_s + 1e-9, "never more than a chunk ahead"


def test_the_pacer_waits_only_when_ahead_of_the_rate():
    simulated = SimulatedTime()
    pacer = Pacer(100.0, simulated.wait, simulated.clock)
    simulated.now = 5.0  # 5 s passed before the first read: 500 bytes may come at once
    pacer.count(300)
    pacer.count(200)
    assert simulated.waits == []
    pacer.count(100)
    assert simulated.waits == [pytest.approx(1.0)]


def test_a_stop_during_the_scrub_leaves_no_mark(tmp_path):
    model_dir = stored_model(tmp_path)
    flip_byte(model_dir / WEIGHTS, 0)
    with pytest.raises(ScrubStopped):
        scrub_model_dir(model_dir, ScrubSettings(bytes_per_s=1.0, chunk_bytes=CHUNK), lambda s: True)
    assert not (model_dir / DAMAGE_NAME).exists()


def test_a_copy_published_over_the_one_being_scrubbed_is_not_marked(tmp_path):
    """A sync replaces a damaged copy by renaming a fresh one into place while the scrub still reads
    the old: the scrub's finding is about the old copy, so the new one must stay complete."""
    model_dir = stored_model(tmp_path)
    fresh = stored_model(tmp_path / "partial")
    flip_byte(model_dir / WEIGHTS, 0)

    def publish_meanwhile(seconds: float) -> bool:
        if fresh.exists():
            os.rename(model_dir, tmp_path / ".discarded")
            os.rename(fresh, model_dir)
        return False

    slow = ScrubSettings(bytes_per_s=1.0, chunk_bytes=CHUNK)  # every chunk waits: the hook runs
    assert scrub_model_dir(model_dir, slow, publish_meanwhile) is None
    assert not (model_dir / DAMAGE_NAME).exists()
    assert describe_model_dir(model_dir).complete


def test_the_verdicts_are_remembered_for_serving(tmp_path):
    model_dir = stored_model(tmp_path)
    flip_byte(model_dir / WEIGHTS, 0)
    verified = VerifiedFiles()
    scrub_model_dir(model_dir, FAST, never_stop, verified)
    files = {f.path: f for f in read_metadata(model_dir).files}
    served = ServedFile("tiny", files[WEIGHTS], model_dir / WEIGHTS, stat_identity(model_dir / WEIGHTS))
    assert verified.verdict(served) == "corrupt"


def test_stored_model_problem_round_trips():
    stored = StoredModel("m", "/s/m", 10, False, problem="model.safetensors: sha256 does not match")
    assert StoredModel.from_json(stored.to_json()) == stored
    assert StoredModel.from_json({**stored.to_json(), "problem": None}).problem is None


def test_the_scrubber_checks_every_model_at_start_skips_busy_ones_and_scrubs_on_request(tmp_path):
    damaged = stored_model(tmp_path, "damaged")
    busy = stored_model(tmp_path, "busy")
    for model_dir in (damaged, busy):
        flip_byte(model_dir / WEIGHTS, 1)
    later = tmp_path / "later"

    async def scenario() -> None:
        scrubber = Scrubber((tmp_path,), ScrubSettings(interval_s=3600), busy=lambda name: name == "busy")
        scrubber.start()
        try:
            await until(lambda: (damaged / DAMAGE_NAME).exists())
            # Made after the first pass listed the models, and the next is an hour away: only a
            # request (a failed rank's) scrubs it now.
            flip_byte(stored_model(tmp_path, "later") / WEIGHTS, 2)
            scrubber.scrub_soon(later)
            await until(lambda: (later / DAMAGE_NAME).exists())
        finally:
            await scrubber.stop()

    asyncio.run(scenario())
    assert not (busy / DAMAGE_NAME).exists()


async def until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def supervisor_running(tmp_path: Path, code: str, asked: list[Path]) -> RankSupervisor:
    """A supervisor whose ranks run ``code`` (``{rank}`` replaced by theirs) instead of a dispatcher,
    recording in ``asked`` each model directory it asks to be scrubbed."""
    return RankSupervisor(
        token="not-a-secret",
        host="127.0.0.1",
        log_dir=tmp_path / "logs",
        stop_grace_s=2.0,
        command=lambda launch, *rest: [sys.executable, "-c", code.replace("{rank}", str(launch.rank))],
        on_failed_exit=asked.append,
    )


def test_a_rank_that_fails_has_its_model_directory_scrubbed(tmp_path):
    asked: list[Path] = []
    supervisor = supervisor_running(tmp_path, "raise SystemExit(3)", asked)

    async def scenario() -> int | None:
        supervisor.watch()
        supervisor.start(RankLaunch("failing", str(tmp_path), 0, 1, free_port(), "spec"), tmp_path / "m")
        await until(lambda: supervisor.ranks()[0].state == "exited")
        exit_code = supervisor.ranks()[0].exit_code
        await supervisor.stop_all()
        return exit_code

    assert asyncio.run(scenario()) == 3
    assert asked == [tmp_path / "m"]


def test_a_rank_that_exits_cleanly_or_is_stopped_asks_for_no_scrub(tmp_path):
    asked: list[Path] = []
    supervisor = supervisor_running(tmp_path, "import time; time.sleep({rank} * 60)", asked)

    async def scenario() -> None:
        supervisor.watch()
        supervisor.start(RankLaunch("clean", str(tmp_path), 0, 1, free_port(), "spec"), tmp_path / "a")
        supervisor.start(RankLaunch("stopped", str(tmp_path), 1, 2, free_port(), "spec"), tmp_path / "b")
        await until(lambda: any(r.state == "exited" for r in supervisor.ranks()))
        await supervisor.stop("stopped", 1)
        await supervisor.stop_all()

    asyncio.run(scenario())
    assert asked == []


DEMO_ON_BOTH = "    - {{name: demo, source: 'file://{storage_a}/demo', nodes: [a, b]}}\n"


@pytest.fixture
def scrubbing_nodes(tmp_path, demo_model_dir):
    """Master and agents a and b serving demo as one 2-rank group; each agent scrubs every second."""
    cluster = TwoNodes(
        tmp_path, DEMO_ON_BOTH, {SCRUB_INTERVAL_ENV: "1"}, preload={"a": (demo_model_dir, "demo")}
    )
    yield cluster
    cluster.stop()


class CopyReports:
    """Every report of node b's copy of demo that the master's status shows, polled in a thread so
    that a short-lived one is not missed between the test's own checks."""

    def __init__(self, cluster: TwoNodes):
        self._cluster = cluster
        self.problems: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> CopyReports:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._done.wait(0.1):
            copy = copy_on_b(self._cluster.status())
            if copy is not None and copy["problem"] and copy["problem"] not in self.problems:
                self.problems.append(copy["problem"])


def copy_on_b(document: dict | None) -> dict | None:
    nodes = {n["name"]: n for n in document["nodes"]} if document else {}
    copies = [m for s in nodes.get("b", {}).get("storage", ()) for m in s["models"] if m["name"] == "demo"]
    return copies[0] if copies else None


def served_again(cluster: TwoNodes) -> dict | None:
    """The status once demo serves from a complete copy on b."""
    document = cluster.status()
    models = {m["name"]: m for m in document["models"]} if document else {}
    model, copy = models.get("demo"), copy_on_b(document)
    if not model or model["conditions"][0]["reason"] != "Serving" or not (copy and copy["complete"]):
        return None
    return document


def replaced(directory: Path, inode: int) -> bool:
    try:
        return directory.stat().st_ino != inode
    except FileNotFoundError:  # between the old copy's removal and the new one's rename
        return False


def chat(cluster: TwoNodes) -> int:
    reply = cluster.client().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
    )
    return reply.usage.completion_tokens


@pytest.mark.e2e
def test_a_corrupted_and_then_a_deleted_weights_file_on_one_node_is_synced_again_from_the_other(
    scrubbing_nodes,
):
    cluster = scrubbing_nodes
    copy_b = cluster.storage["b"] / "demo"
    wait_until(lambda: served_again(cluster), 120, what="demo to serve from both nodes")
    assert chat(cluster) == 2
    original = (cluster.storage["a"] / "demo" / WEIGHTS).read_bytes()
    replaced_inode = copy_b.stat().st_ino  # a resync publishes a fresh directory in its place
    intact_inode = (copy_b / "tokenizer.json").stat().st_ino

    # One byte changed on b, size kept: only the scrub can tell.
    with CopyReports(cluster) as reports:
        flip_byte(copy_b / WEIGHTS, len(original) // 2)
        wait_until(lambda: reports.problems, 60, what="b's copy to be reported damaged")
        wait_until(lambda: replaced(copy_b, replaced_inode) and served_again(cluster), 120, what="a resync")
    assert reports.problems[0] == f"{WEIGHTS}: sha256 does not match"
    assert (copy_b / WEIGHTS).read_bytes() == original
    assert not (copy_b / DAMAGE_NAME).exists()
    assert (copy_b / "tokenizer.json").stat().st_ino == intact_inode, "intact files are reused, not copied"
    assert chat(cluster) == 2

    # A weights file deleted on b: its inventory reports it missing at once.
    replaced_inode = copy_b.stat().st_ino
    with CopyReports(cluster) as reports:
        (copy_b / WEIGHTS).unlink()
        wait_until(lambda: reports.problems, 60, what="b's copy to be reported incomplete")
        wait_until(lambda: replaced(copy_b, replaced_inode) and served_again(cluster), 120, what="a resync")
    assert reports.problems[0] == f"{WEIGHTS}: missing"
    assert (copy_b / WEIGHTS).read_bytes() == original
    assert chat(cluster) == 2
    agent_b = next(proc for proc in cluster.procs if "b" in proc.args and "agent" in proc.args)
    assert f"{WEIGHTS}: sha256 does not match" in agent_b.output()


def test_a_resync_reuses_the_intact_files_of_the_copy_it_replaces_and_leaves_that_copy_alone(tmp_path):
    existing = stored_model(tmp_path / "storage")
    listed = read_metadata(existing).files
    flip_byte(existing / WEIGHTS, 5)
    (existing / "config.json").unlink()
    partial = tmp_path / "partial"
    partial.mkdir()

    link_existing_copy(existing, partial, listed)
    fetched = files_to_fetch(partial, listed)

    assert sorted(f.path for f in fetched) == ["config.json", WEIGHTS]
    assert (partial / "extra" / "more.safetensors").samefile(existing / "extra" / "more.safetensors")
    assert not (partial / WEIGHTS).exists(), "the damaged file is dropped, to be fetched whole"
    assert (existing / WEIGHTS).stat().st_nlink == 1 and (existing / WEIGHTS).stat().st_size > 0
