"""Faults on the network-namespace bench, each recovering with nothing corrupt served.

Two or three hosts, a master on the first, the demo model as a tensor group over two of them
(``fault_bench``). Each test breaks one thing, states what a client sees while it is broken, and
checks that the model serves again within a bound (recorded by ``fault_bench.recovered``, for
``docs/reliability.md``) with the same answer at temperature 0 as before the fault: never text
from half a model.
"""

from __future__ import annotations

import errno
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
from fakehub import FakeHub, files_from_dir
from fault_bench import MODEL, FaultCluster, recovered

from genmlx.demo.random_model import ModelShape, write_demo_model

pytestmark = pytest.mark.e2e
LONG = 2000  # tokens a stream asks for: long enough to be cut in the middle
HUB_REPO = "genmlx/demo"
# Transfers write in steps (1 MiB for a download, 4 MiB for a sync): the tests that cut one short
# move a 9 MB model, which takes about 9 s to cross a link slowed to this.
SLOW_BYTES_PER_S = 1 << 20
TRANSFER_SHAPE = ModelShape(hidden_size=320, layers=2, attention_heads=4, kv_heads=2, intermediate_size=640)


@pytest.fixture(scope="session")
def transfer_model_dir(tmp_path_factory) -> Path:
    """A random-weight llama of 9 MB: its weights span several of a transfer's writes."""
    return write_demo_model(tmp_path_factory.mktemp("models") / "transfer-llama", shape=TRANSFER_SHAPE)


@pytest.fixture
def faults(netns_hosts, tmp_path, demo_model_dir):
    """``faults(hosts=2, **options)``: a ``FaultCluster`` serving the model, and its answer."""
    made: list[FaultCluster] = []

    hubs: list[FakeHub] = []

    def make(
        hosts: int = 2,
        serving: bool = True,
        hub_rate: float | None = None,
        model_dir: Path = demo_model_dir,
        **options,
    ) -> tuple[FaultCluster, str | None]:
        """``hub_rate``: also a Hub at the bench's bridge address holding the model as
        ``genmlx/demo``, sending at most that many bytes a second (``cluster.hub``)."""
        missing = [
            tool
            for tool in ("iptables", "faketime", "tc")
            if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists())
        ]
        skip_or_fail(f"{' and '.join(missing)} not installed" if missing else None, "the fault tests")
        bench = netns_hosts(hosts)
        hub = None
        if hub_rate is not None:
            hub = FakeHub(bench.gateway).start()
            hubs.append(hub)
            hub.add_commit(HUB_REPO, files_from_dir(model_dir))
            hub.throttle(hub_rate)
            hub_env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
            options["agent_env"] = {**hub_env, **options.get("agent_env", {})}
        cluster = FaultCluster(bench, tmp_path, model_dir, **options)
        cluster.hub = hub
        made.append(cluster)
        if not serving:
            return cluster, None
        wait_until(cluster.serving, 240, what="the model to serve")
        return cluster, cluster.answer()

    yield make
    for hub in hubs:
        hub.stop()


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


# ----- faults while a model moves: downloads from the Hub, syncs between agents -----


def hub_model(nodes: str):
    """A ``before_start``: the model from the Hub on ``nodes``, and the same weights from n1's disk
    as ``reference`` on n1 alone: what the model must answer once it serves."""

    def write(cluster: FaultCluster) -> None:
        cluster.write_manifest(model_line(MODEL, f"hf://{HUB_REPO}", nodes) + reference_line(cluster))

    return write


def model_line(name: str, source: str, nodes: str, more: str = "") -> str:
    """A model of the manifest (``more``: further fields, as YAML flow mapping entries)."""
    return f'    - {{name: {name}, source: "{source}", nodes: [{nodes}]{more}}}\n'


def disk_source(cluster: FaultCluster) -> str:
    return f"file://{cluster.homes['n1'] / 'models' / MODEL}"


def reference_line(cluster: FaultCluster) -> str:
    return model_line("reference", disk_source(cluster), "n1")


def slow_sync(cluster: FaultCluster) -> None:
    """A ``before_start``: the model on n1 and n2 (n2 copies it from n1), over a link from host 0
    slowed to ``SLOW_BYTES_PER_S``, with the reference on n1 alone."""
    cluster.write_manifest(model_line(MODEL, disk_source(cluster), "n1, n2") + reference_line(cluster))
    cluster.bench.shape(0, "eth0", f"{SLOW_BYTES_PER_S * 8 // 1000}kbit", burst="32kb")


def killed(cluster: FaultCluster, node: str) -> float:
    """SIGKILL ``node``'s agent; when it died."""
    cluster.agents[node].signal(signal.SIGKILL)
    cluster.agents[node].popen.wait(10)
    return time.monotonic()


def under_way(faults, model_dir: Path, **options) -> tuple[FaultCluster, str]:
    """A cluster whose model is on its way to n2 (a third of it written); the reference's answer."""
    cluster, _ = faults(serving=False, model_dir=model_dir, **options)
    expected = wait_until(lambda: reference_answer(cluster), 120, what="the reference model")
    wait_until(lambda: cluster.moving("n2"), 120, what="the model on its way to n2")
    return cluster, expected


@pytest.mark.parametrize("transfer", ["download", "sync"])
def test_an_agent_killed_mid_transfer_leaves_no_model_and_resumes_once_started(
    faults, transfer_model_dir, transfer
):
    options = {
        "download": {"hub_rate": SLOW_BYTES_PER_S, "before_start": hub_model("n2")},
        "sync": {"before_start": slow_sync},
    }[transfer]
    cluster, expected = under_way(faults, transfer_model_dir, **options)
    killed(cluster, "n2")
    assert not cluster.published("n2"), f"nothing published mid-{transfer}"
    assert cluster.written("n2") > 0, "the bytes already here stay, to be resumed"
    restarted = time.monotonic()
    cluster.agents["n2"] = cluster.start_agent("n2")
    recovered(
        f"agent killed (SIGKILL) mid-{transfer}, then started again",
        lambda: cluster.serving() and cluster.answers(expected),
        180,
        f"the node is unreachable and the model waits for it; the {transfer} resumes where it stopped",
        since=restarted,
    )
    assert not cluster.leftovers("n2"), "no partial directory left behind"
    if cluster.hub is not None:
        ranges = {r.headers.get("range", "bytes=0-") for r in cluster.hub.seen("GET", served_by="cdn")}
        assert ranges - {"bytes=0-"}, "the weights were asked for from where the killed download stopped"


def test_a_partition_during_a_sync_stalls_it_and_it_completes_once_healed(faults, transfer_model_dir):
    cluster, expected = under_way(faults, transfer_model_dir, before_start=slow_sync)
    cluster.bench.partition(0, 1)
    time.sleep(20)
    assert not cluster.published("n2"), "nothing published while cut off"
    healed = time.monotonic()
    cluster.bench.partition(0, 1, cut=False)
    recovered(
        "partition between the two hosts of a group, 20 s, during a sync",
        lambda: cluster.serving() and cluster.answers(expected),
        180,
        "the sync stalls and the node is NotReady (unreachable); once healed, the sync carries on "
        "where it was (cut off for longer than a minute, it fails for now and resumes) and the "
        "group starts",
        since=healed,
    )
    assert not cluster.leftovers("n2"), "no partial directory left behind"


def test_the_master_cut_off_from_an_agent_mid_rollout_finishes_it_once_healed(faults):
    def on_n2(cluster: FaultCluster) -> None:
        cluster.model_nodes = ("n2",)
        cluster.write_manifest()

    cluster, answer = faults(before_start=on_n2)
    # Cut off as soon as the master has taken the change: before or while it restarts the rank.
    cluster.apply(model_line(MODEL, disk_source(cluster), "n2", ", serving: {maxBatch: 4}"))
    cluster.bench.partition(0, 1)
    time.sleep(20)
    healed = time.monotonic()
    cluster.bench.partition(0, 1, cut=False)

    def rolled_out() -> bool:
        model = cluster.serving()
        settings = [r["launch"]["serving"]["maxBatch"] for r in model["ranks"]] if model else []
        return settings == [4] and cluster.answers(answer)

    recovered(
        "master partitioned from the agent of a model mid-rollout, 20 s",
        rolled_out,
        180,
        "the node is NotReady (unreachable) and the model not ready; once healed, the rollout finishes",
        since=healed,
    )


def test_a_storage_path_that_fills_up_mid_download_resumes_once_there_is_room(
    faults, transfer_model_dir, tmp_path
):
    def small_storage(cluster: FaultCluster) -> None:  # 16 MiB: room for the model (9 MB) at first
        models = cluster.homes["n2"] / "models"
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(models)], check=True)
        hub_model("n2")(cluster)

    models = tmp_path / "n2" / "models"  # where the cluster puts n2's storage path
    try:
        cluster, expected = under_way(
            faults, transfer_model_dir, hub_rate=SLOW_BYTES_PER_S, before_start=small_storage
        )
        assert cluster.homes["n2"] / "models" == models
        filler = models / "other-files.bin"
        fill(filler)

        def failed_for_room() -> dict | None:
            transfer = cluster.transfer("n2")
            failed = transfer and transfer["state"] == "failed" and "no room left" in transfer["error"]
            return transfer if failed and not transfer["permanent"] else None

        wait_until(failed_for_room, 60, what="the download to fail for want of room")
        ready = cluster.model()["conditions"][0]
        assert "no room left" in ready["message"] or ready["reason"] == "NoRoom", ready
        assert not cluster.published("n2"), "nothing published"
        filler.unlink()
        room = time.monotonic()
        recovered(
            "a storage path that fills up mid-download, then has room again",
            lambda: cluster.serving() and cluster.answers(expected),
            180,
            "the download fails for now with 'no room left'; the model waits (NoRoom) until the path "
            "has room, then the download resumes",
            since=room,
        )
        assert not cluster.leftovers("n2"), "no partial directory left behind"
    finally:
        subprocess.run(["umount", "-l", str(models)], check=False)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its file system is full."""
    block = bytes(64 * 1024)
    with open(path, "wb", buffering=0) as out:
        try:
            while True:
                out.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
