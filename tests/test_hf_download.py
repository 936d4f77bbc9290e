"""Hugging Face downloads through the real huggingface_hub, against tests/fakehub.py (a local server
that answers the Hub API the way huggingface.co does), serving the demo model.

In-process tests point the download at the fake hub through ``HF_ENDPOINT`` set after
huggingface_hub was imported: ``download_model`` reads the variable on every call and passes the
endpoint explicitly, which is what these tests check (and a guard fails any lookup of another
host). The kill-and-resume test and the agent test run child processes that get ``HF_ENDPOINT``
at start, as a real agent does, and no ``HF_HUB_DISABLE_TELEMETRY``: anything huggingface_hub would
fetch besides the model would show in the fake hub's requests.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, http_status, signed, wait_until
from fakehub import FakeHub, files_from_dir

from genmlx.agent.transfers.hf_download import SCRATCH_DIR, HubRetry, download_model
from genmlx.agent.transfers.progress import TransferCancelled
from genmlx.core.errors import PermanentError, TemporaryError
from genmlx.wire.agent_state import AgentState, FetchRequest, Transfer
from genmlx.wire.rank_launch import RankLaunch
from genmlx.wire.serving import ServingSettings

pytestmark = pytest.mark.timeout(120)

REPO = "genmlx/demo-llama"
FAST = HubRetry(attempts=3, first_wait_s=0.05, max_wait_s=0.2)
# What mlx-lm needs of the demo model; README.md and genmlx-demo.json are in the repo too.
DEMO_NEEDS = {
    "config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
JUNK = {
    "original/consolidated.pth": b"torch weights that mlx-lm never reads" * 100,
    "consolidated.safetensors": b"the same weights again" * 100,
    "onnx/model.onnx": b"an export",
    "scripts/convert.py": b"print('not needed')\n",
}
MIB = 1024 * 1024
BIG_WEIGHTS = 8 * MIB  # several of download_model's 1 MB writes


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    fake = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # Unset for the processes tests start (download_model sets it in this one; undone at the end),
    # so that anything huggingface_hub would fetch besides the model shows in ``fake.requests``.
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY", raising=False)
    yield fake
    fake.stop()


@pytest.fixture
def demo_repo(hub: FakeHub, demo_model_dir: Path) -> dict[str, bytes]:
    files = {**files_from_dir(demo_model_dir), **JUNK}
    hub.add_commit(REPO, files)
    return files


@pytest.fixture(autouse=True)
def only_loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fail the test if anything looks up a host other than loopback (huggingface.co included)."""
    looked_up: list[str] = []
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1", None):
            looked_up.append(str(host))
            raise OSError(f"test guard: no lookups of {host}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield looked_up
    assert looked_up == [], f"something tried to reach {looked_up}"


def download(dest: Path, revision: str = "main", token: str | None = None, repo: str = REPO, progress=None):
    return download_model(repo, revision, dest, progress or (lambda done, total: None), token, retry=FAST)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def big_repo(hub: FakeHub, demo_model_dir: Path) -> tuple[dict[str, bytes], str]:
    files = files_from_dir(demo_model_dir)
    files["model.safetensors"] = random.Random(7).randbytes(BIG_WEIGHTS)
    return files, hub.add_commit("genmlx/big", files)


def test_downloads_only_what_mlx_lm_needs_verified_and_pinned_to_the_commit(
    hub: FakeHub, demo_repo: dict[str, bytes], tmp_path: Path
):
    dest = tmp_path / "partial"
    result = download(dest)

    assert result.commit == hub.repos[REPO].refs["main"]
    assert {f.path for f in result.files} == DEMO_NEEDS
    for f in result.files:
        assert (f.size, f.sha256) == (len(demo_repo[f.path]), sha256(demo_repo[f.path]))
        assert (dest / f.path).read_bytes() == demo_repo[f.path]
    on_disk = {p.relative_to(dest).as_posix() for p in dest.rglob("*")}
    assert on_disk == DEMO_NEEDS, "junk, docs and scratch files stay out"
    resolved = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert resolved and all(f"/resolve/{result.commit}/" in p for p in resolved), "pinned to the commit"
    assert not any(name in p for p in resolved for name in ("README.md", "consolidated", "onnx", "scripts"))
    assert hub.seen("GET", "/api/models/")[0].path == f"/api/models/{REPO}/revision/main"
    assert not any("authorization" in r.headers for r in hub.requests), "no token was given, none is sent"


def test_progress_rises_to_the_total_while_bytes_arrive(hub: FakeHub, demo_model_dir: Path, tmp_path: Path):
    files, _ = big_repo(hub, demo_model_dir)
    hub.throttle(8 * MIB)
    calls: list[tuple[int, int | None]] = []
    result = download(tmp_path / "partial", repo="genmlx/big", progress=lambda d, t: calls.append((d, t)))

    total = sum(f.size for f in result.files)
    assert total == sum(len(files[p]) for p in DEMO_NEEDS)
    assert calls[-1] == (total, total)
    known = [done for done, t in calls if t is not None]
    assert all(t in (None, total) for _, t in calls)
    assert known == sorted(known), "bytes done never go back in a clean download"
    assert len([d for d in known if 0 < d < total]) >= 2, "progress shows while the weights arrive"


def test_the_progress_callback_sees_the_total_first_and_can_stop_the_download(
    hub: FakeHub, demo_model_dir: Path, tmp_path: Path
):
    files, _ = big_repo(hub, demo_model_dir)
    hub.throttle(8 * MIB)
    calls: list[tuple[int, int | None]] = []

    def progress(done: int, total: int | None) -> None:
        calls.append((done, total))
        if done > 2 * MIB:
            raise TransferCancelled("the agent is stopping")

    with pytest.raises(TransferCancelled):
        download(tmp_path / "partial", repo="genmlx/big", progress=progress)
    first_total = next(done for done, total in calls if total is not None)
    assert first_total < MIB, "the total is known (and room can be checked) before the weights come"
    part = tmp_path / "partial" / SCRATCH_DIR / f"{sha256(files['model.safetensors'])}.part"
    assert 2 * MIB <= part.stat().st_size < BIG_WEIGHTS, "stopped within a write, kept for resuming"


def test_a_gated_repo_needs_a_granted_token_which_never_reaches_the_cdn(
    hub: FakeHub, demo_repo: dict[str, bytes], tmp_path: Path
):
    hub.gate(REPO, tokens=("hf_granted",))
    for token in (None, "hf_not_granted"):
        with pytest.raises(PermanentError, match="not found or gated") as refused:
            download(tmp_path / "refused", token=token)
        assert f"hf://{REPO}@main" in str(refused.value)
        assert "hf_not_granted" not in str(refused.value)

    result = download(tmp_path / "granted", token="hf_granted")
    assert {f.path for f in result.files} == DEMO_NEEDS
    weights = hub.seen("HEAD", "model.safetensors", served_by="hub")[-1]
    assert weights.headers["authorization"] == "Bearer hf_granted"
    from_cdn = hub.seen("GET", served_by="cdn")
    assert len(from_cdn) == 1 and "authorization" not in from_cdn[0].headers


@pytest.mark.parametrize(
    ("repo", "revision", "token"),
    [
        ("genmlx/no-such-repo", "main", None),
        ("genmlx/no-such-repo", "main", "hf_any"),
        (REPO, "no-branch", None),
    ],
)
def test_a_missing_repo_or_revision_is_a_permanent_error(
    hub: FakeHub, demo_repo: dict[str, bytes], tmp_path: Path, repo: str, revision: str, token: str | None
):
    with pytest.raises(PermanentError, match="not found or gated") as refused:
        download(tmp_path / "partial", revision=revision, token=token, repo=repo)
    assert f"hf://{repo}@{revision}" in str(refused.value)
    assert len(hub.seen("GET", "/api/models/")) == 1, "a permanent error is not retried"


def test_server_errors_are_retried_until_the_hub_answers(
    hub: FakeHub, demo_repo: dict[str, bytes], tmp_path: Path
):
    hub.fail_next(2, status=500, path_contains="/api/models/")
    hub.fail_next(2, status=503, path_contains="model.safetensors")
    result = download(tmp_path / "partial")

    assert {f.path for f in result.files} == DEMO_NEEDS
    assert len(hub.seen("GET", "/api/models/")) == 3
    assert hub.bytes_served["model.safetensors"] == len(demo_repo["model.safetensors"])


def test_a_hub_that_keeps_failing_is_a_temporary_error(
    hub: FakeHub, demo_repo: dict[str, bytes], tmp_path: Path
):
    hub.fail_next(100, status=502)
    with pytest.raises(TemporaryError, match="HTTP 502") as failed:
        download(tmp_path / "partial")
    assert not isinstance(failed.value, PermanentError)
    assert len(hub.requests) == FAST.attempts


def test_an_unreachable_hub_is_a_temporary_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(TemporaryError, match="cannot reach the Hub"):
        download(tmp_path / "partial")


def test_a_corrupted_byte_is_detected_and_the_file_fetched_again(
    hub: FakeHub, demo_repo: dict[str, bytes], tmp_path: Path
):
    weights = demo_repo["model.safetensors"]
    hub.corrupt_next("model.safetensors")
    result = download(tmp_path / "partial")

    assert hub.bytes_served["model.safetensors"] == 2 * len(weights)
    assert {f.path: f.sha256 for f in result.files}["model.safetensors"] == sha256(weights)
    assert (tmp_path / "partial" / "model.safetensors").read_bytes() == weights


def test_a_file_that_never_verifies_is_never_put_in_place(
    hub: FakeHub, demo_repo: dict[str, bytes], tmp_path: Path
):
    hub.corrupt_next("tokenizer.json", times=100)  # a small file: checked against its git blob sha1
    with pytest.raises(TemporaryError, match="tokenizer.json does not match"):
        download(tmp_path / "partial")
    assert not (tmp_path / "partial" / "tokenizer.json").exists()
    assert hub.bytes_served["tokenizer.json"] == FAST.attempts * len(demo_repo["tokenizer.json"])


def test_a_connection_cut_mid_file_is_resumed_from_what_arrived(
    hub: FakeHub, demo_model_dir: Path, tmp_path: Path
):
    files, _ = big_repo(hub, demo_model_dir)
    hub.drop_next("model.safetensors", after_bytes=3 * MIB)
    result = download(tmp_path / "partial", repo="genmlx/big")

    assert {f.path: f.sha256 for f in result.files}["model.safetensors"] == sha256(files["model.safetensors"])
    first, second = hub.seen("GET", served_by="cdn")
    assert "range" not in first.headers and second.headers["range"] == f"bytes={3 * MIB}-"
    assert hub.bytes_served["model.safetensors"] == BIG_WEIGHTS, "no byte was sent twice"


@pytest.mark.parametrize(
    ("left_behind", "ignore_range", "bytes_sent"),
    [
        ("prefix", False, BIG_WEIGHTS - 2 * MIB),  # continued with a Range request
        ("prefix", True, BIG_WEIGHTS),  # the server sends the whole file: start over
        ("garbage", False, BIG_WEIGHTS - 2 * MIB + BIG_WEIGHTS),  # the hash fails: fetched again
    ],
)
def test_a_partial_file_from_an_earlier_run_is_continued_only_where_that_is_right(
    hub: FakeHub, demo_model_dir: Path, tmp_path: Path, left_behind: str, ignore_range: bool, bytes_sent: int
):
    files, _ = big_repo(hub, demo_model_dir)
    weights = files["model.safetensors"]
    part = tmp_path / "partial" / SCRATCH_DIR / f"{sha256(weights)}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(weights[: 2 * MIB] if left_behind == "prefix" else b"\0" * 2 * MIB)
    hub.ignore_range = ignore_range
    download(tmp_path / "partial", repo="genmlx/big")

    assert (tmp_path / "partial" / "model.safetensors").read_bytes() == weights
    assert hub.bytes_served["model.safetensors"] == bytes_sent


def test_a_branch_that_moves_mid_download_does_not_mix_commits(
    hub: FakeHub, demo_repo: dict[str, bytes], tmp_path: Path
):
    first = hub.repos[REPO].refs["main"]
    newer = {**demo_repo, "config.json": demo_repo["config.json"].replace(b"{", b'{"moved": true, ', 1)}
    second = hub.add_commit(REPO, newer, ref="next")
    hub.on_info = lambda: hub.move_ref(REPO, "main", second)
    result = download(tmp_path / "partial")

    assert result.commit == first
    assert (tmp_path / "partial" / "config.json").read_bytes() == demo_repo["config.json"]


def test_files_an_earlier_run_left_are_kept_when_they_verify_and_replaced_when_not(
    hub: FakeHub, demo_repo: dict[str, bytes], tmp_path: Path
):
    dest = tmp_path / "partial"
    dest.mkdir()
    (dest / "model.safetensors").write_bytes(demo_repo["model.safetensors"])
    (dest / "tokenizer.json").write_bytes(b"{}")  # same name, other content
    (dest / "model-00002-of-00002.safetensors").write_bytes(b"a shard of another commit")
    (dest / ".genmlx-model.json").write_text("{}")  # not ours: left alone
    result = download(dest)

    assert hub.bytes_served["model.safetensors"] == 0
    assert (dest / "tokenizer.json").read_bytes() == demo_repo["tokenizer.json"]
    assert not (dest / "model-00002-of-00002.safetensors").exists(), "mlx-lm would load a stale shard"
    assert (dest / ".genmlx-model.json").exists()
    assert {f.path for f in result.files} == DEMO_NEEDS


def test_code_files_come_only_when_an_auto_map_names_them(hub: FakeHub, demo_model_dir: Path, tmp_path: Path):
    base = files_from_dir(demo_model_dir)
    config = json.loads(base["config.json"])
    remote_code = {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModel": "other/repo--modeling.Tiny"}
    code = {
        "configuration_tiny.py": b"from .helpers import x\n",
        "helpers.py": b"x = 1\n",
        "sub/extra.py": b"",
    }
    hub.add_commit(
        "genmlx/with-code",
        {**base, **code, "config.json": json.dumps({**config, "auto_map": remote_code}).encode()},
    )
    hub.add_commit("genmlx/without-code", {**base, **code})

    with_code = download(tmp_path / "a", repo="genmlx/with-code")
    without_code = download(tmp_path / "b", repo="genmlx/without-code")
    assert {f.path for f in with_code.files} == DEMO_NEEDS | {"configuration_tiny.py", "helpers.py"}
    assert {f.path for f in without_code.files} == DEMO_NEEDS


def test_a_repo_without_mlx_weights_is_refused_before_downloading(hub: FakeHub, tmp_path: Path):
    hub.add_commit("genmlx/gguf-only", {"config.json": b"{}", "model-q4.gguf": b"gguf" * 1000})
    with pytest.raises(PermanentError, match="model\\*.safetensors"):
        download(tmp_path / "partial", repo="genmlx/gguf-only")
    assert hub.bytes_served["model-q4.gguf"] == 0


RESUMABLE_DOWNLOAD = """
import sys
from pathlib import Path
from genmlx.agent.transfers.hf_download import download_model
result = download_model("genmlx/big", "main", Path(sys.argv[1]), lambda done, total: None, None)
print("commit", result.commit, flush=True)
"""


@pytest.mark.e2e
def test_a_download_killed_mid_file_resumes_where_it_stopped(
    hub: FakeHub, demo_model_dir: Path, tmp_path: Path, spawn
):
    files, commit = big_repo(hub, demo_model_dir)
    weights = files["model.safetensors"]
    dest = tmp_path / "partial"
    hub.throttle(3 * MIB)
    first = spawn(["-c", RESUMABLE_DOWNLOAD, str(dest)], "download")
    part = dest / SCRATCH_DIR / f"{sha256(weights)}.part"
    wait_until(lambda: part.exists() and part.stat().st_size >= 2 * MIB, timeout=60, what="a partial file")
    first.signal(signal.SIGKILL)
    first.popen.wait(10)
    wait_until(lambda: hub.bodies_in_flight == 0, timeout=10, what="the hub to notice the client is gone")
    kept = part.stat().st_size
    assert 0 < kept < len(weights) and not (dest / "model.safetensors").exists()

    served_before = hub.bytes_served["model.safetensors"]
    hub.throttle(None)
    second = spawn(["-c", RESUMABLE_DOWNLOAD, str(dest)], "download-again")
    assert second.popen.wait(60) == 0, second.output()
    assert f"commit {commit}" in second.output()

    assert (dest / "model.safetensors").read_bytes() == weights
    assert hub.bytes_served["model.safetensors"] - served_before == len(weights) - kept
    assert hub.seen("GET", served_by="cdn")[-1].headers["range"] == f"bytes={kept}-"
    assert asked_beyond_the_model(hub) == set()
    assert not (dest / SCRATCH_DIR).exists()


def asked_beyond_the_model(hub: FakeHub) -> set[str]:
    """What the Hub was asked besides repo info and files (an agent registry, update checks...)."""
    paths = {r.path for r in hub.requests if r.served_by == "hub"}
    return {p for p in paths if not (p.startswith("/api/models/") or "/resolve/" in p)}


def agent_request(url: str, token: str, method: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=signed(token, method, url, data))
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())


def finished_transfer(url: str, token: str, model: str) -> Transfer | None:
    state = AgentState.from_json(agent_request(url + "/api/v1/state", token, "GET")[1])
    found = [t for t in state.transfers if t.model == model and t.state != "running"]
    return found[0] if found else None


@pytest.mark.e2e
def test_an_agent_downloads_a_gated_model_with_its_hf_token_and_serves_it(
    hub: FakeHub,
    demo_repo: dict[str, bytes],
    spawn,
    token: str,
    tmp_path: Path,
):
    hub.gate(REPO, tokens=("hf_agent_secret",))
    storage, port = tmp_path / "storage", free_port()
    storage.mkdir()
    url = f"http://127.0.0.1:{port}"
    args = ["-m", "genmlx", "agent", "--name", "node-a", "--storage", str(storage), "--port", str(port)]
    agent = spawn(
        [*args, "--host", "127.0.0.1", "--no-discovery"], "agent", env={"HF_TOKEN": "hf_agent_secret"}
    )
    wait_until(lambda: http_status(url + "/healthz") == 200, timeout=30, what="the agent to answer")

    fetch = FetchRequest(model="demo", storage_path=str(storage), source=f"hf://{REPO}", revision="main")
    assert agent_request(url + "/api/v1/models", token, "POST", fetch.to_json())[0] == 202
    done = wait_until(lambda: finished_transfer(url, token, "demo"), timeout=60, what="the download")
    assert (done.state, done.error) == ("done", None)
    assert done.bytes_done == done.bytes_total == sum(len(demo_repo[p]) for p in DEMO_NEEDS)

    state = AgentState.from_json(agent_request(url + "/api/v1/state", token, "GET")[1])
    (model,) = [m for s in state.storage for m in s.models if m.name == "demo"]
    assert model.complete and (model.source, model.revision) == (f"hf://{REPO}", "main")
    assert model.commit == hub.repos[REPO].refs["main"]
    assert {p.name for p in (storage / "demo").iterdir() if not p.name.startswith(".")} == DEMO_NEEDS

    serving = ServingSettings(max_batch=2, max_queue=4)
    launch = RankLaunch("demo", str(storage / "demo"), 0, 1, free_port(), "spec-1", serving=serving)
    assert agent_request(url + "/api/v1/ranks", token, "POST", launch.to_json())[0] == 201
    health = f"http://127.0.0.1:{launch.port}/health"
    wait_until(lambda: http_status(health) == 200, timeout=90, what="the rank to load the downloaded model")
    assert "hf_agent_secret" not in agent.output()
    assert asked_beyond_the_model(hub) == set()
