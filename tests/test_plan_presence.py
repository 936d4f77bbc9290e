"""plan() for model presence: download once, then sync from a peer; storage choice; transfers."""

from __future__ import annotations

import pytest

from genmlx.manifest.types import Manifest, Master, ModelSpec, Node, Source, StoragePath
from genmlx.master.planning.actions import FetchModel
from genmlx.master.planning.observed import Observed, ObservedNode
from genmlx.master.planning.plan import assess_models, plan
from genmlx.wire.agent_state import AgentState, FetchRequest, NodeFacts, StorageReport, StoredModel, Transfer

NOW = 1_000_000.0
GB = 1_000_000_000
FACTS = NodeFacts("mac", "Darwin 24.1.0", "arm64", 10, 64 << 30, 48 << 30)
HF = ModelSpec("qwen", Source("hf", "org/qwen"), ("a", "b"), revision="main")
SOLO = ModelSpec("qwen", Source("hf", "org/qwen"), ("a",), revision="main")
LOCAL = ModelSpec("notes", Source("file", "/fast/notes"), ("a", "b"))


def desk(*models: ModelSpec, max_gb: float | None = None) -> Manifest:
    storage = (StoragePath("/fast", max_gb=max_gb), StoragePath("/big"))
    nodes = tuple(Node(n, f"10.0.0.{i}:6790", storage) for i, n in enumerate("ab", 1))
    return Manifest("desk", Master("a"), nodes, models)


def copy(
    name="qwen", path="/fast/qwen", source="hf://org/qwen", revision="main", commit="c0ffee", complete=True
):
    return StoredModel(name, path, 4 * GB, complete, source, revision, commit)


def node(name: str, fast=(), big=(), transfers=(), free_fast=100 * GB) -> ObservedNode:
    storage = (
        StorageReport("/fast", True, 1000 * GB, free_fast, tuple(fast)),
        StorageReport("/big", True, 8000 * GB, 7000 * GB, tuple(big)),
    )
    state = AgentState(name, "0.1.0", FACTS, storage, (), tuple(transfers))
    index = "ab".index(name) + 1
    return ObservedNode(name, f"10.0.0.{index}:6790", "ready", "", state)


def seen(*nodes: ObservedNode) -> Observed:
    return Observed(NOW, {n.name: n for n in nodes})


def download(node_name: str, storage="/fast") -> FetchModel:
    return FetchModel(node_name, FetchRequest("qwen", storage, source="hf://org/qwen", revision="main"))


def transfer(state="running", permanent=False, started=NOW - 5, done=GB, total=4 * GB) -> Transfer:
    return Transfer(
        "qwen",
        "download",
        "hf://org/qwen@main",
        "/fast",
        state,
        done,
        total,
        error="HTTP 503" if state == "failed" else None,
        permanent=permanent,
        started_at=started,
    )


CASES = {
    "nobody has it: the first node downloads it, once": (
        desk(HF),
        seen(node("a"), node("b")),
        [download("a")],
    ),
    "one node has it: the other copies it from that peer": (
        desk(HF),
        seen(node("a", fast=[copy()]), node("b")),
        [
            FetchModel(
                "b",
                FetchRequest(
                    "qwen",
                    "/fast",
                    source="hf://org/qwen",
                    revision="main",
                    peer="10.0.0.1:6790",
                    peer_model="qwen",
                ),
            )
        ],
    ),
    "a copy of another revision does not count": (
        desk(HF),
        seen(node("a", fast=[copy(revision="v2", commit="beef")]), node("b")),
        [download("a")],
    ),
    "a revision given as a commit matches the commit a copy resolved": (
        desk(ModelSpec("qwen", Source("hf", "org/qwen"), ("a",), revision="c0ffee")),
        seen(node("a", fast=[copy()]), node("b")),
        None,  # no fetch: it goes on to start ranks
    ),
    "a download under way: wait": (desk(HF), seen(node("a", transfers=[transfer()]), node("b")), []),
    "a permanent failure: nothing until the manifest changes": (
        desk(HF),
        seen(node("a", transfers=[transfer("failed", permanent=True)]), node("b")),
        [],
    ),
    "a permanent failure of another revision no longer blocks: the new one is downloaded": (
        desk(ModelSpec("qwen", Source("hf", "org/qwen"), ("a", "b"), revision="v2")),
        seen(node("a", transfers=[transfer("failed", permanent=True)]), node("b")),
        [FetchModel("a", FetchRequest("qwen", "/fast", source="hf://org/qwen", revision="v2"))],
    ),
    "a temporary failure a moment ago: wait": (
        desk(HF),
        seen(node("a", transfers=[transfer("failed")]), node("b")),
        [],
    ),
    "a temporary failure a while ago: ask again": (
        desk(HF),
        seen(node("a", transfers=[transfer("failed", started=NOW - 60)]), node("b")),
        [download("a")],
    ),
    "a path at its maxGB: the next path with room": (
        desk(SOLO, max_gb=10),
        seen(node("a", fast=[copy("other", "/fast/other", "hf://org/other")] * 3)),
        [FetchModel("a", FetchRequest("qwen", "/big", source="hf://org/qwen", revision="main"))],
    ),
    "a file:// model on one node is synced to the other from there": (
        desk(LOCAL),
        seen(
            node("a", fast=[copy("notes", "/fast/notes", source=None, revision=None, commit=None)]), node("b")
        ),
        [
            FetchModel(
                "b",
                FetchRequest(
                    "notes",
                    "/fast",
                    source="file:///fast/notes",
                    revision="main",
                    peer="10.0.0.1:6790",
                    peer_model="notes",
                ),
            )
        ],
    ),
}


@pytest.mark.parametrize("desired,observed,expected", CASES.values(), ids=CASES.keys())
def test_presence_plan(desired, observed, expected):
    actions = plan(desired, observed)
    if expected is None:
        assert not any(isinstance(a, FetchModel) for a in actions)
    else:
        assert actions == expected


def test_progress_and_failures_are_explained():
    (running,) = assess_models(desk(HF), seen(node("a", transfers=[transfer()]), node("b")))
    assert (running.phase, running.reason) == ("Progressing", "Downloading")
    assert "25% of 4.00 GB" in running.message
    failed = node("a", transfers=[transfer("failed", permanent=True)])
    (stalled,) = assess_models(desk(HF), seen(failed, node("b")))
    assert (stalled.phase, stalled.reason) == ("Blocked", "TransferFailed")
    assert "HTTP 503" in stalled.message


def test_a_node_without_room_blocks_with_the_numbers():
    full = ObservedNode(
        "b",
        "10.0.0.2:6790",
        "ready",
        "",
        AgentState("b", "0.1.0", FACTS, (StorageReport("/fast", True, 10 * GB, 1 * GB),)),
    )
    (assessment,) = assess_models(desk(HF), seen(node("a", fast=[copy()]), full))
    assert (assessment.phase, assessment.reason) == ("Blocked", "NoRoom")
    assert "no storage path of b has room for 4.0 GB" in assessment.message


def test_once_every_node_has_it_a_two_node_model_needs_its_shape_to_be_split():
    (assessment,) = assess_models(
        desk(HF), seen(node("a", fast=[copy()]), node("b", big=[copy(path="/big/qwen")]))
    )
    assert assessment.actions == ()
    assert (assessment.phase, assessment.reason) == ("Blocked", "UnknownShape")
