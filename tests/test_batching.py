"""Continuous batching and the prefix cache, through real dispatcher processes and the real
``openai`` client: requests join a running batch, a long prompt is read in chunks between the
others' tokens, batched and cached answers equal one-at-a-time uncached ones, and
``usage.prompt_tokens_details.cached_tokens`` says how much of a prompt was reused."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import free_port, http_status, wait_until

pytestmark = pytest.mark.e2e  # every test here starts real processes

MODEL = "demo-llama"
HUGE = 900_000  # minutes of tokens: only cancellation ends it (temperature 0 never picks end-of-turn)
SYSTEM = "You are a careful guide to rivers, lakes and the sea. Answer briefly and plainly."
QUESTIONS = ("Where do rivers start?", "Why is the sea salty?", "How deep are lakes?", "What is a delta?")


@pytest.fixture
def serve(spawn, demo_model_dir: Path, token: str):
    """``serve(*flags)``: a ready dispatcher on the demo model; returns an ``openai`` client for it."""

    def start(*flags: str) -> openai.OpenAI:
        port = free_port()
        args = ["-m", "genmlx.dispatcher", "--model", str(demo_model_dir), "--name", MODEL]
        spawn([*args, "--port", str(port), *flags], "dispatcher", env={"GENMLX_API_TOKEN": token})
        base_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(base_url + "/health") == 200, timeout=60, what="model load")
        return openai.OpenAI(base_url=base_url + "/v1", api_key=token, max_retries=0, timeout=60)

    return start


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def ask(client: openai.OpenAI, messages: list[dict], max_tokens: int = 12):
    return client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0
    )


def endless(client: openai.OpenAI):
    return client.completions.create(model=MODEL, prompt="Once", max_tokens=HUGE, temperature=0, stream=True)


def test_a_request_joins_a_running_batch_and_leaves_it_running(serve) -> None:
    client = serve("--max-batch", "4", "--context-length", str(2 * HUGE))
    running = endless(client)
    chunks = iter(running)
    next(chunks), next(chunks)
    # It could only finish by joining the batch: the endless request never leaves it.
    joined = client.completions.create(model=MODEL, prompt="Rivers", max_tokens=8, temperature=0)
    assert joined.usage.completion_tokens == 8
    assert sum(1 for _ in zip(range(5), chunks, strict=False)) == 5  # and the first one goes on
    running.close()


@pytest.mark.parametrize(("chunk", "stepping"), [(16, True), (4096, False)])
def test_a_long_prompt_is_read_a_chunk_per_step_while_the_batch_decodes(
    serve, tokenizer, chunk: int, stepping: bool
) -> None:
    client = serve("--max-batch", "4", "--prefill-chunk", str(chunk), "--context-length", str(2 * HUGE))
    long_prompt = "the river runs to the sea " * 240
    prompt_tokens = len(tokenizer.encode(long_prompt, add_special_tokens=False))
    assert prompt_tokens > 1_200
    running = endless(client)
    arrivals: list[float] = []
    done = threading.Event()

    def read() -> None:  # until told, at its next token: the stream is closed once it has stopped
        for _ in running:
            arrivals.append(time.monotonic())
            if done.is_set():
                return

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: len(arrivals) >= 3, timeout=30, what="the running stream")

    sent = time.monotonic()
    long_request = client.completions.create(
        model=MODEL, prompt=long_prompt, max_tokens=2, temperature=0, stream=True
    )
    first_token = next(c for c in long_request if c.choices and c.choices[0].text) and time.monotonic()
    long_request.close()
    done.set()
    reader.join(30)
    running.close()

    during = [t for t in arrivals if sent <= t <= first_token]
    # The longest the running stream went without a token while the long prompt was under way.
    longest_wait = max(b - a for a, b in itertools.pairwise([sent, *during, first_token]))
    if stepping:  # about one token of the running stream per 16-token chunk of the long prompt
        assert len(during) >= 20, len(during)
        assert longest_wait < 0.5 * (first_token - sent), (longest_wait, first_token - sent)
    else:  # the whole prompt in one step: the running stream waits for it (its tokens before
        # the prompt was admitted come at the stream's own rate, and say nothing of the chunks)
        assert longest_wait >= 0.5 * (first_token - sent), (longest_wait, first_token - sent)


def test_batched_answers_equal_one_at_a_time_uncached_answers(serve) -> None:
    alone = serve("--max-batch", "1", "--prefix-cache-entries", "0")
    expected = [ask(alone, chat(q)).choices[0].message.content for q in QUESTIONS]
    batched = serve("--max-batch", "4")
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        replies = list(pool.map(lambda q: ask(batched, chat(q)), QUESTIONS))
    assert [r.choices[0].message.content for r in replies] == expected
    # Asked again, each prompt comes mostly from the prefix cache, and the answers do not change.
    again = [ask(batched, chat(q)) for q in QUESTIONS]
    assert [r.choices[0].message.content for r in again] == expected
    for reply in again:
        assert reply.usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens - 1


def test_a_shared_system_prompt_and_earlier_turns_come_from_the_prefix_cache(serve, tokenizer) -> None:
    client = serve()
    first = ask(client, chat(QUESTIONS[0]))
    assert first.usage.prompt_tokens_details.cached_tokens == 0

    # Another question under the same system prompt reuses exactly the tokens the prompts share.
    second = ask(client, chat(QUESTIONS[1]))
    shared = common_prefix(
        prompt_ids(tokenizer, chat(QUESTIONS[0])), prompt_ids(tokenizer, chat(QUESTIONS[1]))
    )
    assert shared > len(tokenizer.encode(SYSTEM, add_special_tokens=False))
    assert second.usage.prompt_tokens_details.cached_tokens == shared

    # The next turn of the second conversation reuses all of its earlier prompt.
    turn = [*chat(QUESTIONS[1]), {"role": "assistant", "content": second.choices[0].message.content}]
    turn.append({"role": "user", "content": "And then?"})
    third = ask(client, turn)
    assert third.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens

    off = serve("--prefix-cache-entries", "0")
    uncached = [ask(off, messages) for messages in (chat(QUESTIONS[0]), chat(QUESTIONS[1]), turn)]
    assert all(r.usage.prompt_tokens_details.cached_tokens == 0 for r in uncached)
    assert [r.choices[0].message.content for r in uncached] == [
        r.choices[0].message.content for r in (first, second, third)
    ]


def test_beyond_the_batch_requests_queue_and_beyond_the_queue_get_429_with_retry_after(serve) -> None:
    client = serve("--max-batch", "2", "--max-queue", "1", "--context-length", str(2 * HUGE))
    streams = []
    for _ in range(2):  # one after the other: a second sent while the first still waits finds the queue full
        streams.append(endless(client))
        next(iter(streams[-1]))  # in the batch now
    patient = openai.OpenAI(base_url=str(client.base_url), api_key=client.api_key, max_retries=0, timeout=3)
    outcomes: list[openai.APIError] = []

    def request_behind_them(prompt: str) -> None:
        try:
            patient.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        except (openai.RateLimitError, openai.APITimeoutError) as e:
            outcomes.append(e)

    threads = [threading.Thread(target=request_behind_them, args=(p,)) for p in ("B", "C")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for stream in streams:
        stream.close()
    refused = [e for e in outcomes if isinstance(e, openai.RateLimitError)]
    assert len(refused) == 1 and len(outcomes) == 2  # one waited until its client gave up
    assert int(refused[0].response.headers["retry-after"]) > 0


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
