"""How to point each supported client at this cluster, as text: the environment variables or the
config-file snippet for Claude Code, Codex CLI, opencode, Cline and Open WebUI.

One renderer for ``genmlx integrations`` and the status page (``GET /api/v1/integrations``), so the
two never say different things. Pure formatting: the master's URL, the Ready models and the key come
in; the key is the cluster token only where the caller has it and asks for it (``--show-key``),
otherwise a shell substitution that reads it (``$(genmlx token --show)``), so the page and a
terminal's scrollback never hold the token.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace

from genmlx.wire.codec import WireType

KEY_COMMAND = "genmlx token --show"
KEY_PLACEHOLDER = f"$({KEY_COMMAND})"
KEY_ENV = "GENMLX_API_KEY"  # where clients that read their key from the environment find it
MODEL_PLACEHOLDER = "MODEL"  # while no model is Ready


@dataclass(frozen=True)
class Target:
    """What every snippet is about: the master's URL (no ``/v1``), the Ready models, the model the
    snippets use, and the token (None: write the placeholder)."""

    master_url: str
    ready_models: tuple[str, ...]
    model: str | None = None
    token: str | None = None

    @property
    def base_url(self) -> str:
        return self.master_url.rstrip("/")

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def chosen_model(self) -> str:
        """The model asked for, else the first Ready one, else ``MODEL`` to replace."""
        return self.model or (self.ready_models[0] if self.ready_models else MODEL_PLACEHOLDER)

    def shell_key(self) -> str:
        """The key as a shell word: the token quoted, or the substitution that reads it."""
        return f'"{KEY_PLACEHOLDER}"' if self.token is None else shlex.quote(self.token)

    def pasted_key(self) -> str:
        """The key to paste into a form field."""
        return self.token if self.token is not None else f"what `{KEY_COMMAND}` prints"


@dataclass(frozen=True)
class Snippet(WireType):
    """One block to copy: where it goes (``title``), its language (sh, toml, json, text), the text."""

    title: str
    language: str
    text: str


@dataclass(frozen=True)
class Integration(WireType):
    """One client: its name, a line on what it is and how it talks to the master, the blocks to
    copy, and what to know about them."""

    client: str
    name: str
    summary: str
    model: str
    snippets: tuple[Snippet, ...]
    notes: tuple[str, ...] = ()


def exports(pairs: list[tuple[str, str]]) -> str:
    """``export NAME=VALUE`` lines; values are shell words already."""
    return "\n".join(f"export {name}={value}" for name, value in pairs)


def key_export(target: Target) -> Snippet:
    return Snippet("shell", "sh", exports([(KEY_ENV, target.shell_key())]))


def claude_code(target: Target) -> Integration:
    model = shlex.quote(target.chosen_model)
    pairs = [
        ("ANTHROPIC_BASE_URL", shlex.quote(target.base_url)),
        ("ANTHROPIC_AUTH_TOKEN", target.shell_key()),
    ]
    aliases = (
        "MODEL",
        "DEFAULT_OPUS_MODEL",
        "DEFAULT_SONNET_MODEL",
        "DEFAULT_HAIKU_MODEL",
        "SMALL_FAST_MODEL",
    )
    pairs += [(f"ANTHROPIC_{alias}", model) for alias in aliases]
    return Integration(
        "claude-code",
        "Claude Code",
        "Anthropic's coding agent, through the Messages API at /v1/messages",
        target.chosen_model,
        (Snippet("shell, then run `claude`", "sh", exports(pairs)),),
        (
            "ANTHROPIC_BASE_URL is the master itself, without /v1: Claude Code adds /v1/messages.",
            "ANTHROPIC_AUTH_TOKEN is sent as a bearer token. The opus, sonnet and haiku variables point "
            "Claude Code's model aliases and its background tasks at the same model "
            "(ANTHROPIC_SMALL_FAST_MODEL is the older name of the haiku one).",
            "Claude Code sends a long system prompt and tool list: the model's context (its own, or "
            "serving.contextLength in cluster.yaml) must hold them.",
        ),
    )


def codex(target: Target) -> Integration:
    config = "\n".join(
        [
            f"model = {json.dumps(target.chosen_model)}",
            'model_provider = "genmlx"',
            "",
            "[model_providers.genmlx]",
            'name = "GenMLX"',
            f"base_url = {json.dumps(target.api_url)}",
            f'env_key = "{KEY_ENV}"',
            'wire_api = "responses"',
        ]
    )
    return Integration(
        "codex",
        "Codex CLI",
        "OpenAI's coding agent, through the Responses API at /v1/responses",
        target.chosen_model,
        (Snippet("~/.codex/config.toml", "toml", config), key_export(target)),
        (
            f"Codex reads the key from ${KEY_ENV} in the shell that runs `codex`.",
            "Codex sends a system prompt of about 20,000 tokens: the model's context must hold it with "
            "room to spare. A model whose own context is smaller, or one served with a small "
            "serving.contextLength, answers context_length_exceeded; raise serving.contextLength for "
            "it in cluster.yaml (the status page does not show a model's context yet).",
        ),
    )


def opencode(target: Target) -> Integration:
    model = target.chosen_model
    models = target.ready_models if model in target.ready_models else (model, *target.ready_models)
    config = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "genmlx": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "GenMLX",
                "options": {"baseURL": target.api_url, "apiKey": f"{{env:{KEY_ENV}}}"},
                "models": {name: {"name": name} for name in models},
            }
        },
        "model": f"genmlx/{model}",
    }
    return Integration(
        "opencode",
        "opencode",
        "a coding agent for the terminal, through Chat Completions at /v1/chat/completions",
        model,
        (
            Snippet(
                "opencode.json (or ~/.config/opencode/opencode.json)", "json", json.dumps(config, indent=2)
            ),
            key_export(target),
        ),
        (
            f"opencode reads the key from ${KEY_ENV} ({{env:{KEY_ENV}}}), so the file holds no secret.",
            "Pick another model of the cluster with /models, as genmlx/NAME.",
        ),
    )


def cline(target: Target) -> Integration:
    fields = "\n".join(
        [
            "API Provider: OpenAI Compatible",
            f"Base URL: {target.api_url}",
            f"API Key: {target.pasted_key()}",
            f"Model ID: {target.chosen_model}",
        ]
    )
    return Integration(
        "cline",
        "Cline",
        "the VS Code coding agent, through Chat Completions at /v1/chat/completions",
        target.chosen_model,
        (Snippet("Cline's settings (the gear icon in its panel)", "text", fields),),
        ("Enter these four fields; VS Code keeps the key in its secret storage.",),
    )


def openwebui(target: Target) -> Integration:
    pairs = [("OPENAI_API_BASE_URL", shlex.quote(target.api_url)), ("OPENAI_API_KEY", target.shell_key())]
    notes = [
        "Open WebUI lists every Ready model of the cluster (GET /v1/models) in its model menu.",
        "It reads these variables on its first start only; later, change the connection in "
        "Admin Settings → Connections → OpenAI API.",
    ]
    if any(host in target.base_url for host in ("//127.0.0.1", "//localhost")):
        notes.append(
            "Open WebUI in Docker cannot reach 127.0.0.1 of this machine: use the master's "
            "network address, or host.docker.internal on the same Mac."
        )
    return Integration(
        "openwebui",
        "Open WebUI",
        "a chat web app for any OpenAI-compatible server, through /v1/chat/completions",
        target.chosen_model,
        (
            Snippet(
                "environment of Open WebUI (`docker run -e ...`, or the shell that starts it)",
                "sh",
                exports(pairs),
            ),
        ),
        tuple(notes),
    )


RENDERERS: dict[str, Callable[[Target], Integration]] = {
    "claude-code": claude_code,
    "codex": codex,
    "opencode": opencode,
    "cline": cline,
    "openwebui": openwebui,
}
CLIENTS = tuple(RENDERERS)


def model_note(target: Target) -> str | None:
    """What to know about the model the snippets name, when it is not a Ready one."""
    if not target.ready_models:
        if target.model:
            return f"No model is Ready yet: {target.model} will answer once it is (`genmlx get models`)."
        return (
            f"No model is Ready yet: replace {MODEL_PLACEHOLDER} with one once it is (`genmlx get models`)."
        )
    if target.model and target.model not in target.ready_models:
        ready = ", ".join(target.ready_models)
        return f"{target.model} is not Ready now (Ready: {ready}); it answers 503 until it is."
    return None


def render_integration(client: str, target: Target) -> Integration:
    """The snippets for ``client`` (one of ``CLIENTS``), with a note first when the model is not Ready."""
    integration = RENDERERS[client](target)
    note = model_note(target)
    if note is None:
        return integration
    return replace(integration, notes=(note, *integration.notes))


def render_all(target: Target) -> tuple[Integration, ...]:
    return tuple(render_integration(client, target) for client in CLIENTS)


def format_integration(integration: Integration) -> str:
    """For a terminal: the title line, each block under the place it goes, then the notes."""
    lines = [f"{integration.name}: {integration.summary} (model {integration.model})"]
    for snippet in integration.snippets:
        lines += ["", f"# {snippet.title}:", snippet.text]
    if integration.notes:
        lines += ["", *(f"note: {note}" for note in integration.notes)]
    return "\n".join(lines)


def format_client_list() -> str:
    """`genmlx integrations` without a client: one line each."""
    target = Target("http://MASTER:6789", ())
    rows = [(client, RENDERERS[client](target)) for client in CLIENTS]
    width = max(len(client) for client, _ in rows)
    lines = [f"  {client.ljust(width)}  {i.name}: {i.summary}" for client, i in rows]
    return "\n".join(["clients (`genmlx integrations CLIENT` prints its configuration):", *lines])
