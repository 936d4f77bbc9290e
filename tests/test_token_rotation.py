"""Rotating the cluster token on a running cluster whose master and agent keep separate homes (as
two machines do): `genmlx token rotate` on the master's side, the master pushes the new token to
the agent sealed (never in clear), both tokens count until the grace ends and only the new one
after, the model keeps serving through it without a restart, and status lists the nodes still on
the old token; with ``--manual`` nothing is pushed until the file is copied by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest
import test_cluster as harness
from conftest import Proc, signed, wait_until

from genmlx.core.tokens import read_token_file

pytestmark = pytest.mark.e2e


class TwoHomes(harness.Cluster):
    """The agent with a GENMLX_HOME of its own, holding a copy of the master's token file."""

    def start_agent(self) -> None:
        self.agent_home = self.root / "agent-home"
        self.agent_home.mkdir()
        shutil.copy2(self.home / "token", self.agent_home / "token")
        args = ["agent", "--name", "local", "--storage", str(self.storage), "--port", str(self.agent_port)]
        env = {**self.env, "GENMLX_HOME": str(self.agent_home)}
        self.agent = Proc(
            [sys.executable, "-m", "genmlx", *args, "--host", "127.0.0.1"], self.root / "agent.log", env
        )
        self.procs.append(self.agent)

    def master_token(self) -> str:
        return read_token_file(self.home / "token").current

    def status(self) -> dict:
        url = f"{self.url}/api/v1/status"
        request = urllib.request.Request(url, headers=signed(self.master_token(), "GET", url))
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def rotate(self, *flags: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "genmlx", "token", "rotate", *flags],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_model_dir):
    with harness.ready_cluster(tmp_path_factory.mktemp("rotation"), demo_model_dir, TwoHomes) as cluster:
        yield cluster


def complete(cluster: TwoHomes, token: str) -> int:
    reply = cluster.client(api_key=token).chat.completions.create(
        model=harness.MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
    )
    return reply.usage.completion_tokens


def agent_state_with(cluster: TwoHomes, token: str) -> int:
    url = f"http://127.0.0.1:{cluster.agent_port}/api/v1/state"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=signed(token, "GET", url)), timeout=5
        ):
            return 200
    except urllib.error.HTTPError as e:
        return e.code


def test_a_pushed_rotation_reaches_the_agent_sealed_and_the_old_token_ends_with_its_grace(cluster) -> None:
    old = cluster.master_token()
    rank_pid = cluster.status()["models"][0]["ranks"][0]["pid"]
    printed = cluster.rotate("--grace", "20s")
    new = cluster.master_token()
    assert new != old and "the old token still counts until" in printed
    assert complete(cluster, old) == 2  # the old token still counts during the grace
    wait_until(lambda: read_token_file(cluster.agent_home / "token").current == new, 20, what="the push")
    agent_file = read_token_file(cluster.agent_home / "token")
    assert agent_file.previous == old and not agent_file.manual
    assert agent_state_with(cluster, old) == 200
    assert complete(cluster, new) == 2  # through the master to rank 0, which follows the agent's file
    assert new not in cluster.agent.output() and new not in cluster.procs[-1].output()  # never logged

    def rotation() -> dict | None:
        return cluster.status().get("tokenRotation")

    wait_until(lambda: (r := rotation()) is not None and r["nodesOnPreviousToken"] == [], 20, what="status")
    until = read_token_file(cluster.home / "token").previous_until
    time.sleep(max(0.0, until - time.time()) + 1.5)
    with pytest.raises(openai.AuthenticationError):
        complete(cluster, old)
    assert agent_state_with(cluster, old) == 401
    assert complete(cluster, new) == 2
    # Status is the last pass's: the next one (within a resync) sees the grace over.
    wait_until(lambda: cluster.status().get("tokenRotation") is None, 15, what="the rotation to leave status")
    assert cluster.status()["models"][0]["ranks"][0]["pid"] == rank_pid  # served throughout, no restart


def test_a_manual_rotation_waits_for_the_file_to_be_copied(cluster) -> None:
    cluster.rotate("--grace", "10m", "--manual")
    new = cluster.master_token()
    wait_until(
        lambda: (r := cluster.status().get("tokenRotation")) and r["nodesOnPreviousToken"] == ["local"],
        20,
        what="the node listed on the old token",
    )
    time.sleep(3.0)  # passes go by: nothing is pushed
    assert read_token_file(cluster.agent_home / "token").current != new
    shutil.copy2(cluster.home / "token", cluster.agent_home / "token")
    wait_until(
        lambda: cluster.status()["tokenRotation"]["nodesOnPreviousToken"] == [], 20, what="the copy taken"
    )
    assert complete(cluster, new) == 2
