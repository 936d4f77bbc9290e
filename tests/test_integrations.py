"""The client snippets of ``genmlx integrations`` and the status page, one client at a time: each
parses as what its client reads (TOML, JSON, shell), names the master's URL the way that client
wants it, the model, and the key only where it was asked for."""

from __future__ import annotations

import json
import shlex
import tomllib

import pytest

from genmlx.wire.integrations import (
    CLIENTS,
    KEY_ENV,
    KEY_PLACEHOLDER,
    MODEL_PLACEHOLDER,
    Integration,
    Target,
    format_client_list,
    format_integration,
    render_all,
    render_integration,
)

URL = "http://studio.local:6789"
TOKEN = "s3cret-token_value"
READY = Target(URL, ("qwen", "llama"))


def snippet(integration: Integration, language: str) -> str:
    (text,) = [s.text for s in integration.snippets if s.language == language]
    return text


def exported(script: str) -> dict[str, str]:
    """The variables a block of ``export NAME=VALUE`` lines sets, each value as the shell reads it
    (a ``$(...)`` left as written)."""
    pairs = {}
    for line in script.splitlines():
        words = shlex.split(line, posix=True)
        assert words[0] == "export" and len(words) == 2, line
        name, _, value = words[1].partition("=")
        pairs[name] = value
    return pairs


def test_claude_code_gets_the_master_without_v1_a_bearer_token_and_the_model_for_every_alias() -> None:
    integration = render_integration("claude-code", READY)
    env = exported(snippet(integration, "sh"))
    assert env["ANTHROPIC_BASE_URL"] == URL, "Claude Code adds /v1/messages itself"
    assert env["ANTHROPIC_AUTH_TOKEN"] == KEY_PLACEHOLDER
    for alias in ("MODEL", "DEFAULT_OPUS_MODEL", "DEFAULT_SONNET_MODEL", "DEFAULT_HAIKU_MODEL"):
        assert env[f"ANTHROPIC_{alias}"] == "qwen"
    assert env["ANTHROPIC_SMALL_FAST_MODEL"] == "qwen"
    assert integration.model == "qwen"


def test_codex_gets_a_provider_on_the_responses_api_reading_its_key_from_the_environment() -> None:
    integration = render_integration("codex", READY)
    config = tomllib.loads(snippet(integration, "toml"))
    assert config["model"] == "qwen" and config["model_provider"] == "genmlx"
    assert config["model_providers"]["genmlx"] == {
        "name": "GenMLX",
        "base_url": f"{URL}/v1",
        "env_key": KEY_ENV,
        "wire_api": "responses",
    }
    assert exported(snippet(integration, "sh")) == {KEY_ENV: KEY_PLACEHOLDER}
    assert any("serving.contextLength" in note and "20,000" in note for note in integration.notes)


def test_opencode_gets_an_openai_compatible_provider_with_every_ready_model() -> None:
    integration = render_integration("opencode", READY)
    config = json.loads(snippet(integration, "json"))
    assert config["$schema"] == "https://opencode.ai/config.json"
    provider = config["provider"]["genmlx"]
    assert provider["npm"] == "@ai-sdk/openai-compatible"
    assert provider["options"] == {"baseURL": f"{URL}/v1", "apiKey": f"{{env:{KEY_ENV}}}"}
    assert list(provider["models"]) == ["qwen", "llama"]
    assert config["model"] == "genmlx/qwen"
    assert exported(snippet(integration, "sh")) == {KEY_ENV: KEY_PLACEHOLDER}


def test_cline_gets_the_four_fields_of_its_openai_compatible_provider() -> None:
    fields = dict(
        line.split(": ", 1) for line in snippet(render_integration("cline", READY), "text").splitlines()
    )
    assert fields == {
        "API Provider": "OpenAI Compatible",
        "Base URL": f"{URL}/v1",
        "API Key": "what `genmlx token --show` prints",
        "Model ID": "qwen",
    }
    shown = render_integration("cline", Target(URL, ("qwen",), token=TOKEN))
    assert f"API Key: {TOKEN}" in snippet(shown, "text")


def test_open_webui_gets_the_openai_base_url_and_key_and_a_docker_warning_on_loopback() -> None:
    integration = render_integration("openwebui", READY)
    assert exported(snippet(integration, "sh")) == {
        "OPENAI_API_BASE_URL": f"{URL}/v1",
        "OPENAI_API_KEY": KEY_PLACEHOLDER,
    }
    assert not any("host.docker.internal" in n for n in integration.notes)
    local = render_integration("openwebui", Target("http://127.0.0.1:6789", ("qwen",)))
    assert any("host.docker.internal" in n for n in local.notes)


@pytest.mark.parametrize("client", CLIENTS)
def test_the_token_is_written_only_when_given_and_then_as_one_shell_word(client: str) -> None:
    hidden = format_integration(render_integration(client, READY))
    assert TOKEN not in hidden
    shown = render_integration(client, Target(URL, READY.ready_models, token=TOKEN))
    text = format_integration(shown)
    assert TOKEN in text or f"{{env:{KEY_ENV}}}" in text, "the key, or where the client reads it"
    for block in (s.text for s in shown.snippets if s.language == "sh"):
        assert KEY_PLACEHOLDER not in block
        assert TOKEN in exported(block).values()


def test_a_token_with_shell_characters_stays_one_word() -> None:
    odd = "a b'$(rm -rf)"
    block = snippet(render_integration("codex", Target(URL, ("qwen",), token=odd)), "sh")
    assert exported(block) == {KEY_ENV: odd}


def test_a_chosen_model_and_no_ready_model_are_said_first() -> None:
    chosen = render_integration("codex", Target(URL, ("qwen", "llama"), model="llama"))
    assert tomllib.loads(snippet(chosen, "toml"))["model"] == "llama"
    assert chosen.notes[0].startswith("Codex"), "a Ready model needs no note"

    not_ready = render_integration("opencode", Target(URL, ("qwen",), model="big"))
    assert not_ready.notes[0] == "big is not Ready now (Ready: qwen); it answers 503 until it is."
    assert list(json.loads(snippet(not_ready, "json"))["provider"]["genmlx"]["models"]) == ["big", "qwen"]

    none = render_integration("claude-code", Target(URL, ()))
    assert none.notes[0].startswith("No model is Ready yet")
    assert exported(snippet(none, "sh"))["ANTHROPIC_MODEL"] == MODEL_PLACEHOLDER


def test_every_client_renders_and_the_list_has_one_line_each() -> None:
    assert [i.client for i in render_all(READY)] == list(CLIENTS)
    listed = format_client_list().splitlines()[1:]
    assert [line.split()[0] for line in listed] == list(CLIENTS)
    codex = render_integration("codex", READY)
    document = codex.to_json()
    assert Integration.from_json(document) == codex
    config = {"title": "~/.codex/config.toml", "language": "toml", "text": snippet(codex, "toml")}
    assert document["snippets"][0] == config
