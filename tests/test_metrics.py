"""``/metrics`` of a real dispatcher process, read with prometheus_client's own parser after real
``openai`` client traffic: vLLM's names, counters equal to the usage clients saw."""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import free_port, http_status, wait_until
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

pytestmark = pytest.mark.e2e  # every test here starts real processes

MODEL = "demo-llama"
HUGE = 900_000  # minutes of tokens: only cancellation ends it (temperature 0 never picks end-of-turn)
CHAT = [{"role": "user", "content": "Tell me about rivers."}]
HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds")
COUNTERS = ("prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits")
STEP_COUNTERS = ("engine_steps", "engine_step_seconds", "engine_step_tokens")


class Scrape:
    """One parsed scrape: every sample by name, each checked to carry our ``model_name``."""

    def __init__(self, text: str):
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples: dict[str, Sample] = {}
        for family in self.families.values():
            for sample in family.samples:
                assert sample.labels.get("model_name") == MODEL, sample
                if sample.name.endswith("_bucket"):
                    continue
                self.samples[sample.name] = sample

    def value(self, name: str) -> float:
        return self.samples[f"vllm:{name}"].value

    def ours(self, name: str) -> float:
        return self.samples[f"genmlx:{name}"].value

    def buckets(self, histogram: str) -> list[tuple[str, float]]:
        family = self.families[f"vllm:{histogram}"]
        return [(s.labels["le"], s.value) for s in family.samples if s.name.endswith("_bucket")]


@pytest.fixture
def served(spawn, demo_model_dir: Path, token: str) -> str:
    """The base URL of a ready dispatcher on the demo model, started with the API token."""
    port = free_port()
    args = ["-m", "genmlx.dispatcher", "--model", str(demo_model_dir), "--name", MODEL, "--port", str(port)]
    args += ["--context-length", str(2 * HUGE)]  # room for the endless request
    args += ["--max-batch", "1"]  # a second request waits while one runs
    spawn(args, "dispatcher", env={"GENMLX_API_TOKEN": token})
    base_url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_status(base_url + "/health") == 200, timeout=60, what="model load")
    return base_url


def scrape(base_url: str, token: str) -> Scrape:
    request = urllib.request.Request(base_url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        return Scrape(response.read().decode())


def client(base_url: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=token, max_retries=0)


def test_metrics_need_the_token_and_start_at_zero(served: str, token: str):
    assert http_status(served + "/metrics") == 401
    assert http_status(served + "/metrics", token="wrong") == 401
    first = scrape(served, token)
    for name in ("num_requests_running", "num_requests_waiting"):
        assert first.families[f"vllm:{name}"].type == "gauge"
        assert first.value(name) == 0
    for name in COUNTERS:
        assert first.families[f"vllm:{name}"].type == "counter"
        assert first.value(f"{name}_total") == 0
    for name in HISTOGRAMS:
        assert first.families[f"vllm:{name}"].type == "histogram"
        assert first.value(f"{name}_count") == 0
    assert first.families["vllm:e2e_request_latency_seconds"].documentation
    for name in STEP_COUNTERS:
        assert first.families[f"genmlx:{name}"].type == "counter"
        assert first.ours(f"{name}_total") == 0
    # vLLM's boundaries, so dashboards' quantiles mean the same.
    assert [le for le, _ in first.buckets("inter_token_latency_seconds")][:3] == ["0.01", "0.025", "0.05"]


def test_counters_and_histograms_match_what_clients_saw(served: str, token: str):
    api = client(served, token)
    seen = []
    chat = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=7, temperature=0)
    seen.append(chat.usage)
    streamed = api.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    seen.extend(chunk.usage for chunk in streamed if chunk.usage is not None)
    text = api.completions.create(model=MODEL, prompt="Rivers", max_tokens=1, temperature=0)
    seen.append(text.usage)
    again = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, temperature=0)
    seen.append(again.usage)
    assert len(seen) == 4
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1

    after = scrape(served, token)
    assert after.value("prompt_tokens_total") == sum(u.prompt_tokens for u in seen)
    assert after.value("generation_tokens_total") == sum(u.completion_tokens for u in seen)
    assert after.value("prefix_cache_queries_total") == after.value("prompt_tokens_total")
    assert after.value("prefix_cache_hits_total") == sum(u.prompt_tokens_details.cached_tokens for u in seen)
    assert after.value("prefix_cache_hits_total") >= again.usage.prompt_tokens - 1
    assert after.value("time_to_first_token_seconds_count") == 4
    assert after.value("e2e_request_latency_seconds_count") == 4
    # Gaps between text events: at most one per token after the first, and some for 7 and 9 tokens.
    gaps = after.value("inter_token_latency_seconds_count")
    assert 1 <= gaps <= sum(u.completion_tokens - 1 for u in seen)
    e2e = after.value("e2e_request_latency_seconds_sum")
    assert 0 < after.value("time_to_first_token_seconds_sum") < e2e
    assert after.value("inter_token_latency_seconds_sum") < e2e
    assert after.buckets("e2e_request_latency_seconds")[-1] == ("+Inf", 4)
    assert after.value("num_requests_running") == after.value("num_requests_waiting") == 0
    # The model thread's steps: every generated token was decoded in one, a step at a time.
    assert after.ours("engine_step_tokens_total") == after.value("generation_tokens_total")
    # One request at a time (--max-batch 1): a step decodes one token at most.
    assert sum(u.completion_tokens for u in seen) <= after.ours("engine_steps_total")
    assert after.ours("engine_steps_total") <= sum(u.completion_tokens + u.prompt_tokens for u in seen)
    assert 0 < after.ours("engine_step_seconds_total") < e2e


def test_gauges_follow_a_running_and_a_waiting_request_and_count_a_cancelled_one(served: str, token: str):
    api = client(served, token)
    endless = api.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=HUGE, temperature=0, stream=True
    )
    chunks = iter(endless)
    received = sum(1 for _ in zip(range(5), chunks, strict=False))
    behind: list = []
    waiter = threading.Thread(
        target=lambda: behind.append(api.completions.create(model=MODEL, prompt="Hi", max_tokens=4))
    )
    waiter.start()
    busy = wait_until(
        lambda: (s := scrape(served, token)).value("num_requests_waiting") == 1 and s,
        timeout=10,
        what="the second request to wait",
    )
    assert busy.value("num_requests_running") == 1
    # Tokens count as they are generated, not when the request ends: a rate follows a long stream.
    counted = busy.value("generation_tokens_total")
    assert counted >= received - 1, (counted, received)
    received += sum(1 for _ in zip(range(20), chunks, strict=False))
    wait_until(
        lambda: scrape(served, token).value("generation_tokens_total") >= counted + 20,
        timeout=10,
        what="the generation counter to grow while the stream runs",
    )
    endless.close()  # the client leaves; the waiting request then runs
    waiter.join(60)
    assert len(behind) == 1

    def settled() -> Scrape | None:
        s = scrape(served, token)
        return s if s.value("e2e_request_latency_seconds_count") == 2 else None

    done = wait_until(settled, timeout=10, what="the cancelled request to be counted")
    assert done.value("num_requests_running") == done.value("num_requests_waiting") == 0
    # The cancelled request's tokens count too: at least one per content chunk it streamed.
    assert done.value("generation_tokens_total") >= behind[0].usage.completion_tokens + received - 1
