"""plan() for model presence: download once, then sync from a peer; storage choice; transfers."""

from __future__ import annotations

import pytest
from builders import NOW, manifest, node, observed, storage, stored
from builders import model as spec

from genmlx.manifest.types import StoragePath
from genmlx.master.planning.actions import FetchModel
from genmlx.master.planning.plan import assess_models, plan
from genmlx.wire.agent_state import FetchRequest, StorageReport, StoredModel, Transfer

GB = 1_000_000_000
HF = spec("qwen", ("a", "b"))
SOLO = spec("qwen", ("a",))
LOCAL = spec("notes", ("a", "b"), source="file:///fast/notes")


def desk(*models, max_gb: float | None = None):
    """Nodes a and b, each with a fast path (at most ``max_gb``) and a big one."""
    paths = (StoragePath("/fast", max_gb=max_gb), StoragePath("/big"))
    return manifest(*models, nodes=("a", "b"), storage=paths)


def disks(fast=(), big=(), free_fast=100 * GB) -> list[StorageReport]:
    """What an agent of the desk reports of its two paths, holding ``fast`` and ``big``."""
    return [
        storage("/fast", fast, total=1000 * GB, free=free_fast),
        storage("/big", big, total=8000 * GB, free=7000 * GB),
    ]


def copy(
    name="qwen", path="/fast/qwen", source="hf://org/qwen", revision="main", commit="c0ffee", complete=True
) -> StoredModel:
    return stored(name, path, 4 * GB, complete, source, revision, commit)


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
        observed(node("a", reports=disks()), node("b", reports=disks())),
        [download("a")],
    ),
    "one node has it: the other copies it from that peer": (
        desk(HF),
        observed(node("a", reports=disks(fast=[copy()])), node("b", reports=disks())),
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
        observed(
            node("a", reports=disks(fast=[copy(revision="v2", commit="beef")])),
            node("b", reports=disks()),
        ),
        [download("a")],
    ),
    "a revision given as a commit matches the commit a copy resolved": (
        desk(spec("qwen", ("a",), revision="c0ffee")),
        observed(node("a", reports=disks(fast=[copy()])), node("b", reports=disks())),
        None,  # no fetch: it goes on to start ranks
    ),
    "a download under way: wait": (
        desk(HF),
        observed(node("a", reports=disks(), transfers=[transfer()]), node("b", reports=disks())),
        [],
    ),
    "a permanent failure: nothing until the manifest changes": (
        desk(HF),
        observed(
            node("a", reports=disks(), transfers=[transfer("failed", permanent=True)]),
            node("b", reports=disks()),
        ),
        [],
    ),
    "a permanent failure of another revision no longer blocks: the new one is downloaded": (
        desk(spec("qwen", ("a", "b"), revision="v2")),
        observed(
            node("a", reports=disks(), transfers=[transfer("failed", permanent=True)]),
            node("b", reports=disks()),
        ),
        [FetchModel("a", FetchRequest("qwen", "/fast", source="hf://org/qwen", revision="v2"))],
    ),
    "a temporary failure a moment ago: wait": (
        desk(HF),
        observed(
            node("a", reports=disks(), transfers=[transfer("failed")]),
            node("b", reports=disks()),
        ),
        [],
    ),
    "a temporary failure a while ago: ask again": (
        desk(HF),
        observed(
            node("a", reports=disks(), transfers=[transfer("failed", started=NOW - 60)]),
            node("b", reports=disks()),
        ),
        [download("a")],
    ),
    "a path at its maxGB: the next path with room": (
        desk(SOLO, max_gb=10),
        observed(node("a", reports=disks(fast=[copy("other", "/fast/other", "hf://org/other")] * 3))),
        [FetchModel("a", FetchRequest("qwen", "/big", source="hf://org/qwen", revision="main"))],
    ),
    "a file:// model on one node is synced to the other from there": (
        desk(LOCAL),
        observed(
            node(
                "a",
                reports=disks(fast=[copy("notes", "/fast/notes", source=None, revision=None, commit=None)]),
            ),
            node("b", reports=disks()),
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
    (running,) = assess_models(
        desk(HF),
        observed(node("a", reports=disks(), transfers=[transfer()]), node("b", reports=disks())),
    )
    assert (running.phase, running.reason) == ("Progressing", "Downloading")
    assert "25% of 4.00 GB" in running.message
    failed = node("a", reports=disks(), transfers=[transfer("failed", permanent=True)])
    (stalled,) = assess_models(desk(HF), observed(failed, node("b", reports=disks())))
    assert (stalled.phase, stalled.reason) == ("Blocked", "TransferFailed")
    assert "HTTP 503" in stalled.message


def test_a_node_without_room_blocks_with_the_numbers():
    full = node("b", reports=[storage("/fast", total=10 * GB, free=1 * GB)])
    (assessment,) = assess_models(desk(HF), observed(node("a", reports=disks(fast=[copy()])), full))
    assert (assessment.phase, assessment.reason) == ("Blocked", "NoRoom")
    assert "no storage path of b has room for 4.0 GB" in assessment.message


def test_once_every_node_has_it_a_two_node_model_needs_its_shape_to_be_split():
    (assessment,) = assess_models(
        desk(HF),
        observed(
            node("a", reports=disks(fast=[copy()])),
            node("b", reports=disks(big=[copy(path="/big/qwen")])),
        ),
    )
    assert assessment.actions == ()
    assert (assessment.phase, assessment.reason) == ("Blocked", "UnknownShape")
