"""GitOps watch: `genmlx master -f cluster.yaml --watch` follows edits of the file; an invalid
edit is shown as Stalled with every error while the last good manifest keeps serving."""

from __future__ import annotations

import subprocess

import pytest
from conftest import wait_until
from test_cluster import MODEL, Cluster

pytestmark = pytest.mark.e2e  # every test here starts real processes


def git(folder, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t.invalid", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def watched(tmp_path, demo_model_dir):
    git(tmp_path, "init", "-q")
    cluster = Cluster(tmp_path, demo_model_dir, master_flags=("--watch",))
    try:
        yield cluster
    finally:
        cluster.stop()


def test_edits_are_applied_and_an_invalid_one_stalls_while_the_last_good_keeps_serving(watched):
    cluster = watched
    git(cluster.root, "add", "cluster.yaml")
    git(cluster.root, "commit", "-q", "-m", "first")
    first = git(cluster.root, "rev-parse", "HEAD")
    cluster.manifest.write_text(cluster.manifest_text())  # touch: re-applied, unchanged
    document = wait_until(
        lambda: (
            (d := cluster.ready_status()) and (d["lastAppliedRevision"] or {}).get("commit") == first and d
        ),
        60,
        what="the committed manifest to be applied",
    )
    assert document["lastAppliedRevision"] == {"commit": first, "dirty": False}

    cluster.manifest.write_text(cluster.manifest_text().replace("nodes: [local]", "nodes: [nowhere]"))
    stalled = wait_until(
        lambda: next(
            (c for c in cluster.status()["conditions"] if c["type"] == "Stalled" and c["status"] == "True"),
            None,
        ),
        30,
        what="the invalid edit to show",
    )
    assert stalled["reason"] == "InvalidManifest"
    assert "'nowhere' is not a declared node" in stalled["message"]
    assert "generation 1 keeps serving" in stalled["message"]
    document = cluster.status()
    assert document["generation"] == 1 and document["conditions"][0]["status"] == "True"
    reply = cluster.client().completions.create(model=MODEL, prompt="still", max_tokens=2)
    assert reply.usage.completion_tokens == 2

    cluster.manifest.write_text(cluster.manifest_text(max_batch=2))
    document = wait_until(
        lambda: (d := cluster.ready_status()) and d["observedGeneration"] == 2 and d,
        60,
        what="the fixed edit to be applied and served",
    )
    stalled = next(c for c in document["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("False", "NotStalled"), "the rejection is gone"
    assert document["lastAppliedRevision"] == {"commit": first, "dirty": True}
    assert document["lastAttemptedRevision"] == document["lastAppliedRevision"]
