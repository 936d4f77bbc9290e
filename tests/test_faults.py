"""Faults on the network-namespace bench, each recovering with nothing corrupt served.

Two or three hosts, a master on the first, the demo model as a tensor group over two of them
(``fault_bench``). Each test breaks one thing, states what a client sees while it is broken, and
checks that the model serves again within a bound (recorded by ``fault_bench.recovered``, for
``docs/reliability.md``) with the same answer at temperature 0 as before the fault: never text
from half a model.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest
from conftest import skip_or_fail, wait_until
from fault_bench import MODEL, FaultCluster, recovered

pytestmark = pytest.mark.e2e
LONG = 2000  # tokens a stream asks for: long enough to be cut in the middle


@pytest.fixture
def faults(netns_hosts, tmp_path, demo_model_dir):
    """``faults(hosts=2, **options)``: a ``FaultCluster`` serving the model, and its answer."""
    made: list[FaultCluster] = []

    def make(hosts: int = 2, serving: bool = True, **options) -> tuple[FaultCluster, str | None]:
        missing = [
            tool
            for tool in ("iptables", "faketime")
            if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists())
        ]
        skip_or_fail(f"{' and '.join(missing)} not installed" if missing else None, "the fault tests")
        cluster = FaultCluster(netns_hosts(hosts), tmp_path, demo_model_dir, **options)
        made.append(cluster)
        if not serving:
            return cluster, None
        wait_until(cluster.serving, 240, what="the model to serve")
        return cluster, cluster.answer()

    yield make


class Stream:
    """A long streaming completion through the master, read in a thread: its text, how it ended."""

    def __init__(self, cluster: FaultCluster):
        self.text = ""
        self.finish: str | None = None
        self.error: Exception | None = None
        self.chunks = 0
        stream = cluster.client(timeout=600).completions.create(
            model=MODEL, prompt="Rivers carry water", max_tokens=LONG, temperature=0, stream=True
        )
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()
        wait_until(lambda: self.chunks >= 5, 60, what="the stream to flow")

    def _read(self, stream) -> None:
        try:
            for chunk in stream:
                if chunk.choices:
                    self.text += chunk.choices[0].text or ""
                    self.finish = chunk.choices[0].finish_reason or self.finish
                    self.chunks += 1
        except (openai.APIError, OSError) as e:
            self.error = e

    def ended(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream neither ended nor failed"


def test_a_killed_rank_mid_stream_fails_that_stream_and_the_group_serves_again(faults):
    cluster, answer = faults()
    before = cluster.rank_pids()
    stream = Stream(cluster)
    killed = time.monotonic()
    cluster.bench.exec(1, ["kill", "-9", str(before[1])])
    stream.ended(120)
    assert stream.finish is None and "closed the connection mid-reply" in str(stream.error), (
        "a stream cut by a dead rank ends with an error event, never as if complete"
    )
    recovered(
        "rank killed (SIGKILL) mid-stream",
        lambda: cluster.serving() and set(cluster.rank_pids().values()).isdisjoint(before.values()),
        180,
        "the stream in flight ends with an error; new requests wait or fail until the group restarts",
        since=killed,
    )
    assert cluster.answer() == answer


def test_the_master_killed_while_serving_leaves_the_ranks_alone_and_takes_over_again(faults):
    cluster, answer = faults()
    before = cluster.rank_pids()
    cluster.master.signal(signal.SIGKILL)
    cluster.master.popen.wait(10)
    with pytest.raises(openai.APIConnectionError):
        cluster.answer()
    restarted = time.monotonic()
    cluster.master = cluster.start_master()
    recovered(
        "master killed (SIGKILL) and started again",
        cluster.serving,
        60,
        "requests through the master fail to connect while it is down; the ranks keep running",
        since=restarted,
    )
    assert cluster.rank_pids() == before, "the group was not restarted"
    assert cluster.answer() == answer


def test_a_partition_between_the_hosts_of_a_group_during_decode_heals(faults):
    cluster, answer = faults()
    stream = Stream(cluster)
    cluster.bench.partition(0, 1)
    time.sleep(20)
    healed = time.monotonic()
    cluster.bench.partition(0, 1, cut=False)
    recovered(
        "partition between the two hosts of a tensor group, 20 s, during decode",
        lambda: cluster.serving() and cluster.answers(answer),
        240,
        "the stream in flight stalls, then fails; the model is not ready until the group serves again",
        since=healed,
    )
    stream.ended(300)
    print(f"the stream: {stream.chunks} chunks, finish {stream.finish}, error {stream.error!r}")
    assert stream.finish != "length" and stream.error is not None, "cut by the partition, and said so"
    assert answer.startswith(stream.text[: len(answer)]), "never text from half a model"


def test_a_node_whose_clock_is_minutes_off_is_named_with_the_offset_and_rejoins_once_set(faults):
    cluster, answer = faults()
    cluster.stop_agent("n2")
    cluster.agents["n2"] = cluster.start_agent("n2", wrapper=("faketime", "-f", "+300s"))

    def skewed() -> dict | None:
        document = cluster.status()
        node = next((n for n in document["nodes"] if n["name"] == "n2"), None) if document else None
        ready = node["conditions"][0] if node else {}
        return ready if ready.get("reason") == "ClockSkew" else None

    ready = wait_until(skewed, 120, what="the master to name the skew")
    assert re.search(r"its clock is (29\d|30\d) s ahead of this master's", ready["message"]), ready["message"]
    cluster.stop_agent("n2")
    fixed = time.monotonic()
    cluster.agents["n2"] = cluster.start_agent("n2")
    recovered(
        "one host's clock 5 minutes ahead, then set right",
        lambda: cluster.serving() and cluster.answers(answer),
        180,
        "the node is NotReady, reason ClockSkew with the offset; its groups wait until the clock is set",
        since=fixed,
    )


def test_a_model_file_damaged_on_one_node_while_it_serves_is_copied_again(faults):
    cluster, answer = faults(agent_env={"GENMLX_SCRUB_INTERVAL_S": "3"})
    weights = cluster.homes["n2"] / "models" / MODEL / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as file:  # cut short, as a failing disk or a stray write leaves it
        file.truncate(size // 2)
    damaged = time.monotonic()

    def copied_again() -> bool:
        return weights.exists() and weights.stat().st_size == size and bool(cluster.serving())

    recovered(
        "a weights file truncated on one node while it serves",
        lambda: copied_again() and cluster.answers(answer),
        180,
        "nothing until the agent's scrub finds it; then the node's copy is replaced from the other "
        "node and the group restarted on it",
        since=damaged,
    )


def test_a_storage_path_without_room_holds_the_copy_back_and_it_goes_ahead_once_there_is(faults):
    def small_storage(cluster: FaultCluster) -> None:  # 256 KiB: the demo model needs 720
        models = cluster.homes["n2"] / "models"
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(models)], check=True)
        source = f"file://{cluster.homes['n1'] / 'models' / MODEL}"
        cluster.write_manifest(  # and the same weights on n1 alone: the answer the group must give
            f'    - {{name: {MODEL}, source: "{source}", nodes: [n1, n2]}}\n'
            f'    - {{name: reference, source: "{source}", nodes: [n1]}}\n'
        )

    cluster, _ = faults(before_start=small_storage, serving=False)
    models = cluster.homes["n2"] / "models"
    try:

        def no_room() -> dict | None:
            model = cluster.model()
            ready = model["conditions"][0] if model else {}
            return ready if ready.get("reason") == "NoRoom" else None

        ready = wait_until(no_room, 120, what="the model to wait for room on n2")
        assert ready["message"] == "no storage path of n2 has room for 0.7 MB", ready["message"]
        assert not list(models.iterdir()), "nothing was copied into a path without room"
        expected = wait_until(lambda: reference_answer(cluster), 120, what="the reference model")
        subprocess.run(["mount", "-o", "remount,size=16m", str(models)], check=True)
        room = time.monotonic()
        recovered(
            "a storage path without room for the model, then given room",
            lambda: cluster.serving() and cluster.answers(expected),
            240,
            "the model is Blocked with reason NoRoom and the size it needs; nothing is copied until "
            "there is room",
            since=room,
        )
    finally:
        subprocess.run(["umount", "-l", str(models)], check=False)


def reference_answer(cluster: FaultCluster) -> str | None:
    """The answer of the same weights served on n1 alone: what the group must answer too."""
    try:
        return cluster.answer(model="reference")
    except openai.APIError:
        return None
