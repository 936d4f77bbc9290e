"""One node, end to end, through the real processes: `genmlx agent` and `genmlx master` on
loopback, the demo model, and the real openai client talking to the master."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
from conftest import Proc, free_port, http_status, signed, wait_until

from genmlx.core.home import ensure_token, read_token

pytestmark = pytest.mark.e2e  # every test here starts real processes

MODEL = "demo"


class Cluster:
    """A master and an agent as separate processes, sharing a GENMLX_HOME and a token."""

    def __init__(
        self, root: Path, model_dir: Path, master_flags: tuple[str, ...] = (), with_agent: bool = True
    ):
        self.root = root
        self.home = root / "home"
        self.storage = root / "storage"
        shutil.copytree(model_dir, self.storage / MODEL)
        self.token = read_token(ensure_token(self.home / "token")[0])
        self.env = {**os.environ, "GENMLX_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        self.master_port, self.agent_port, self.serving_port = free_port(), free_port(), free_port()
        self.manifest = root / "cluster.yaml"
        self.manifest.write_text(self.manifest_text())
        self.master_flags = master_flags
        self.procs: list[Proc] = []
        if with_agent:
            self.start_agent()
        self.master = self.start_master()

    def start_agent(self) -> None:
        self.agent = self.start(
            "agent",
            "--name",
            "local",
            "--storage",
            str(self.storage),
            "--port",
            str(self.agent_port),
            "--host",
            "127.0.0.1",
        )

    def manifest_text(self, max_batch: int = 8) -> str:
        return f"""\
apiVersion: genmlx/v1
kind: Cluster
metadata: {{name: e2e}}
spec:
  master: {{node: local, port: {self.master_port}}}
  nodes:
    - name: local
      address: 127.0.0.1:{self.agent_port}
      storage: [{{path: {self.storage}}}]
  models:
{self.models_text(max_batch)}"""

    def models_text(self, max_batch: int) -> str:
        """The manifest's ``models`` entries (a subclass serves others)."""
        return self.model_entry(
            MODEL, self.storage / MODEL, f"maxBatch: {max_batch}, port: {self.serving_port}"
        )

    @staticmethod
    def model_entry(name: str, path: Path, serving: str) -> str:
        lines = [
            f"- name: {name}",
            f"  source: file://{path}",
            "  nodes: [local]",
            f"  serving: {{{serving}}}",
        ]
        return "".join(f"    {line}\n" for line in lines)

    def start(self, *args: str) -> Proc:
        proc = Proc(
            [sys.executable, "-m", "genmlx", *args], self.root / f"{args[0]}.{len(self.procs)}.log", self.env
        )
        self.procs.append(proc)
        return proc

    def start_master(self) -> Proc:
        return self.start("master", "-f", str(self.manifest), "--host", "127.0.0.1", *self.master_flags)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.master_port}"

    def status(self) -> dict:
        request = urllib.request.Request(
            f"{self.url}/api/v1/status", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def agent_api(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.agent_port}{path}"
        request = urllib.request.Request(url, headers=signed(self.token, "GET", url))
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read().decode()

    def ready_status(self) -> dict | None:
        try:
            document = self.status()
        except OSError:
            return None
        return document if document["conditions"][0]["status"] == "True" else None

    def wait_ready(self, timeout: float = 120) -> dict:
        return wait_until(self.ready_status, timeout, what="the cluster to be Ready")

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "genmlx", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def client(self, base: str | None = None, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=base or f"{self.url}/v1", api_key=api_key or self.token, timeout=60, max_retries=0
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
            print(f"----- {' '.join(proc.args[3:])} -----\n{proc.output()}")


@contextmanager
def ready_cluster(root: Path, model_dir: Path, kind: type[Cluster] = Cluster) -> Iterator[Cluster]:
    """A ``kind`` of cluster, Ready, stopped (its processes' output printed) when the block ends."""
    cluster = kind(root, model_dir)
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_model_dir):
    with ready_cluster(tmp_path_factory.mktemp("cluster"), demo_model_dir) as cluster:
        yield cluster


def rank0(document: dict) -> dict:
    (model,) = document["models"]
    (rank,) = model["ranks"]
    return rank


def test_the_cluster_reports_ready_nodes_and_models(cluster):
    document = cluster.wait_ready()
    assert document["observedGeneration"] == document["generation"] == 1
    (node,) = document["nodes"]
    assert node["conditions"][0]["status"] == "True"
    assert node["facts"]["cpuCount"] >= 1
    (model,) = document["models"]
    assert model["conditions"][0]["reason"] == "Serving"
    assert [(c["type"], c["status"]) for c in model["conditions"][1:]] == [
        ("Reconciling", "False"),
        ("Stalled", "False"),
        ("Degraded", "False"),
    ]
    assert model["endpoint"].startswith("http://127.0.0.1:")
    assert rank0(document)["state"] == "running"


def test_chat_completion_through_the_master(cluster):
    response = cluster.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert response.model == MODEL
    assert response.choices[0].message.role == "assistant"
    assert isinstance(response.choices[0].message.content, str)
    assert response.usage.completion_tokens == 8
    assert response.choices[0].finish_reason == "length"


def test_streamed_chat_completion_through_the_master_matches_the_unstreamed_one(cluster):
    client = cluster.client()
    kwargs = dict(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12, temperature=0
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2
    assert text == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_anthropic_client_goes_through_the_master_with_its_x_api_key(cluster):
    import anthropic

    client = anthropic.Anthropic(base_url=cluster.url, api_key=cluster.token, max_retries=0, timeout=60)
    message = client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert message.usage.output_tokens == 4 and message.stop_reason == "max_tokens"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=cluster.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )


def test_count_tokens_goes_through_the_master_and_its_own_refusals_are_anthropic_errors(cluster):
    import anthropic
    from anthropic_types import validated

    client = anthropic.Anthropic(base_url=cluster.url, api_key=cluster.token, max_retries=0, timeout=60)
    hi = {"messages": [{"role": "user", "content": "hi"}], "system": "Be brief."}
    counted = client.messages.count_tokens(model=MODEL, **hi)
    usage = client.messages.create(model=MODEL, max_tokens=2, **hi).usage
    assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens
    refusals = [
        (lambda: client.messages.count_tokens(model="nope", **hi), anthropic.NotFoundError),
        (lambda: client.messages.create(model="", max_tokens=2, **hi), anthropic.BadRequestError),
        (
            lambda: client.messages.batches.create(
                requests=[{"custom_id": "a", "params": {"model": MODEL, "max_tokens": 2, **hi}}]
            ),
            anthropic.NotFoundError,
        ),
    ]
    for call, refused in refusals:
        with pytest.raises(refused) as caught:
            call()
        validated(anthropic.types.ErrorResponse, caught.value.body)


def test_models_are_listed_by_the_master(cluster):
    assert [m.id for m in cluster.client().models.list()] == [MODEL]
    listed = cluster.client().models.retrieve(MODEL)
    assert set(listed.to_dict()) == {"id", "object", "created", "owned_by"}, "OpenAI's model object"
    assert (listed.id, listed.object, listed.owned_by) == (MODEL, "model", "genmlx")
    assert isinstance(listed.created, int)
    with pytest.raises(openai.NotFoundError) as caught:
        cluster.client().models.retrieve("nope")
    assert caught.value.code == "model_not_found"


def test_a_request_without_a_model_is_a_400_at_the_master(cluster):
    with pytest.raises(openai.BadRequestError) as caught:
        cluster.client().chat.completions.create(
            model=openai.NOT_GIVEN, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert (caught.value.param, caught.value.type) == ("model", "invalid_request_error")
    assert "names no model" in caught.value.message


def test_a_declared_model_that_is_not_ready_is_not_listed_and_says_why(tmp_path, demo_model_dir):
    lonely = Cluster(tmp_path, demo_model_dir, with_agent=False)  # nothing answers for its one node
    try:
        observed = wait_until(
            lambda: http_status(f"{lonely.url}/healthz") == 200 and lonely.status()["models"],
            60,
            what="the master's first pass",
        )
        why = observed[0]["conditions"][0]["message"]
        assert lonely.client().models.list().data == []
        with pytest.raises(openai.NotFoundError) as caught:
            lonely.client().models.retrieve(MODEL)
        assert caught.value.code == "model_not_ready"
        assert caught.value.body["message"] == f"The model '{MODEL}' is not ready: {why}"
    finally:
        lonely.stop()


def test_unknown_model_is_a_404_in_openai_shape(cluster):
    with pytest.raises(openai.NotFoundError) as caught:
        cluster.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert "nope" in caught.value.body["message"]


def test_a_client_that_hangs_up_mid_stream_stops_its_generation(cluster):
    stream = cluster.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "go on"}], max_tokens=2000, stream=True
    )
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    stream.close()

    def cancelled_line() -> str | None:
        log = cluster.agent_api("/api/v1/ranks/demo/0/log")
        return next((line for line in log.splitlines() if "finish=cancelled" in line), None)

    line = wait_until(cancelled_line, 30, what="rank 0 to log the cancelled request")
    generated = int(re.search(r"completion_tokens=(\d+)", line).group(1))
    assert 1 <= generated < 2000
    response = cluster.client().completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert response.usage.completion_tokens == 2


def test_the_master_and_agent_refuse_a_missing_or_wrong_token(cluster):
    agent = f"http://127.0.0.1:{cluster.agent_port}"
    for url in (f"{cluster.url}/api/v1/status", f"{agent}/api/v1/state"):
        assert http_status(url) == 401
        assert http_status(url, token="wrong") == 401
        assert http_status(url, token=cluster.token) == 200
    assert http_status(f"{cluster.url}/healthz") == 200
    with pytest.raises(openai.AuthenticationError):
        cluster.client(api_key="wrong").models.list()


def test_status_command_prints_the_cluster(cluster):
    text = cluster.cli("status", "--master", cluster.url)
    assert text.returncode == 0, text.stderr
    assert "Ready=True" in text.stdout and MODEL in text.stdout
    as_json = cluster.cli("status", "--master", cluster.url, "-o", "json")
    assert json.loads(as_json.stdout)["models"][0]["name"] == MODEL


def test_events_and_the_live_stream_tell_what_happened(cluster):
    cluster.wait_ready()
    request = urllib.request.Request(
        f"{cluster.url}/api/v1/events?kind=Model&name={MODEL}",
        headers={"Authorization": f"Bearer {cluster.token}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        events = json.loads(response.read())["events"]
    reasons = [e["reason"] for e in events]
    assert "Serving" in reasons and "StartRankGroup" in reasons
    assert reasons.index("Serving") < reasons.index("StartRankGroup")  # newest first

    stream = urllib.request.Request(f"{cluster.url}/api/v1/stream", headers=request.headers)
    with urllib.request.urlopen(stream, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        first = [response.readline().decode() for _ in range(2)]
        assert first[0] == "event: status\n"
        assert json.loads(first[1].removeprefix("data: "))["models"][0]["name"] == MODEL
        following = [response.readline().decode() for _ in range(3)]  # the next pass's status
        assert following[1] == "event: status\n"
    assert http_status(f"{cluster.url}/api/v1/stream") == 401


def test_get_and_describe(cluster):
    listed = cluster.cli("get", "models", "--master", cluster.url)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split()[:3] == ["MODEL", "READY", "REASON"]
    assert listed.stdout.splitlines()[1].split()[:3] == [MODEL, "True", "Serving"]
    nodes = json.loads(cluster.cli("get", "nodes", "--master", cluster.url, "-o", "json").stdout)
    assert [n["name"] for n in nodes] == ["local"]
    described = cluster.cli("describe", "model", MODEL, "--master", cluster.url)
    assert described.returncode == 0, described.stderr
    assert "Conditions:\n  Ready=True Serving" in described.stdout
    assert "Events:" in described.stdout and "StartRankGroup" in described.stdout
    missing = cluster.cli("describe", "model", "nope", "--master", cluster.url)
    assert missing.returncode == 2 and "no model named 'nope'" in missing.stderr


def test_the_read_commands_find_the_master_from_the_manifest_or_genmlx_master(cluster):
    manifest = ("-f", str(cluster.manifest))  # its master node's address and spec.master.port
    status = cluster.cli("status", *manifest)
    assert status.returncode == 0 and "Ready=True" in status.stdout, status.stderr
    listed = cluster.cli("get", "models", *manifest)
    assert listed.stdout.splitlines()[1].split()[:2] == [MODEL, "True"], listed.stderr
    described = cluster.cli("describe", "model", MODEL, *manifest)
    assert "Ready=True Serving" in described.stdout, described.stderr
    link = cluster.cli("ui", "--no-open", *manifest)
    assert link.returncode == 0 and link.stdout.startswith(f"{cluster.url}/ui/login?code="), link.stderr
    from_env = cluster.cli("get", "nodes", env={"GENMLX_MASTER": cluster.url})
    assert from_env.returncode == 0 and "local" in from_env.stdout, from_env.stderr


def test_applying_the_same_manifest_twice_plans_nothing(cluster):
    pid = rank0(cluster.wait_ready())["pid"]
    done = cluster.cli("apply", "-f", str(cluster.manifest))
    assert done.returncode == 0, done.stderr
    assert "unchanged (generation 1" in done.stdout
    assert "nothing to do" in done.stdout
    assert rank0(cluster.wait_ready())["pid"] == pid


def test_an_invalid_manifest_is_refused_and_changes_nothing(cluster):
    broken = cluster.root / "broken.yaml"
    broken.write_text(cluster.manifest_text().replace("nodes: [local]", "nodes: [elsewhere]"))
    done = cluster.cli("apply", "-f", str(broken))
    assert done.returncode == 1
    assert "'elsewhere' is not a declared node" in done.stderr
    assert cluster.status()["generation"] == 1


def test_the_master_itself_refuses_an_invalid_manifest_with_every_issue(cluster):
    text = cluster.manifest_text().replace("nodes: [local]", "nodes: [elsewhere]").replace("kind:", "knd:")
    body = json.dumps({"manifest": text, "filename": "sent.yaml"}).encode()
    request = urllib.request.Request(
        f"{cluster.url}/api/v1/manifest",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {cluster.token}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 422
    issues = json.loads(caught.value.read())["error"]["issues"]
    assert any(issue.startswith("sent.yaml:2:1: knd: unknown key 'knd'") for issue in issues), issues
    assert any("'elsewhere' is not a declared node" in issue for issue in issues), issues
    assert cluster.status()["generation"] == 1


def test_diff_previews_without_applying_with_kubectl_exit_codes(cluster):
    same = cluster.cli("diff", "-f", str(cluster.manifest))
    assert same.returncode == 0, same.stderr
    assert "nothing to do" in same.stdout and "0 to create, 0 to change, 0 to remove" in same.stdout
    changed = cluster.root / "changed.yaml"
    changed.write_text(cluster.manifest_text(max_batch=2))
    would = cluster.cli("diff", "-f", str(changed))
    assert would.returncode == 1, would.stderr
    assert "~ restart demo: its spec changed" in would.stdout
    assert cluster.status()["generation"] == 1  # a preview applies nothing
    broken = cluster.root / "broken-diff.yaml"
    broken.write_text(cluster.manifest_text().replace("kind:", "knd:"))
    assert cluster.cli("diff", "-f", str(broken)).returncode == 2


def test_a_changed_serving_option_restarts_the_rank_group(cluster):
    pid = rank0(cluster.wait_ready())["pid"]
    cluster.manifest.write_text(cluster.manifest_text(max_batch=4))
    done = cluster.cli("apply", "-f", str(cluster.manifest))
    assert done.returncode == 0, done.stderr
    assert "configured (generation 2" in done.stdout
    assert "~ restart demo: its spec changed" in done.stdout
    assert "0 to create, 1 to change, 0 to remove" in done.stdout
    wait_until(
        lambda: (d := cluster.ready_status()) and d["observedGeneration"] == 2 and rank0(d)["pid"] != pid,
        60,
        what="the restarted group to serve",
    )


def test_a_killed_master_leaves_serving_alone_and_a_new_one_converges_without_restarts(cluster):
    document = cluster.wait_ready()
    pid, endpoint = rank0(document)["pid"], document["models"][0]["endpoint"]
    cluster.master.signal(signal.SIGKILL)
    cluster.master.popen.wait(10)
    direct = cluster.client(base=endpoint).completions.create(model=MODEL, prompt="still here", max_tokens=3)
    assert direct.usage.completion_tokens == 3
    cluster.master = cluster.start_master()
    document = cluster.wait_ready()
    assert rank0(document)["pid"] == pid
    assert "+ start" not in cluster.master.output()
