"""The one-rank dispatcher as a real process, driven through HTTP and the real ``openai`` client."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil
import pytest
from conftest import Proc, free_port, http_status, wait_until
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from genmlx.dispatcher.engine.stop_strings import StopStringMatcher

MODEL = "demo-llama"
# Tokens: minutes of generation, so only cancellation can free the model thread. Requests for this
# many use temperature 0: the demo model never chooses end-of-turn greedily, but may when sampling.
HUGE = 900_000
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about rivers."}]


@dataclass(frozen=True)
class Dispatcher:
    proc: Proc
    base_url: str

    def get(self, path: str, token: str | None = None) -> tuple[int, dict]:
        return self.request("GET", path, None, token)

    def request(self, method: str, path: str, body: bytes | None, token: str | None) -> tuple[int, dict]:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture
def start_dispatcher(spawn, demo_model_dir: Path, token: str):
    """Start a dispatcher on the demo model with GENMLX_API_TOKEN set; returns at once."""

    def start(*extra: str) -> Dispatcher:
        port = free_port()
        args = ["-m", "genmlx.dispatcher", "--model", str(demo_model_dir), "--name", MODEL]
        proc = spawn([*args, "--port", str(port), *extra], "dispatcher", env={"GENMLX_API_TOKEN": token})
        return Dispatcher(proc, f"http://127.0.0.1:{port}")

    return start


@pytest.fixture
def ready_dispatcher(start_dispatcher):
    """Start a dispatcher and wait (bounded) until it serves."""

    def start(*extra: str) -> Dispatcher:
        dispatcher = start_dispatcher(*extra)
        wait_until(lambda: http_status(dispatcher.base_url + "/health") == 200, timeout=60, what="model load")
        return dispatcher

    return start


@pytest.fixture
def dispatcher(ready_dispatcher) -> Dispatcher:
    return ready_dispatcher()


def client_for(dispatcher: Dispatcher, api_key: str, timeout: float = 30.0) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=dispatcher.base_url + "/v1", api_key=api_key, max_retries=0, timeout=timeout
    )


@pytest.fixture
def client(dispatcher: Dispatcher, token: str) -> openai.OpenAI:
    return client_for(dispatcher, token)


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


def stream_chat(client: openai.OpenAI, **kwargs) -> list[ChatCompletionChunk]:
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True, **kwargs))
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    return chunks


def endless_chat_stream(client: openai.OpenAI):
    return client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=HUGE, temperature=0, stream=True
    )


def chunk_text(chunks: list) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# --- lifecycle ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_health_is_503_while_loading_then_200(start_dispatcher, token: str) -> None:
    # The demo model loads in well under a second: a dispatcher whose first answer comes after
    # its model is in proves nothing either way, so up to three are started to see the 503.
    for _ in range(3):
        dispatcher = start_dispatcher()
        seen = health_until_ready(dispatcher, token)
        assert seen[-1] == (200, {"status": "ok", "model": MODEL})
        if seen[0][0] == 503:
            break
        dispatcher.proc.stop()
    assert seen[0] == (503, {"status": "loading"}), "HTTP must be up before the model is"
    assert {status for status, _ in seen} == {200, 503}
    # A health poll is logged only when it is not a 200: a loading model, not every poll.
    dispatcher.get("/v1/models", token)
    wait_until(lambda: _access_line(dispatcher, "GET /v1/models 200"), timeout=10, what="log line")
    assert _access_line(dispatcher, "GET /health 503")
    assert _access_line(dispatcher, "GET /health 200") is None


def health_until_ready(dispatcher: Dispatcher, token: str) -> list[tuple[int, dict]]:
    """Every answer of ``/health`` from the first until the first 200; while it says loading,
    generation is refused in OpenAI's shape (unless the model got there in between)."""
    seen: list[tuple[int, dict]] = []

    def healthy() -> bool:
        try:
            seen.append(dispatcher.get("/health"))
        except (urllib.error.URLError, ConnectionError):
            return False  # not listening yet
        return seen[-1][0] == 200

    wait_until(lambda: healthy() or seen, timeout=60, interval=0.02, what="HTTP up")
    if seen[-1][0] == 503:
        body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
        status, answer = dispatcher.request("POST", "/v1/completions", body, token)
        assert status == 503 and answer["error"]["code"] == "model_loading" or status == 200, answer
    wait_until(healthy, timeout=60, interval=0.02, what="health 200")
    return seen


@pytest.mark.e2e
def test_sigterm_mid_generation_exits_zero_promptly(ready_dispatcher, token: str) -> None:
    dispatcher = ready_dispatcher("--context-length", str(2 * HUGE))
    client = client_for(dispatcher, token)
    stream = endless_chat_stream(client)
    chunks = iter(stream)
    next(chunks), next(chunks)  # the role, then generated text
    stopped_at = time.monotonic()
    dispatcher.proc.signal(signal.SIGTERM)
    assert dispatcher.proc.popen.wait(timeout=15) == 0
    assert time.monotonic() - stopped_at < 10
    assert "shutting down" in dispatcher.proc.output()
    stream.close()


@pytest.mark.e2e
def test_multi_rank_and_bad_rank_are_refused_at_start(demo_model_dir: Path) -> None:
    base = [sys.executable, "-m", "genmlx.dispatcher", "--model", str(demo_model_dir), "--name", MODEL]
    base += ["--port", str(free_port())]
    two_ranks = subprocess.run([*base, "--world-size", "2"], capture_output=True, text=True, timeout=60)
    assert two_ranks.returncode == 2
    assert "--world-size 2 needs --hostfile" in two_ranks.stderr
    bad_rank = subprocess.run([*base, "--rank", "1"], capture_output=True, text=True, timeout=60)
    assert bad_rank.returncode == 2
    assert "--rank must be in [0, 0]" in bad_rank.stderr


@pytest.mark.e2e
def test_a_model_that_cannot_load_exits_1_saying_why(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    args = [sys.executable, "-m", "genmlx.dispatcher", "--model", str(missing), "--name", MODEL]
    done = subprocess.run([*args, "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"cannot serve {MODEL}" in done.stdout and "no config.json" in done.stdout


@pytest.mark.e2e
def test_exits_when_its_parent_is_gone(spawn, demo_model_dir: Path) -> None:
    port = free_port()
    # A stand-in agent: starts the dispatcher with --parent-pid set to itself, then sleeps.
    agent_code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-m', 'genmlx.dispatcher', '--model', sys.argv[1],"
        " '--name', 'demo', '--port', sys.argv[2], '--parent-pid', str(os.getpid())])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    agent = spawn(["-c", agent_code, str(demo_model_dir), str(port)], "agent")
    line = wait_until(lambda: next((s for s in agent.output().splitlines() if s.startswith("child ")), None))
    child = psutil.Process(int(line.split()[1]))
    wait_until(lambda: http_status(f"http://127.0.0.1:{port}/health") == 200, timeout=60, what="model load")
    agent.popen.kill()
    agent.popen.wait()
    wait_until(lambda: not _running(child), timeout=20, what="the orphaned dispatcher to exit")


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- auth and models -----------------------------------------------------------------------------


@pytest.mark.e2e
def test_models_list_and_bearer_token(dispatcher: Dispatcher, client: openai.OpenAI, token: str) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "genmlx"

    with pytest.raises(openai.AuthenticationError) as wrong:
        client_for(dispatcher, "not-the-token").models.list()
    assert wrong.value.status_code == 401
    assert wrong.value.code == "invalid_api_key"
    status, body = dispatcher.get("/v1/models")  # no Authorization header at all
    assert status == 401
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, _ = dispatcher.request("POST", "/v1/chat/completions", b"{}", None)
    assert status == 401
    assert dispatcher.get("/health")[0] == 200  # health needs no token

    assert token not in dispatcher.proc.output()


# --- chat and text completions ---------------------------------------------------------------------


@pytest.mark.e2e
def test_chat_completion_shape_and_usage(client: openai.OpenAI, tokenizer) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, max_tokens=16, temperature=0
    )
    completion = ChatCompletion.model_validate(raw.http_response.json())
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    expected_prompt_tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert completion.usage.prompt_tokens == expected_prompt_tokens
    assert completion.usage.completion_tokens == 16
    assert completion.usage.total_tokens == expected_prompt_tokens + 16

    # max_completion_tokens wins over max_tokens; content may be a list of text parts.
    parts = [
        CHAT[0],
        {
            "role": "user",
            "content": [{"type": "text", "text": "Tell me about "}, {"type": "text", "text": "rivers."}],
        },
    ]
    again = client.chat.completions.create(
        model=MODEL, messages=parts, max_tokens=50, max_completion_tokens=16, temperature=0
    )
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.total_tokens == completion.usage.total_tokens
    # The same prompt again: all of it but the last token comes from the prefix cache.
    assert again.usage.prompt_tokens_details.cached_tokens == expected_prompt_tokens - 1


@pytest.mark.e2e
def test_chat_stream_matches_the_whole_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)

    chunks = stream_chat(client, max_tokens=24, temperature=0)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunk_text(chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.usage is None for c in chunks)  # no usage unless asked for
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")

    with_usage = stream_chat(client, max_tokens=24, temperature=0, stream_options={"include_usage": True})
    *body, last = with_usage
    assert last.choices == []
    assert last.usage.completion_tokens == 24
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert body[-1].choices[0].finish_reason == "length"
    assert chunk_text(body) == whole.choices[0].message.content


@pytest.mark.e2e
def test_text_completions_streamed_and_not(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0
    )
    completion = Completion.model_validate(raw.http_response.json())
    assert completion.id.startswith("cmpl-")
    assert completion.object == "text_completion"
    [choice] = completion.choices
    assert choice.text and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 20

    stream = client.completions.create(
        model=MODEL,
        prompt=["Once upon a time"],
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    # OpenAI itself sends finish_reason null mid-stream, which the Completion type (reused by the
    # client for chunks) does not admit; the closing chunks must validate.
    for chunk in chunks[-2:]:
        Completion.model_validate(chunk.model_dump())
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == completion.usage.total_tokens
    assert chunks[-2].choices[0].finish_reason == "length"


@pytest.mark.e2e
def test_stop_strings_cut_the_text_where_they_begin(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="The river", max_tokens=40, temperature=0)
    text = free.choices[0].text
    assert free.choices[0].finish_reason == "length" and len(text) > 20
    stop = text[12:17]  # a few characters from the middle, likely spanning a token boundary
    expected = text[: text.index(stop)]

    stopped = client.completions.create(
        model=MODEL, prompt="The river", max_tokens=40, temperature=0, stop=["never-in-noise", stop]
    )
    assert stopped.choices[0].text == expected
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 40

    stream = client.completions.create(
        model=MODEL, prompt="The river", max_tokens=40, temperature=0, stop=stop, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("stop", "pieces", "released", "stopped"),
    [
        # Only a suffix that could still begin a stop string waits; the stop string is never sent.
        (("END",), ["abc", "xE", "N", "D tail"], ["abc", "x", "", ""], True),
        (("END",), ["abE", "Nx", "!"], ["ab", "ENx", "!", ""], False),
        (("END", "ND!"), ["aEN", "D!"], ["a", ""], True),
        (("ND!", "END"), ["aN", "D!"], ["a", ""], True),
        (("\n\n",), ["one\n", "\ntwo"], ["one", ""], True),
        (("xyz",), ["xy"], ["", "xy"], False),  # held at the end, released by flush
        ((), ["a", "b"], ["a", "b", ""], False),
    ],
)
def test_stop_string_matcher_holds_back_only_possible_starts(
    stop: tuple[str, ...], pieces: list[str], released: list[str], stopped: bool
) -> None:
    """Pure logic, so tested directly: what each piece of streamed text releases."""
    matcher = StopStringMatcher(stop)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            break
    if not matcher.stopped:
        out.append(matcher.flush())
    assert out == released  # one entry per feed, then the flush when nothing stopped
    assert matcher.stopped is stopped


@pytest.mark.e2e
def test_same_seed_same_sample(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=24, temperature=1.0, top_p=0.95, seed=seed
        )
        return reply.choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert len({first, *(sample(seed) for seed in (1, 2, 3))}) > 1, "the seed must change what is sampled"


# --- errors --------------------------------------------------------------------------------------


# Checked against one dispatcher in one test: a process per case would triple this file's run time.
BAD_REQUESTS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 2}, "n"),
    ({"seed": 1.5}, "seed"),
    ({"messages": []}, "messages"),
    ({"extra_body": {"stop": 7}}, "stop"),
    ({"extra_body": {"stream": "yes"}}, "stream"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"max_tokens": 5000}, "max_tokens"),  # beyond the demo model's 2048-token context
]


@pytest.mark.e2e
def test_bad_requests_are_400_naming_the_field(client: openai.OpenAI) -> None:
    for arguments, param in BAD_REQUESTS:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**{"model": MODEL, "messages": CHAT, **arguments})
        error = caught.value
        assert (error.status_code, error.param) == (400, param), arguments
        assert error.type == "invalid_request_error", arguments
        assert error.message, arguments


@pytest.mark.e2e
def test_unknown_model_is_404_and_malformed_json_is_400(
    client: openai.OpenAI, dispatcher: Dispatcher, token: str
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"

    status, body = dispatcher.request("POST", "/v1/chat/completions", b'{"messages": [', token)
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "JSON" in body["error"]["message"]

    no_prompt = json.dumps({"model": MODEL, "max_tokens": 3}).encode()
    status, body = dispatcher.request("POST", "/v1/completions", no_prompt, token)
    assert (status, body["error"]["param"]) == (400, "prompt")

    # A request must name the model, as OpenAI's API and the master's router require.
    for path, fields in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT})):
        for model in ({}, {"model": None}, {"model": 7}, {"model": ""}):
            status, body = dispatcher.request("POST", path, json.dumps({**fields, **model}).encode(), token)
            assert status == 400, (path, model)
            assert (body["error"]["type"], body["error"]["param"]) == ("invalid_request_error", "model")
            assert "names no model" in body["error"]["message"]

    status, body = dispatcher.get("/v1/nowhere", token)
    assert status == 404 and body["error"]["code"] == "unknown_url"


@pytest.mark.e2e
def test_a_context_error_says_where_the_limit_comes_from(
    client: openai.OpenAI, ready_dispatcher, token: str
) -> None:
    # The demo model's own max_position_embeddings (2048), no --context-length given.
    with pytest.raises(openai.BadRequestError) as own:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5000)
    assert (own.value.code, own.value.param) == ("context_length_exceeded", "max_tokens")
    assert "context length is 2048 tokens, the model's own limit" in own.value.message
    assert "serving.contextLength" in own.value.message

    # serving.contextLength in the manifest reaches the rank as --context-length.
    limited = client_for(ready_dispatcher("--context-length", "64"), token)
    with pytest.raises(openai.BadRequestError) as set_one:
        limited.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=60)
    assert set_one.value.code == "context_length_exceeded"
    assert "context length of 64 tokens, set by serving.contextLength" in set_one.value.message
    with pytest.raises(openai.BadRequestError) as prompt_alone:
        limited.completions.create(model=MODEL, prompt="river " * 100, max_tokens=1)
    assert prompt_alone.value.param == "prompt"
    assert "set by serving.contextLength" in prompt_alone.value.message


# --- cancellation and back-pressure --------------------------------------------------------------


@pytest.mark.e2e
def test_a_client_leaving_mid_stream_cancels_its_generation(ready_dispatcher, token: str) -> None:
    dispatcher = ready_dispatcher("--context-length", str(2 * HUGE))
    client = client_for(dispatcher, token)
    stream = endless_chat_stream(client)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()

    quick = client_for(dispatcher, token, timeout=10.0)
    reply = quick.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert reply.usage.completion_tokens == 4

    log = wait_until(lambda: _access_line(dispatcher, "finish=cancelled"), timeout=10, what="log line")
    assert " 499 " in log
    assert int(log.split("completion_tokens=")[1].split()[0]) < HUGE


@pytest.mark.e2e
def test_a_client_giving_up_on_a_plain_request_cancels_it(ready_dispatcher, token: str) -> None:
    dispatcher = ready_dispatcher("--context-length", str(2 * HUGE))
    impatient = client_for(dispatcher, token, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt="Once", max_tokens=HUGE, temperature=0)

    reply = client_for(dispatcher, token, timeout=10.0).completions.create(
        model=MODEL, prompt="Once", max_tokens=4
    )
    assert reply.usage.completion_tokens == 4
    wait_until(lambda: _access_line(dispatcher, "finish=cancelled"), timeout=10, what="log line")


@pytest.mark.e2e
def test_a_full_queue_answers_429(ready_dispatcher, token: str) -> None:
    dispatcher = ready_dispatcher("--context-length", str(2 * HUGE), "--max-batch", "1", "--max-queue", "1")
    client = client_for(dispatcher, token, timeout=2.0)
    running = client.completions.create(model=MODEL, prompt="A", max_tokens=HUGE, temperature=0, stream=True)
    next(iter(running))  # the model thread is busy with this one from now on
    outcomes: list[type[Exception]] = []

    def request_behind_it(prompt: str) -> None:
        try:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        except (openai.RateLimitError, openai.APITimeoutError) as e:
            outcomes.append(type(e))

    # With room for one waiting request, whichever arrives second is refused; the other waits
    # behind the endless one until its client gives up.
    threads = [threading.Thread(target=request_behind_it, args=(p,)) for p in ("B", "C")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    running.close()
    assert sorted(outcomes, key=lambda t: t.__name__) == [openai.APITimeoutError, openai.RateLimitError]


def _access_line(dispatcher: Dispatcher, needle: str) -> str | None:
    lines = dispatcher.proc.output().splitlines()
    return next((line for line in lines if "genmlx.dispatcher.access" in line and needle in line), None)
