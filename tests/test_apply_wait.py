"""`genmlx apply --wait`: the pure judgement of a status document, the follow loop on a scripted
clock, and the real command against a real master and agent on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from agent_harness import call
from conftest import ServingPorts, free_port, http_status, wait_until

from genmlx.cli.apply_wait import Outcome, PlainDisplay, follow, judge, read_view, timed_out
from genmlx.wire.status import ClusterStatus


def condition(type_: str, status: str, reason: str = "", message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def model(name: str, phase: str, reason: str, message: str = "", stalled: bool = False) -> dict:
    ready = condition("Ready", "True" if phase == "Ready" else "False", reason, message)
    stall = (
        condition("Stalled", "True", reason, message)
        if stalled
        else condition("Stalled", "False", "NotStalled")
    )
    conditions = [ready, condition("Reconciling", "False"), stall]
    spec = {"source": f"hf://org/{name}", "revision": "main", "nodes": ["a"], "parallelism": "auto"}
    return {"name": name, "phase": phase, "conditions": conditions, **spec}


def document(*models: dict, observed: int = 2, transfers=()) -> ClusterStatus:
    """A status document as the master sends it, read as ``apply --wait`` reads it."""
    moved = [{"origin": f"hf://org/{t['model']}@main", "storagePath": "/models", **t} for t in transfers]
    nodes = [{"name": "a", "conditions": [condition("Ready", "True")], "transfers": moved}]
    cluster = {"generation": 2, "observedGeneration": observed, "conditions": [condition("Ready", "True")]}
    return ClusterStatus.from_json({**cluster, "models": list(models), "nodes": nodes})


READY = model("m", "Ready", "Serving", "serving at http://127.0.0.1:8100/v1")
LOADING = model("m", "Progressing", "Loading", "m is starting")
STALLED = model("bad", "Blocked", "ModelNotFound", "file:///nowhere is not in a storage path", stalled=True)
DOWNLOAD = {"model": "m", "kind": "download", "state": "running", "bytesDone": 250, "bytesTotal": 1000}


def test_every_model_ready_is_done():
    assert judge(read_view(document(READY), 2)) == Outcome(0, "1 model(s) Ready")


def test_a_stalled_model_fails_with_its_reason_and_message():
    outcome = judge(read_view(document(READY, STALLED), 2))
    assert outcome == Outcome(
        1, "model bad is Stalled: ModelNotFound: file:///nowhere is not in a storage path"
    )


def test_nothing_is_judged_before_the_master_has_seen_the_applied_generation():
    assert judge(read_view(document(READY, observed=1), 2)) is None
    assert judge(read_view(document(STALLED, observed=1), 2)) is None
    assert judge(read_view(document(LOADING), 2)) is None


def test_the_timeout_names_what_is_not_ready_and_why():
    view = read_view(document(READY, LOADING), 2)
    assert timed_out(view, 5) == Outcome(
        1, "timed out after 5s; still not Ready:\n  model m: Progressing (Loading: m is starting)"
    )
    assert timed_out(None, 5).message == "timed out after 5s: the master never answered"


class ScriptedClock:
    """Time moves only when the follow loop sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run_follow(documents: list, timeout: float | None) -> tuple[Outcome, list[str]]:
    lines: list[str] = []
    clock = ScriptedClock()
    pending = iter(documents)

    def fetch():
        return next(pending, documents[-1])

    outcome = follow(fetch, 2, timeout, PlainDisplay(lines.append), clock, clock.sleep)
    return outcome, lines


def test_follow_prints_each_change_once_and_ends_when_ready():
    downloading = document(LOADING, transfers=[DOWNLOAD])
    done = {**DOWNLOAD, "state": "done", "bytesDone": 1000}
    old = {**done, "model": "old"}  # finished before the wait began: not shown
    documents = [None, document(READY, observed=1, transfers=[old]), downloading, downloading]
    outcome, lines = run_follow([*documents, document(READY, transfers=[done, old])], None)
    assert outcome.code == 0
    assert lines == [
        "the master does not answer; still waiting",
        "model m: Ready (Serving) serving at http://127.0.0.1:8100/v1",
        "model m: Progressing (Loading) m is starting",
        "download m to a: running, 25% of 1.0 kB",
        "model m: Ready (Serving) serving at http://127.0.0.1:8100/v1",
        "download m to a: done, 100% of 1.0 kB",
    ]


def test_follow_gives_up_at_the_timeout():
    outcome, _ = run_follow([document(LOADING)], timeout=3)
    assert outcome.code == 1 and "model m: Progressing (Loading" in outcome.message


# ----- the real command, against a real master and agent -----


@pytest.fixture
def hub():
    from fakehub import FakeHub

    fake = FakeHub().start()
    yield fake
    fake.stop()


class MasterAndAgent:
    """`genmlx master` (no manifest yet) and `genmlx agent` on loopback; `apply --wait` runs
    as a user runs it, with its output in a pipe (so plain lines, not bars)."""

    def __init__(self, spawn, root: Path, agent_env: dict[str, str]):
        self.root = root
        self.storage = root / "storage"
        self.storage.mkdir()
        self.master_port, self.agent_port = free_port(), free_port()
        self.serving_ports = ServingPorts()
        spawn(
            [
                "-m",
                "genmlx",
                "agent",
                "--name",
                "a",
                "--storage",
                str(self.storage),
                "--port",
                str(self.agent_port),
                "--host",
                "127.0.0.1",
            ],
            "agent",
            env=agent_env,
        )
        spawn(["-m", "genmlx", "master", "--host", "127.0.0.1", "--port", str(self.master_port)], "master")
        for port in (self.agent_port, self.master_port):
            url = f"http://127.0.0.1:{port}/healthz"
            wait_until(lambda u=url: http_status(u) is not None, 30, 0.1, what=f"port {port} to answer")

    def status(self) -> dict:
        from genmlx.core.home import read_token

        reply = call("GET", f"http://127.0.0.1:{self.master_port}/api/v1/status", read_token())
        assert reply.status == 200, reply.body
        return reply.json()

    def apply_wait(
        self, models: str, *flags: str, extra_nodes: str = "", prune: bool = False
    ) -> subprocess.CompletedProcess:
        manifest = self.root / "cluster.yaml"
        manifest.write_text(
            "apiVersion: genmlx/v1\nkind: Cluster\nmetadata: {name: waiting}\nspec:\n"
            f"  master: {{node: a, port: {self.master_port}}}\n"
            f"  nodes:\n    - {{name: a, address: '127.0.0.1:{self.agent_port}', "
            f"storage: [{{path: '{self.storage}'}}], prune: {str(prune).lower()}}}\n"
            f"{extra_nodes}  models:\n{self.serving_ports.set_in(models)}"
        )
        command = [sys.executable, "-m", "genmlx", "apply", "-f", str(manifest), "--wait", *flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.e2e
def test_apply_wait_shows_the_download_and_exits_0_once_ready(
    spawn, genmlx_home, tmp_path, hub, demo_model_dir
):
    from fakehub import files_from_dir

    files = files_from_dir(demo_model_dir)
    hub.add_commit("genmlx/demo-llama", files)
    hub.throttle(sum(len(data) for data in files.values()) / 4)  # about four seconds of download
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
    cluster = MasterAndAgent(spawn, tmp_path, env)
    done = cluster.apply_wait(
        "    - {name: demo, source: 'hf://genmlx/demo-llama', nodes: [a]}\n", "--timeout", "200"
    )
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "+ download demo to a:" in done.stdout  # the plan, as apply prints it
    progress = [line for line in lines if line.startswith("download demo to a: running, ")]
    assert progress, "the download's progress was shown"
    assert any(line.startswith("download demo to a: done, 100%") for line in lines)
    assert any(line.startswith("model demo: Ready (Serving)") for line in lines)
    assert lines[-1] == "1 model(s) Ready"


@pytest.mark.e2e
def test_apply_wait_exits_1_with_the_reason_when_a_model_is_stalled(spawn, genmlx_home, tmp_path):
    cluster = MasterAndAgent(spawn, tmp_path, {})
    nowhere = tmp_path / "nowhere" / "model"
    done = cluster.apply_wait(
        f"    - {{name: lost, source: 'file://{nowhere}', nodes: [a]}}\n", "--timeout", "60"
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == (
        f"model lost is Stalled: ModelNotFound: file://{nowhere} is not in a storage path of any node"
    )


@pytest.mark.e2e
def test_apply_wait_times_out_naming_what_is_not_ready(spawn, genmlx_home, tmp_path):
    cluster = MasterAndAgent(spawn, tmp_path, {})
    # Node b is declared, but no agent answers at its address: the model waits for it, neither
    # Ready nor Stalled, until the timeout.
    node_b = f"    - {{name: b, address: '127.0.0.1:{free_port()}', storage: [{{path: '/models'}}]}}\n"
    models = "    - {name: elsewhere, source: 'hf://org/x', nodes: [b]}\n"
    done = cluster.apply_wait(models, "--timeout", "3", extra_nodes=node_b)
    assert done.returncode == 1, done.stdout + done.stderr
    tail = done.stdout[done.stdout.index("timed out after 3s; still not Ready:") :].splitlines()
    assert tail[1].startswith("  model elsewhere: Waiting (NodeNotReady: node b is not ready: ")


def test_a_terminal_gets_a_live_table_and_progress_bars():
    from io import StringIO

    from rich.console import Console

    from genmlx.cli.apply_wait import RichDisplay, make_display

    out = StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    display = make_display(console)
    assert isinstance(display, RichDisplay)
    display.show(read_view(document(LOADING, transfers=[DOWNLOAD]), 2))
    display.close()
    text = out.getvalue()
    assert "Progressing" in text and "m is starting" in text
    assert "download m to a" in text and "0.2/1.0 kB" in text and "━" in text
    assert isinstance(make_display(Console(file=StringIO())), PlainDisplay), "no terminal: plain lines"


@pytest.mark.e2e
def test_the_plan_apply_prints_is_the_plan_the_master_carries_out(
    spawn, genmlx_home, tmp_path, demo_model_dir
):
    cluster = MasterAndAgent(spawn, tmp_path, {})
    shutil.copytree(demo_model_dir, cluster.storage / "demo")
    done = cluster.apply_wait(
        f"    - {{name: demo, source: 'file://{cluster.storage / 'demo'}', nodes: [a]}}\n", "--timeout", "120"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    printed = [line.strip() for line in done.stdout.splitlines() if line.startswith(("  + ", "  ~ ", "  - "))]
    assert printed and printed[0].startswith("+ start demo (rank 0 on a:"), done.stdout
    from genmlx.core.home import read_token

    url = f"http://127.0.0.1:{cluster.master_port}/api/v1/events?kind=Model&name=demo"
    events = call("GET", url, read_token())
    carried_out = [e["message"] for e in events.json()["events"] if e["reason"] in ACTION_REASONS]
    assert sorted(carried_out) == sorted(printed), "every printed action was carried out as printed"


ACTION_REASONS = ("StartRankGroup", "StopRankGroup", "FetchModel", "DeleteModel")
