"""The real clients, end to end: Claude Code, Codex CLI, opencode and ``llm``, installed from their
registries, each run non-interactively against a one-node cluster on loopback.

The cluster serves scripted demo models (``genmlx.demo.scripted_model``): ``demo`` answers with a
line of text, and one model per client writes a call of that client's own shell or file tool, then,
once the tool's result is in the conversation, a plain answer. So a tool turn passes only if the
client parsed the call, ran the tool (its file appears) and sent the result back (only then does the
model write the answer the client prints).

The clients are installed once into ``$GENMLX_TEST_CLIENTS`` (default ``~/.cache/genmlx-test-clients``),
at pinned versions, and reused while present; a machine that cannot reach npm or PyPI skips these
tests (and fails them where ``CI`` is set).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port, skip_or_fail
from test_cluster import MODEL, Cluster, ready_cluster

from genmlx.demo.scripted_model import write_scripted_model
from genmlx.wire.integrations import Integration, Snippet, Target, render_integration

pytestmark = [pytest.mark.e2e, pytest.mark.clients]

NPM_PACKAGES = ("@anthropic-ai/claude-code@2.1.332", "@openai/codex@0.171.0", "opencode-ai@1.18.33")
LLM_PACKAGE = "llm==0.36"
CACHE = Path(os.environ.get("GENMLX_TEST_CLIENTS", Path.home() / ".cache" / "genmlx-test-clients"))
# Codex's system prompt alone is about 22k tokens; Claude Code's is of the same order.
CONTEXT_LENGTH = 65536
CLIENT_TIMEOUT = 300

PLAIN_ANSWER = "Hello from the scripted model"
ANSWER_AFTER_TOOL = "Done, the file is there"
MADE_FILE = "ran.txt"
# Each client's tool, called as the scripted model writes it (each token with one successor).
TOOL_CALLS = {
    "claude": '{"name": "Bash","arguments":{"command":"touch ran.txt"}}',
    "codex": '{"name": "exec_command","arguments":{"cmd":"touch ran.txt"}}',
    "opencode": '{"name": "bash","arguments":{"command":"touch ran.txt"}}',
    "llm": '{"name": "make_file","arguments":{"path":"ran.txt"}}',
}
# llm runs Python functions as tools: this one makes the file it is asked for.
LLM_FUNCTIONS = "def make_file(path: str) -> str:\n    open(path, 'w').close()\n    return 'made ' + path\n"


class ClientsCluster(Cluster):
    """The one-node cluster, serving ``model_dir``'s ``plain`` model as ``demo`` and each client's
    model by the client's name, each with a context long enough for a coding agent's system
    prompt. (A ``file://`` source must be a directory of the node's storage.)"""

    def __init__(self, root: Path, model_dir: Path):
        storage = root / "storage"
        self.model_dirs = {MODEL: storage / MODEL}
        for client in TOOL_CALLS:
            shutil.copytree(model_dir / client, storage / client)
            self.model_dirs[client] = storage / client
        self.model_ports = {name: free_port() for name in self.model_dirs}
        super().__init__(root, model_dir / "plain")

    def models_text(self, max_batch: int = 2) -> str:
        return "".join(
            self.model_entry(
                name,
                path,
                f"maxBatch: {max_batch}, port: {self.model_ports[name]}, contextLength: {CONTEXT_LENGTH}",
            )
            for name, path in self.model_dirs.items()
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    models = tmp_path_factory.mktemp("models")
    write_scripted_model(models / "plain", PLAIN_ANSWER)
    for client, call in TOOL_CALLS.items():
        write_scripted_model(models / client, f"<tool_call>{call}</tool_call>", after_tool=ANSWER_AFTER_TOOL)
    with ready_cluster(tmp_path_factory.mktemp("cluster"), models, ClientsCluster) as cluster:
        yield cluster


@contextlib.contextmanager
def installing() -> Iterator[None]:
    """One test process at a time installs into the cache (``pytest -n`` runs several)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".installing.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def installed(command: list[str], what: str, binaries: list[Path]) -> None:
    """Install with ``command`` unless every one of ``binaries`` is there already."""
    if all(binary.exists() for binary in binaries):
        return
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        skip_or_fail(f"installing it failed: {e}", what)
    if done.returncode != 0 or not all(binary.exists() for binary in binaries):
        skip_or_fail(f"installing it failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}", what)


@pytest.fixture(scope="module")
def npm_bin() -> Path:
    prefix = CACHE / "npm"
    command = ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix), *NPM_PACKAGES]
    bin_dir = prefix / "node_modules" / ".bin"
    with installing():
        installed(command, "npm clients", [bin_dir / name for name in ("claude", "codex", "opencode")])
    return bin_dir


@pytest.fixture(scope="module")
def llm_bin() -> Path:
    venv = CACHE / "llm-venv"
    with installing():
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", LLM_PACKAGE]
        installed(pip, "llm", [venv / "bin" / "llm"])
    return venv / "bin" / "llm"


@dataclass(frozen=True)
class Run:
    """A client run: its exit status, what it printed, and its working directory."""

    returncode: int
    output: str
    workdir: Path

    def made_the_file(self) -> bool:
        return (self.workdir / MADE_FILE).exists()


def run_client(command: list[str], home: Path, env: dict[str, str]) -> Run:
    """Run a client in a fresh working directory, with ``home`` as its HOME (so no user config is
    read), and return what happened."""
    workdir = home / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    # PWD too: opencode takes its project directory from it, not from the working directory.
    home_env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "PWD": str(workdir)}
    full_env = {**os.environ, **home_env, **env}
    done = subprocess.run(
        command,
        cwd=workdir,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    output = done.stdout + done.stderr
    print(f"$ {' '.join(command)}\n{output}")
    return Run(done.returncode, output, workdir)


def assert_plain_turn(run: Run) -> None:
    assert run.returncode == 0, run.output
    assert PLAIN_ANSWER in run.output


def assert_tool_turn(run: Run, cluster: ClientsCluster, model: str) -> None:
    """The tool ran, and the model's dispatcher saw a second, longer request (the one carrying the
    result), answered with the text the model writes only after a tool result."""
    assert run.returncode == 0, run.output
    assert run.made_the_file(), f"the tool never ran:\n{run.output}"
    assert ANSWER_AFTER_TOOL in run.output, f"the tool's result never came back:\n{run.output}"
    log = cluster.agent_api(f"/api/v1/ranks/{model}/0/log")
    prompts = [
        int(n)
        for n in re.findall(r"POST /v1/(?:chat/completions|responses|messages) 200 prompt_tokens=(\d+)", log)
    ]
    # The request with the result holds the first prompt, the call and the result: it is longer.
    assert len(prompts) >= 2 and max(prompts[1:]) > prompts[0], log


def integration(cluster: ClientsCluster, client: str, model: str) -> Integration:
    """What ``genmlx integrations CLIENT --show-key`` prints for this cluster: the clients run on it."""
    target = Target(cluster.url, tuple(cluster.model_dirs), model=model, token=cluster.token)
    return render_integration(client, target)


def exported(snippet: Snippet) -> dict[str, str]:
    """The variables a block of ``export NAME=VALUE`` lines sets."""
    words = [shlex.split(line.removeprefix("export "))[0] for line in snippet.text.splitlines()]
    return dict(word.split("=", 1) for word in words)


def claude(npm_bin: Path, cluster: ClientsCluster, home: Path, model: str, prompt: str) -> Run:
    env = exported(integration(cluster, "claude-code", model).snippets[0])
    env.update(CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1")
    command = [str(npm_bin / "claude"), "-p", prompt, "--allowedTools", "Bash", "--max-turns", "4"]
    return run_client(command, home, env)


@pytest.mark.parametrize("tool", [False, True], ids=["plain", "tool"])
def test_claude_code(npm_bin, cluster, tmp_path: Path, tool: bool) -> None:
    if tool:
        assert_tool_turn(
            claude(npm_bin, cluster, tmp_path, "claude", "Make the file ran.txt"), cluster, "claude"
        )
    else:
        assert_plain_turn(claude(npm_bin, cluster, tmp_path, MODEL, "Say hello"))


def codex(npm_bin: Path, cluster: ClientsCluster, home: Path, model: str, prompt: str) -> Run:
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True)
    config, key = integration(cluster, "codex", model).snippets
    (codex_home / "config.toml").write_text(config.text)
    command = [
        str(npm_bin / "codex"),
        "exec",
        "--skip-git-repo-check",
        "--dangerously-bypass-approvals-and-sandbox",
        prompt,
    ]
    return run_client(command, home, {"CODEX_HOME": str(codex_home), **exported(key)})


@pytest.mark.parametrize("tool", [False, True], ids=["plain", "tool"])
def test_codex(npm_bin, cluster, tmp_path: Path, tool: bool) -> None:
    if tool:
        assert_tool_turn(
            codex(npm_bin, cluster, tmp_path, "codex", "Make the file ran.txt"), cluster, "codex"
        )
    else:
        assert_plain_turn(codex(npm_bin, cluster, tmp_path, MODEL, "Say hello"))


def opencode(npm_bin: Path, cluster: ClientsCluster, home: Path, model: str, prompt: str) -> Run:
    config_block, key = integration(cluster, "opencode", model).snippets
    # The printed file, plus what a run without a person needs: tools allowed, no updates or sharing.
    config = {**json.loads(config_block.text), "permission": {"bash": "allow", "edit": "allow"}}
    config.update(autoupdate=False, share="disabled")
    (home / "work").mkdir(parents=True)
    (home / "work" / "opencode.json").write_text(json.dumps(config))
    command = [str(npm_bin / "opencode"), "run", "--model", f"genmlx/{model}", prompt]
    return run_client(command, home, exported(key))


@pytest.mark.parametrize("tool", [False, True], ids=["plain", "tool"])
def test_opencode(npm_bin, cluster, tmp_path: Path, tool: bool) -> None:
    if tool:
        assert_tool_turn(
            opencode(npm_bin, cluster, tmp_path, "opencode", "Make the file ran.txt"), cluster, "opencode"
        )
    else:
        assert_plain_turn(opencode(npm_bin, cluster, tmp_path, MODEL, "Say hello"))


def llm(llm_bin: Path, cluster: ClientsCluster, home: Path, model: str, *args: str) -> Run:
    user_dir = home / "llm"
    user_dir.mkdir(parents=True)
    (user_dir / "extra-openai-models.yaml").write_text(
        json.dumps(  # JSON is YAML
            [
                {
                    "model_id": f"genmlx-{model}",
                    "model_name": model,
                    "api_base": f"{cluster.url}/v1",
                    "api_key_name": "genmlx",
                    "supports_tools": True,
                }
            ]
        )
    )
    (user_dir / "keys.json").write_text(json.dumps({"genmlx": cluster.token}))
    command = [str(llm_bin), "-m", f"genmlx-{model}", "--no-log", *args]
    return run_client(command, home, {"LLM_USER_PATH": str(user_dir)})


@pytest.mark.parametrize("tool", [False, True], ids=["plain", "tool"])
def test_llm(llm_bin, cluster, tmp_path: Path, tool: bool) -> None:
    if tool:
        run = llm(llm_bin, cluster, tmp_path, "llm", "--functions", LLM_FUNCTIONS, "Make ran.txt")
        assert_tool_turn(run, cluster, "llm")
    else:
        assert_plain_turn(llm(llm_bin, cluster, tmp_path, MODEL, "Say hello"))
