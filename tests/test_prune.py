"""Prune: the pure ``prune_actions`` (table-driven), and the agent's delete endpoint it drives,
against a real agent process."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from agent_harness import Agent, start_agent
from builders import STORE, launch, manifest, model, node, observed, rank, stored
from conftest import free_port, wait_until

from genmlx.agent.store.metadata import METADATA_NAME, write_metadata
from genmlx.agent.store.model_store import adopt, partial_dir
from genmlx.master.planning.actions import DeleteModel
from genmlx.master.planning.prune import prune_actions
from genmlx.wire.agent_state import StoredModel, Transfer
from genmlx.wire.rank_launch import RankLaunch
from genmlx.wire.serving import ServingSettings

HF = "hf://org/repo"


def copy(name="m", source: str | None = HF, complete=True, path=None) -> StoredModel:
    """A copy GenMLX made (its metadata names a source) unless ``source`` is None."""
    return stored(name, path, complete=complete, source=source, revision="main", commit="c0ffee")


def partial(name="m") -> StoredModel:
    return stored(name, f"{STORE}/.genmlx-partial/{name}", 1 << 10, complete=False)


def delete(node="a", model="m", reason="no longer in the manifest (node prune: true)") -> DeleteModel:
    return DeleteModel(node, STORE, model, reason)


MOVED = "no longer placed on a ({} prune: true)"
RUNNING = Transfer("m", "download", HF, STORE, "running")
CASES = {
    "removed from the manifest, node does not prune: files stay": (
        manifest(),
        observed(node("a", stored=[copy()])),
        [],
    ),
    "removed from the manifest, node prunes: delete": (
        manifest(prune="a"),
        observed(node("a", stored=[copy()])),
        [delete()],
    ),
    "removed, node prunes, only an interrupted partial left: delete it": (
        manifest(prune="a"),
        observed(node("a", partials=[partial()])),
        [delete()],
    ),
    "removed, node prunes, but a rank of it is still on the node: wait for the stop": (
        manifest(prune="a"),
        observed(node("a", stored=[copy()], ranks=[rank()])),
        [],
    ),
    "removed, node prunes, but an exited rank is still reported: wait": (
        manifest(prune="a"),
        observed(node("a", stored=[copy()], ranks=[rank(state="exited")])),
        [],
    ),
    "removed, node prunes, but a transfer of it runs: wait": (
        manifest(prune="a"),
        observed(node("a", stored=[copy()], transfers=[RUNNING])),
        [],
    ),
    "removed, node prunes, node unreachable: nothing": (
        manifest(prune="a"),
        observed(node("a", stored=[copy()], reachability="unreachable")),
        [],
    ),
    "a user's own directory (no metadata) is never pruned": (
        manifest(prune="a"),
        observed(node("a", stored=[copy(source=None)])),
        [],
    ),
    "a user's directory and a partial of the same name: the agent would refuse, so nothing": (
        manifest(prune="a"),
        observed(node("a", stored=[copy(source=None)], partials=[partial()])),
        [],
    ),
    "a file:// source adopted in place is never pruned": (
        manifest(prune="a"),
        observed(node("a", stored=[copy(source=f"file://{STORE}/m")])),
        [],
    ),
    "a copy synced from a file:// source elsewhere is GenMLX's": (
        manifest(prune="a"),
        observed(node("a", stored=[copy(source="file:///elsewhere/m")])),
        [delete()],
    ),
    "the original directory of a file:// model in the manifest is never pruned": (
        manifest(model("other", ("b",), source=f"file://{STORE}/m/"), prune="a"),
        observed(node("a", stored=[copy(source="file:///elsewhere/m")])),
        [],
    ),
    "a copy that serves a placed model under another name stays": (
        manifest(model("renamed", ("a",), source=HF), prune="a"),
        observed(node("a", stored=[copy("m")])),
        [],
    ),
    "a directory a rank runs from stays, whatever its name": (
        manifest(prune="a"),
        observed(node("a", stored=[copy("old")], ranks=[rank(launch("new", f"{STORE}/old"))])),
        [],
    ),
    "moved a → b, nobody prunes: files stay": (
        manifest(model("m", ("b",), source=HF)),
        observed(node("a", stored=[copy()]), node("b", stored=[copy()])),
        [],
    ),
    "moved a → b with model prune: delete from a once b has it": (
        manifest(model("m", ("b",), source=HF, prune=True)),
        observed(node("a", stored=[copy()]), node("b", stored=[copy()])),
        [delete(reason=MOVED.format("model"))],
    ),
    "moved a → b with node prune: delete from a once b has it": (
        manifest(model("m", ("b",), source=HF), prune="a"),
        observed(node("a", stored=[copy()]), node("b", stored=[copy()])),
        [delete(reason=MOVED.format("node"))],
    ),
    "moved a → b with model prune, b still syncing from a: keep a's copy": (
        manifest(model("m", ("b",), source=HF, prune=True)),
        observed(node("a", stored=[copy()]), node("b", partials=[partial()])),
        [],
    ),
    "moved a → b with model prune, b unreachable: keep a's copy": (
        manifest(model("m", ("b",), source=HF, prune=True)),
        observed(node("a", stored=[copy()]), node("b", stored=[copy()], reachability="unreachable")),
        [],
    ),
    "still placed on the node, model prunes: nothing": (
        manifest(model("m", ("a", "b"), source=HF, prune=True), prune="ab"),
        observed(node("a", stored=[copy()]), node("b", stored=[copy()])),
        [],
    ),
    "an incomplete managed copy of a removed model is pruned too": (
        manifest(prune="a"),
        observed(node("a", stored=[copy(complete=False)], partials=[partial()])),
        [delete()],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_prune_actions(case):
    desired, seen, expected = CASES[case]
    assert prune_actions(desired, seen) == expected


def test_pruning_again_after_the_delete_plans_nothing():
    desired = manifest(prune="a")
    assert prune_actions(desired, observed(node("a", stored=[copy()]))) == [delete()]
    assert prune_actions(desired, observed(node("a"))) == []


def test_the_prune_line_reads_as_a_removal():
    line = delete().describe()
    assert line == "- prune m from a:/models: no longer in the manifest (node prune: true)"


# ----- the agent's delete endpoint, on a real agent -----


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    path = tmp_path / "storage"
    path.mkdir()
    return path


@pytest.fixture
def agent(spawn, token: str, storage: Path, tmp_path: Path) -> Agent:
    return start_agent(spawn, token, "a", (storage, tmp_path / "second"))


def managed_copy(demo_model_dir: Path, storage: Path, name: str) -> Path:
    """A copy as a download leaves it: the files and metadata naming an hf:// source."""
    target = storage / name
    shutil.copytree(demo_model_dir, target)
    metadata = adopt(target)
    write_metadata(target, replace(metadata, source=HF, revision="main"))
    return target


def prune(agent: Agent, storage_path: Path | str, name: str, token: str | None = None):
    query = f"storagePath={storage_path}&managedOnly=true"
    if token is not None:
        from agent_harness import call

        return call("DELETE", f"{agent.url}/api/v1/models/{name}?{query}", token)
    return agent.call("DELETE", f"/api/v1/models/{name}?{query}")


@pytest.mark.e2e
def test_prune_deletes_a_managed_copy_and_its_partial_from_that_storage_path_only(
    agent: Agent, storage: Path, tmp_path: Path, demo_model_dir: Path
):
    managed_copy(demo_model_dir, storage, "old")
    (partial_dir(storage, "old") / "leftover").mkdir(parents=True)
    second = tmp_path / "second"
    managed_copy(demo_model_dir, second, "old")

    reply = prune(agent, storage, "old")
    assert reply.status == 200, reply.body
    assert reply.json() == {"removed": [str(storage / "old"), str(partial_dir(storage, "old"))]}
    assert not (storage / "old").exists() and not partial_dir(storage, "old").exists()
    assert (second / "old" / "config.json").is_file(), "another storage path is left alone"
    assert not [p for p in storage.iterdir() if p.name.startswith(".genmlx-deleting")]
    assert prune(agent, storage, "old").status == 404


@pytest.mark.e2e
def test_prune_refuses_a_wrong_token_a_foreign_path_and_an_escape(
    agent: Agent, storage: Path, tmp_path: Path, demo_model_dir: Path
):
    managed_copy(demo_model_dir, storage, "old")
    for token in ("wrong", ""):
        reply = prune(agent, storage, "old", token=token)
        assert (reply.status, reply.error_type()) == (401, "AuthError")
    outside = tmp_path / "outside"
    managed_copy(demo_model_dir, outside, "old")
    for storage_path in (outside, storage / "old", f"{storage}/../outside"):
        reply = prune(agent, storage_path, "old")
        assert (reply.status, reply.error_type()) == (400, "StoragePathRefused"), storage_path
    for name in ("..", "%2E%2E", ".genmlx-partial", "a%2Fb"):
        assert prune(agent, storage, name).status in (400, 404), name
    (storage / "link").symlink_to(outside / "old")
    assert prune(agent, storage, "link").status == 404, "a symlink is no model: nothing removed"
    assert (storage / "old" / "config.json").is_file()
    assert (outside / "old" / "config.json").is_file()


@pytest.mark.e2e
def test_prune_refuses_a_users_own_directory_and_a_file_source_in_place(
    agent: Agent, storage: Path, demo_model_dir: Path
):
    shutil.copytree(demo_model_dir, storage / "mine")
    reply = prune(agent, storage, "mine")
    assert (reply.status, reply.error_type()) == (409, "ModelNotManaged")
    shutil.copytree(demo_model_dir, storage / "source")
    adopt(storage / "source")  # what a file:// source gets: metadata naming the directory itself
    reply = prune(agent, storage, "source")
    assert (reply.status, reply.error_type()) == (409, "ModelNotManaged")
    assert "is the file:// source" in reply.json()["error"]["message"]
    assert (storage / "mine" / "config.json").is_file() and (storage / "source" / METADATA_NAME).is_file()
    # Without managedOnly (an operator's explicit delete) the user's directory may go.
    assert agent.call("DELETE", f"/api/v1/models/mine?storagePath={storage}").status == 200


@pytest.mark.e2e
def test_prune_refuses_a_model_a_running_rank_uses(agent: Agent, storage: Path, demo_model_dir: Path):
    managed_copy(demo_model_dir, storage, "busy")
    serving = ServingSettings(context_length=256)
    launch = RankLaunch("busy", str(storage / "busy"), 0, 1, free_port(), "spec", serving=serving)
    assert agent.call("POST", "/api/v1/ranks", launch.to_json()).status == 201
    reply = prune(agent, storage, "busy")
    assert (reply.status, reply.error_type()) == (409, "ModelInUse")
    assert (storage / "busy" / "config.json").is_file()
    assert agent.call("DELETE", "/api/v1/ranks/busy/0").status == 200
    assert prune(agent, storage, "busy").status == 200


# ----- end to end: the master prunes through a real agent -----


@pytest.mark.e2e
def test_a_removed_model_keeps_its_files_unless_the_node_prunes(spawn, genmlx_home, tmp_path, demo_model_dir):

    from fakehub import FakeHub, files_from_dir
    from test_apply_wait import MasterAndAgent

    hub = FakeHub().start()
    try:
        hub.add_commit("genmlx/demo-llama", files_from_dir(demo_model_dir))
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
        cluster = MasterAndAgent(spawn, tmp_path, env)
        served = cluster.apply_wait("    - {name: demo, source: 'hf://genmlx/demo-llama', nodes: [a]}\n")
        assert served.returncode == 0, served.stdout + served.stderr
        copy = cluster.storage / "demo"
        assert (copy / METADATA_NAME).is_file()

        removed = cluster.apply_wait("    []\n")
        assert removed.returncode == 0, removed.stdout + removed.stderr
        assert "- stop demo" in removed.stdout and "prune" not in removed.stdout

        def settled() -> bool:
            document = cluster.status()
            return not document["pendingActions"] and document["nodes"][0]["ranks"] == []

        wait_until(settled, 60, what="the ranks to stop")
        assert (copy / "config.json").is_file(), "the files stay"

        pruned = cluster.apply_wait("    []\n", prune=True)
        assert pruned.returncode == 0, pruned.stdout + pruned.stderr
        reason = "no longer in the manifest (node prune: true)"
        assert f"- prune demo from a:{cluster.storage}: {reason}" in pruned.stdout
        wait_until(lambda: not copy.exists(), 60, what="the copy to be pruned")
        wait_until(settled, 60, what="a pass with nothing left to do")
    finally:
        hub.stop()
