"""Client keys through a real master, with the real ``openai`` and ``anthropic`` clients: a key
reaches its own models only (the others do not exist for it), never status, apply, the keys or the
metrics; an expired, unknown or revoked key is refused; a key past its requests per minute gets a
429 with Retry-After; every key's requests and tokens show in the master's /metrics and in
``genmlx key list``; and a key made by ``genmlx key create`` works once its entry is applied."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import anthropic
import openai
import pytest
import test_cluster as harness
import yaml
from agent_harness import call
from conftest import signed, wait_until

from genmlx.core.home import client_key_digest, new_client_key

pytestmark = pytest.mark.e2e

KEYS = {
    name: new_client_key() for name in ("scoped", "everything", "expired", "limited", "revoked", "prometheus")
}
ENTRIES = [
    {"name": "scoped", "models": ["alpha"]},
    {"name": "everything"},
    {"name": "expired", "expires": "2020-01-01"},
    {"name": "limited", "models": ["alpha"], "requestsPerMinute": 2},
    {"name": "revoked"},
    {"name": "prometheus", "models": [], "metrics": True},
]


def keys_text(entries: list[dict]) -> str:
    keyed = [{"name": e["name"], "sha256": client_key_digest(KEYS[e["name"]]), **e} for e in entries]
    return "  auth:\n    apiKeys:\n" + "".join(f"      - {json.dumps(entry)}\n" for entry in keyed)


class KeyedCluster(harness.Cluster):
    """Two models (alpha, beta) of the demo model, and the client keys above."""

    entries = ENTRIES

    def manifest_text(self, max_batch: int = 8) -> str:
        text = super().manifest_text(max_batch)
        return text.replace("  nodes:\n", keys_text(self.entries) + "  nodes:\n", 1)

    def models_text(self, max_batch: int) -> str:
        path = self.storage / harness.MODEL
        if not hasattr(self, "ports"):  # the same ports in every manifest: an apply changes keys only
            self.ports = {name: harness.free_port() for name in ("alpha", "beta")}
        return "".join(
            self.model_entry(name, path, f"maxBatch: {max_batch}, port: {port}")
            for name, port in self.ports.items()
        )

    def apply(self, entries: list[dict]) -> None:
        self.entries = entries
        self.manifest.write_text(self.manifest_text())
        applied = subprocess.run(
            [sys.executable, "-m", "genmlx", "apply", "-f", str(self.manifest)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert applied.returncode == 0, applied.stderr

    def openai(self, key: str) -> openai.OpenAI:
        return self.client(api_key=key)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_model_dir):
    with harness.ready_cluster(tmp_path_factory.mktemp("keys"), demo_model_dir, KeyedCluster) as cluster:
        yield cluster


def ask(client: openai.OpenAI, model: str) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def test_a_key_reaches_its_own_models_only(cluster: KeyedCluster) -> None:
    scoped = cluster.openai(KEYS["scoped"])
    assert [m.id for m in scoped.models.list().data] == ["alpha"]
    assert ask(scoped, "alpha").usage.completion_tokens == 3
    with pytest.raises(openai.NotFoundError) as hidden:
        ask(scoped, "beta")
    assert hidden.value.body["message"] == "The model 'beta' does not exist (models: alpha)."
    with pytest.raises(openai.NotFoundError):
        scoped.models.retrieve("beta")
    assert sorted(m.id for m in cluster.openai(KEYS["everything"]).models.list().data) == ["alpha", "beta"]
    assert ask(cluster.openai(KEYS["everything"]), "beta").choices[0].message.content is not None
    claude = anthropic.Anthropic(base_url=cluster.url, api_key=KEYS["scoped"], max_retries=0)
    message = claude.messages.create(
        model="alpha", max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
    )
    assert message.usage.output_tokens == 3
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="beta", max_tokens=3, messages=[{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("path", ["/api/v1/status", "/api/v1/events", "/api/v1/keys", "/metrics"])
def test_a_key_never_reads_status_keys_or_metrics(cluster: KeyedCluster, path: str) -> None:
    reply = call("GET", f"{cluster.url}{path}", None, headers=as_key(KEYS["everything"]))
    message = reply.json()["error"]["message"]
    assert reply.status == 403 and (
        "reaches the models only" in message or "does not read /metrics" in message
    )


def test_a_metrics_key_reads_metrics_and_nothing_else(cluster: KeyedCluster) -> None:
    """What a Prometheus server is given instead of the cluster token."""
    metrics = call("GET", f"{cluster.url}/metrics", None, headers=as_key(KEYS["prometheus"]))
    assert metrics.status == 200 and b"genmlx_node_cpu_percent" in metrics.body
    for path in ("/api/v1/status", "/api/v1/keys", "/api/v1/telemetry"):
        refused = call("GET", f"{cluster.url}{path}", None, headers=as_key(KEYS["prometheus"]))
        assert refused.status == 403, path
    assert cluster.openai(KEYS["prometheus"]).models.list().data == [], "models: [] reaches none"
    with pytest.raises(openai.NotFoundError):
        ask(cluster.openai(KEYS["prometheus"]), "alpha")
    plain = call("GET", f"{cluster.url}/metrics", None, headers=as_key(KEYS["everything"]))
    assert "`metrics: true`" in plain.json()["error"]["message"]


def test_a_key_never_applies(cluster: KeyedCluster) -> None:
    body = {"manifest": cluster.manifest.read_text(), "filename": "x.yaml"}
    reply = call("POST", f"{cluster.url}/api/v1/manifest", None, body, as_key(KEYS["everything"]))
    assert reply.status == 403


def test_a_key_reaches_no_dispatcher_directly(cluster: KeyedCluster) -> None:
    endpoint = next(m["endpoint"] for m in cluster.status()["models"] if m["name"] == "alpha")
    with pytest.raises(openai.AuthenticationError):
        ask(cluster.client(base=endpoint, api_key=KEYS["everything"]), "alpha")


def test_expired_and_unknown_keys_are_refused(cluster: KeyedCluster) -> None:
    with pytest.raises(openai.AuthenticationError) as expired:
        ask(cluster.openai(KEYS["expired"]), "alpha")
    assert "expired at 2020-01-01T00:00:00Z" in expired.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        ask(cluster.openai(new_client_key()), "alpha")


def test_a_key_past_its_requests_per_minute_gets_429_with_retry_after(cluster: KeyedCluster) -> None:
    limited = cluster.openai(KEYS["limited"])
    ask(limited, "alpha"), ask(limited, "alpha")
    with pytest.raises(openai.RateLimitError) as refused:
        ask(limited, "alpha")
    assert 1 <= int(refused.value.response.headers["Retry-After"]) <= 60
    assert refused.value.body["code"] == "rate_limit_exceeded"


def test_each_keys_requests_and_tokens_show_in_metrics_and_key_list(cluster: KeyedCluster) -> None:
    everything = cluster.openai(KEYS["everything"])
    before = key_list(cluster)["everything"]
    reply = ask(everything, "alpha")
    stream = everything.chat.completions.create(
        model="beta",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    after = key_list(cluster)["everything"]
    assert after["requests"] == before["requests"] + 2
    assert after["completionTokens"] == before["completionTokens"] + 3 + 4
    assert (
        after["promptTokens"] == before["promptTokens"] + reply.usage.prompt_tokens + streamed.prompt_tokens
    )
    assert after["lastUsed"] is not None and after["models"] is None
    url = f"{cluster.url}/metrics"
    with urllib.request.urlopen(
        urllib.request.Request(url, headers=signed(cluster.token, "GET", url))
    ) as got:
        metrics = got.read().decode()
    assert f'genmlx_client_requests_total{{key="everything"}} {float(after["requests"])}' in metrics
    completion = (
        f'genmlx_client_tokens_total{{key="everything",kind="completion"}} {float(after["completionTokens"])}'
    )
    assert completion in metrics
    assert 'genmlx_client_rate_limited_total{key="limited"}' in metrics
    assert KEYS["everything"] not in metrics and client_key_digest(KEYS["everything"]) not in metrics


def key_list(cluster: KeyedCluster) -> dict[str, dict]:
    listed = subprocess.run(
        [sys.executable, "-m", "genmlx", "key", "list", "-f", str(cluster.manifest), "-o", "json"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    return {key["name"]: key for key in json.loads(listed.stdout)}


def test_a_created_key_works_once_applied_and_a_removed_one_is_revoked(
    cluster: KeyedCluster, tmp_path: Path
) -> None:
    revoked = cluster.openai(KEYS["revoked"])
    assert ask(revoked, "beta")
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "genmlx",
            "key",
            "create",
            "newcomer",
            "--models",
            "beta",
            "--expires",
            "30d",
            "-f",
            str(cluster.manifest),
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    key = next(line.strip() for line in created.stdout.splitlines() if line.strip().startswith("gmx_"))
    (entry,) = yaml.safe_load(created.stdout.split("`genmlx apply`:\n", 1)[1])
    assert entry["sha256"] == client_key_digest(key) and entry["models"] == ["beta"]
    KEYS["newcomer"] = key
    cluster.apply(
        [e for e in ENTRIES if e["name"] != "revoked"] + [{k: v for k, v in entry.items() if k != "sha256"}]
    )
    wait_until(
        lambda: key_list(cluster).keys() == {e["name"] for e in ENTRIES} - {"revoked"} | {"newcomer"},
        timeout=30,
        what="the new keys to be applied",
    )
    with pytest.raises(openai.AuthenticationError):
        ask(revoked, "beta")
    newcomer = cluster.openai(key)
    assert [m.id for m in newcomer.models.list().data] == ["beta"]
    assert ask(newcomer, "beta").usage.completion_tokens == 3


def test_integrations_write_a_client_key_and_only_the_models_it_reaches(cluster: KeyedCluster) -> None:
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "genmlx",
            "integrations",
            "opencode",
            "--key",
            KEYS["scoped"],
            "-f",
            str(cluster.manifest),
            "-o",
            "json",
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    assert KEYS["scoped"] in printed.stdout and cluster.token not in printed.stdout
    assert '\\"alpha\\"' in printed.stdout or '"alpha"' in printed.stdout
    assert "beta" not in printed.stdout


def test_key_create_metrics_makes_an_entry_that_reads_metrics_and_with_no_models_reaches_none() -> None:
    import argparse

    from genmlx.cli.keys import key_entry
    from genmlx.manifest.build import build_api_key

    def entry(**given) -> dict:
        defaults = {
            "name": "prom",
            "models": None,
            "expires": None,
            "requests_per_minute": None,
            "metrics": False,
        }
        return key_entry(argparse.Namespace(**{**defaults, **given}))

    assert entry(metrics=True, models="") == {"name": "prom", "models": [], "metrics": True}
    assert entry(metrics=True) == {"name": "prom", "metrics": True}, "every model, and the metrics"
    assert entry(models="") == {"name": "prom"}, "without --metrics, '' is no restriction, as before"
    key = build_api_key({**entry(metrics=True, models=""), "sha256": "0" * 64})
    assert key.metrics and not key.reaches("alpha")
