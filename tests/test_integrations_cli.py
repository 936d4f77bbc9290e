"""`genmlx integrations` against a real master and agent on loopback: the snippets name the
master's URL and its Ready model, hold the token only with ``--show-key``, and work as printed:
each block is run (the shell exports through bash, with the real `genmlx token --show` behind the
placeholder) or parsed as its client reads it, then the real client library makes a request with
exactly what the block says. The master's ``/api/v1/integrations`` serves the same blocks."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import anthropic
import openai
import pytest
import test_cluster as harness
from agent_harness import call

from genmlx.wire.integrations import CLIENTS, KEY_ENV, KEY_PLACEHOLDER

pytestmark = pytest.mark.e2e
MODEL = harness.MODEL


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_model_dir):
    with harness.ready_cluster(tmp_path_factory.mktemp("integrations"), demo_model_dir) as cluster:
        yield cluster


def integration(cluster, client: str, *flags: str) -> dict:
    done = cluster.cli("integrations", client, "--master", cluster.url, "-o", "json", *flags)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def block(document: dict, language: str) -> str:
    (text,) = [s["text"] for s in document["snippets"] if s["language"] == language]
    return text


def run_in_shell(cluster, tmp_path: Path, script: str) -> dict[str, str]:
    """The environment after bash runs ``script``, with `genmlx` on the PATH as a user has it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    genmlx = bin_dir / "genmlx"
    genmlx.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m genmlx "$@"\n')
    genmlx.chmod(genmlx.stat().st_mode | stat.S_IXUSR)
    env = {**cluster.env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-ec", f"{script}\nenv -0"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return dict(entry.split("=", 1) for entry in done.stdout.decode().split("\0") if "=" in entry)


def test_every_client_is_listed_and_each_names_this_master_without_the_token(cluster) -> None:
    listed = cluster.cli("integrations")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == list(CLIENTS)
    for client in CLIENTS:
        text = cluster.cli("integrations", client, "--master", cluster.url)
        assert text.returncode == 0, text.stderr
        assert cluster.url in text.stdout and MODEL in text.stdout
        assert cluster.token not in text.stdout + text.stderr
        assert KEY_PLACEHOLDER in text.stdout or "genmlx token --show" in text.stdout


def test_show_key_writes_the_token_and_the_manifest_names_the_master(cluster) -> None:
    shown = cluster.cli("integrations", "claude-code", "-f", str(cluster.manifest), "--show-key")
    assert shown.returncode == 0, shown.stderr
    assert f"export ANTHROPIC_AUTH_TOKEN={cluster.token}" in shown.stdout
    assert f"export ANTHROPIC_BASE_URL={cluster.url}\n" in shown.stdout


def test_the_claude_code_exports_reach_the_model_through_messages(cluster, tmp_path) -> None:
    env = run_in_shell(cluster, tmp_path, block(integration(cluster, "claude-code"), "sh"))
    assert env["ANTHROPIC_AUTH_TOKEN"] == cluster.token, "the placeholder read the token"
    client = anthropic.Anthropic(
        base_url=env["ANTHROPIC_BASE_URL"],
        auth_token=env["ANTHROPIC_AUTH_TOKEN"],
        api_key=None,
        max_retries=0,
    )
    message = client.messages.create(
        model=env["ANTHROPIC_MODEL"], max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.model == MODEL and message.usage.output_tokens == 2


def test_the_codex_config_reaches_the_model_through_responses(cluster, tmp_path) -> None:
    document = integration(cluster, "codex")
    config = tomllib.loads(block(document, "toml"))
    provider = config["model_providers"][config["model_provider"]]
    assert provider["wire_api"] == "responses"
    env = run_in_shell(cluster, tmp_path, block(document, "sh"))
    client = openai.OpenAI(base_url=provider["base_url"], api_key=env[provider["env_key"]], max_retries=0)
    response = client.responses.create(model=config["model"], input="hi", max_output_tokens=2)
    assert response.model == MODEL and response.status in ("completed", "incomplete")


def test_the_opencode_config_reaches_the_model_through_chat_completions(cluster, tmp_path) -> None:
    document = integration(cluster, "opencode")
    config = json.loads(block(document, "json"))
    provider_id, model = config["model"].split("/", 1)
    options = config["provider"][provider_id]["options"]
    assert options["apiKey"] == f"{{env:{KEY_ENV}}}"
    env = run_in_shell(cluster, tmp_path, block(document, "sh"))
    client = openai.OpenAI(base_url=options["baseURL"], api_key=env[KEY_ENV], max_retries=0)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.model == MODEL


def test_the_open_webui_variables_list_the_ready_model(cluster, tmp_path) -> None:
    env = run_in_shell(cluster, tmp_path, block(integration(cluster, "openwebui"), "sh"))
    client = openai.OpenAI(base_url=env["OPENAI_API_BASE_URL"], api_key=env["OPENAI_API_KEY"], max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]


def test_a_model_that_is_not_ready_is_said(cluster) -> None:
    text = cluster.cli("integrations", "cline", "--master", cluster.url, "--model", "ghost")
    assert text.returncode == 0, text.stderr
    assert "Model ID: ghost" in text.stdout
    assert f"ghost is not Ready now (Ready: {MODEL})" in text.stdout


def test_the_master_serves_the_same_blocks_with_the_placeholder(cluster) -> None:
    reply = call("GET", f"{cluster.url}/api/v1/integrations", cluster.token)
    assert reply.status == 200, reply.body
    document = reply.json()
    assert document["readyModels"] == [MODEL]
    assert [i["client"] for i in document["integrations"]] == list(CLIENTS)
    assert cluster.token not in reply.body.decode()
    codex = next(i for i in document["integrations"] if i["client"] == "codex")
    assert codex == integration(cluster, "codex")
    assert call("GET", f"{cluster.url}/api/v1/integrations", "wrong").status == 401
