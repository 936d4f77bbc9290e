"""Fuzzed request bodies on every endpoint of the master, an agent and the dispatchers.

The endpoints come from the applications' own route tables (``test_auth_surface.route_tables``),
so a new endpoint is fuzzed without anyone listing it. Hypothesis sends each one, signed with the
cluster token (so the request gets past authentication to the code that reads bodies), bodies of
every kind: JSON values and objects made of the fields our APIs read with values of any type,
random bytes, invalid UTF-8, JSON nested deeper than Python's parser follows, and bodies at and
beyond the size limits. Every answer must come, be below 500 and, when it is an error, carry the
API's error shape; a body over the limit is refused with 413, in that shape, before it is read.
Afterwards the processes still serve: the demo cluster answers a completion, and a two-rank tensor
group fuzzed through rank 0 still answers with the tokens it gave before (its ranks stayed in
step). Manifests posted to a master (``POST /api/v1/manifest``) are applied whole or refused with
nothing changed, and a dry run of each (what ``genmlx diff`` sends) gives the same verdict and
changes nothing.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import urllib.request

import pytest
import yaml
from agent_harness import Reply, call
from conftest import wait_until
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_auth_surface import route_tables, sample_path
from test_auth_surface import running as running  # a fixture, used by name
from test_cluster import Cluster
from test_fuzz_manifest import TEXT, VALUES, paths
from test_ranks_lockstep import MODEL, client_of
from test_ranks_lockstep import qwen2_model_dir as qwen2_model_dir  # fixtures, used by name
from test_ranks_lockstep import start_ranks as start_ranks
from tornado.web import RequestHandler

from genmlx.core.http import MAX_AGENT_BODY_BYTES, MAX_BODY_BYTES, MAX_HEADER_BYTES

pytestmark = pytest.mark.e2e
EXAMPLES = int(os.environ.get("GENMLX_FUZZ_EXAMPLES", "100"))
FUZZ_TIMEOUT_S = 300 + 2 * EXAMPLES  # a link check through the master takes seconds
FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "max_output_tokens", "stream",
    "tools", "tool_choice", "temperature", "top_p", "n", "stop", "seed", "logprobs", "top_logprobs",
    "response_format", "input", "instructions", "system", "text", "previous_response_id",
    "manifest", "filename", "revision", "dryRun", "source", "storagePath", "peer", "model_name",
    "rank", "worldSize", "launch", "links", "node", "sealed", "keyId",
]  # fmt: skip
DEMO = "genmlx-demo"  # the model ``genmlx demo`` serves


def bodies(model: str) -> st.SearchStrategy[bytes]:
    """Request bodies of every kind; a third are objects naming ``model`` with a short answer, so
    they get past the model lookup into the request's own checks (and some are served)."""
    objects = st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6)
    return st.one_of(
        VALUES.map(lambda value: json.dumps(value).encode()),
        objects.map(lambda fields: json.dumps(fields).encode()),
        objects.map(lambda fields: json.dumps({"model": model, "max_tokens": 4, **fields}).encode()),
        st.binary(max_size=300),
        st.sampled_from([b"", b"\xff\xfe\xfd", b"[" * 100_000, b'{"a":' * 60_000, b'"' + b"x" * 100_000]),
    )


METHODS = ("GET", "POST", "PUT", "DELETE")
LIVE = {("GET", "/api/v1/stream")}  # the page's Server-Sent Events: open until the client leaves


def endpoints(process: str) -> list[tuple[str, str]]:
    """(method, path) of every route of ``process`` for each method its handler answers."""
    found = []
    for pattern, handler in route_tables()[process]:
        path = sample_path(pattern)
        for method in METHODS:
            if getattr(handler, method.lower()) is not getattr(RequestHandler, method.lower()):
                found.append((method, path))
    return sorted(set(found) - LIVE)


def check_answer(reply: Reply, what: str) -> None:
    assert reply.status < 500, (what, reply.status, reply.body[:500])
    if reply.status >= 400 and reply.headers.get("Content-Type", "").startswith("application/json"):
        document = json.loads(reply.body)
        assert isinstance(document.get("error"), dict) and document["error"].get("message"), (
            what,
            reply.body[:500],
        )


def fuzz(base: str, token: str, routes: list[tuple[str, str]], data, model: str = DEMO) -> None:
    method, path = data.draw(st.sampled_from(routes))
    body = data.draw(bodies(model)) if method in ("POST", "PUT") else None
    check_answer(
        call(method, base + path, token, body, {"Content-Type": "application/json"}), f"{method} {path}"
    )


@pytest.mark.timeout(FUZZ_TIMEOUT_S)
@pytest.mark.parametrize("process", ["master", "agent", "dispatcher"])
def test_fuzzed_bodies_on_every_endpoint_get_an_answer_in_the_apis_shape(running, process):
    routes = endpoints(process)
    assert routes, process
    base = f"http://127.0.0.1:{running[process]}"

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def requests(data):
        fuzz(base, running["token"], routes, data)

    requests()
    assert_still_serves(running)


def assert_still_serves(running) -> None:
    url = f"http://127.0.0.1:{running['master']}/v1/completions"
    body = {"model": DEMO, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    reply = call("POST", url, running["token"], body, {"Content-Type": "application/json"})
    assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 4, reply.body


def raw_exchange(port: int, head: str, body: bytes) -> tuple[int, dict]:
    """Send a request's head and the start of its body; the status and JSON of the one reply
    the server sends before it closes the connection (nothing may follow it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head.encode() + b"\r\n")
        for start in range(0, len(body), 16 << 10):  # taken in and dropped: no reset mid-body
            connection.sendall(body[start : start + (16 << 10)])
        received = b""
        while chunk := connection.recv(65536):  # the server closes the connection: no hang
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    header_block, _, payload = rest.partition(b"\r\n\r\n")
    headers = dict(line.decode().lower().split(": ", 1) for line in header_block.split(b"\r\n"))
    assert headers["connection"] == "close" and len(payload) == int(headers["content-length"]), received
    return int(status_line.split()[1]), json.loads(payload)


def anthropic_error(kind: str):
    return lambda error: error["type"] == "error" and error["error"]["type"] == kind


REFUSALS = [  # where a request is sent, and how that API says "too large"
    ("master", "/v1/completions", lambda e: e["error"]["code"] == "request_too_large"),
    ("master", "/v1/messages", anthropic_error("request_too_large")),
    ("master", "/api/v1/manifest", lambda e: e["error"]["type"] == "BodyTooLarge"),
    ("agent", "/api/v1/models", lambda e: e["error"]["type"] == "BodyTooLarge"),
    ("dispatcher", "/v1/chat/completions", lambda e: e["error"]["type"] == "invalid_request_error"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("process", "path", "shaped"), REFUSALS)
def test_a_body_beyond_the_limit_is_refused_in_the_apis_shape_before_it_is_read(
    running, process, path, shaped
):
    limit = MAX_AGENT_BODY_BYTES if process == "agent" else MAX_BODY_BYTES
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    sent = b"x" * min(limit + 1, 4 << 20)  # taken in and dropped while the 413 is read
    status, error = raw_exchange(running[process], head + f"Content-Length: {limit + 1}\r\n", sent)
    assert status == 413 and shaped(error), error
    assert f"limit of {limit >> 20} MiB" in json.dumps(error), error
    within = call(
        "POST",
        f"http://127.0.0.1:{running[process]}{path}",
        running["token"],
        b"{" + b" " * (limit - 2) + b"}",
    )
    assert 400 <= within.status < 500 or within.status == 200, within.status
    assert within.status != 413, "a body at the limit is read"
    assert_still_serves(running)


HEADER_REFUSALS = [  # where a request is sent, and how that API says "headers too large"
    ("master", "/v1/completions", lambda e: e["error"]["code"] == "request_headers_too_large"),
    ("master", "/v1/messages", anthropic_error("invalid_request_error")),
    ("agent", "/api/v1/models", lambda e: e["error"]["type"] == "HeadersTooLarge"),
    ("dispatcher", "/v1/chat/completions", lambda e: e["error"]["type"] == "invalid_request_error"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("process", "path", "shaped"), HEADER_REFUSALS)
def test_headers_beyond_the_limit_are_refused_in_the_apis_shape(running, process, path, shaped):
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {'x' * (MAX_HEADER_BYTES + 1)}\r\n"
    status, error = raw_exchange(running[process], head + "Content-Length: 2\r\n", b"{}")
    assert status == 431 and shaped(error), error
    assert f"limit of {MAX_HEADER_BYTES >> 10} KiB" in json.dumps(error), error
    assert_still_serves(running)


@pytest.mark.timeout(120)
def test_a_chunked_body_is_refused_once_it_grows_past_the_limit(running):
    head = "POST /api/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
    piece = b"x" * (64 << 10)
    chunks = (b"%x\r\n" % len(piece) + piece + b"\r\n") * (4 * MAX_AGENT_BODY_BYTES // len(piece))
    status, error = raw_exchange(running["agent"], head, chunks)
    assert status == 413 and error["error"]["type"] == "BodyTooLarge", error


@pytest.mark.timeout(FUZZ_TIMEOUT_S)
def test_fuzzed_bodies_leave_a_two_rank_group_in_step(start_ranks, qwen2_model_dir, token):
    group = start_ranks(qwen2_model_dir, 2, "--parallelism", "tensor")
    client = client_of(group[0], token)

    def answer() -> str:
        reply = client.completions.create(model=MODEL, prompt="Rivers", max_tokens=8, temperature=0)
        return reply.choices[0].text

    before = answer()
    routes = [(m, p.replace("/x", f"/{MODEL}")) for m, p in endpoints("dispatcher")]
    base = f"http://127.0.0.1:{group[0].port}"

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def requests(data):
        fuzz(base, token, routes, data, MODEL)

    requests()
    assert answer() == before, "the ranks still agree on every step"


class ManifestOnlyMaster(Cluster):
    """A master alone: its node's agent never answers, so an applied manifest changes the desired
    state and nothing else."""

    def __init__(self, root, model_dir):
        super().__init__(root, model_dir, with_agent=False)

    def ready_status(self) -> dict | None:
        try:
            return self.status()
        except OSError:
            return None


@st.composite
def mutated(draw, text: str) -> str:
    data = copy.deepcopy(yaml.safe_load(text))
    path = draw(st.sampled_from(paths(data)[1:]))
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    if draw(st.booleans()) and isinstance(parent, dict):
        parent[draw(TEXT)] = draw(VALUES)
    else:
        parent[path[-1]] = draw(VALUES | st.sampled_from(["renamed", 1, "hf://org/other", ["local"], {}]))
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def applied(master: Cluster) -> dict:
    url = f"{master.url}/api/v1/manifest"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {master.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.timeout(FUZZ_TIMEOUT_S)
def test_fuzzed_manifests_applied_to_a_master_change_it_whole_or_not_at_all(tmp_path, demo_model_dir):
    master = ManifestOnlyMaster(tmp_path, demo_model_dir)
    try:
        wait_until(master.ready_status, 60, what="the master to answer")
        original = master.manifest_text()
        renamed = yaml.safe_load(original)
        renamed["spec"]["models"][0]["name"] = "renamed"
        broken = copy.deepcopy(renamed)
        broken["spec"]["models"][0]["name"] = 1
        outcomes: list[int] = []

        # Random mutations may all be refused (or all applied) in a short run; these make sure
        # both paths are checked every time: unchanged, a real change, and a refused one.
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        @given(mutated(original))
        @example(original)
        @example(yaml.safe_dump(renamed, sort_keys=False))
        @example(yaml.safe_dump(broken, sort_keys=False))
        def apply(text):
            before = applied(master)
            url, body = f"{master.url}/api/v1/manifest", {"manifest": text, "filename": "cluster.yaml"}
            # `genmlx diff` first: the same verdict as the apply below, and nothing changed.
            dry = call("POST", url, master.token, {**body, "dryRun": True})
            check_answer(dry, "POST /api/v1/manifest (dry run)")
            assert applied(master) == before, "a dry run changes nothing"
            reply = call("POST", url, master.token, body)
            check_answer(reply, "POST /api/v1/manifest")
            assert dry.status == reply.status, (dry.body[:300], reply.body[:300])
            outcomes.append(reply.status)
            after = applied(master)
            if reply.status == 200:
                assert after["manifest"] == text, "applied whole"
                assert after["generation"] == before["generation"] + (after["manifest"] != before["manifest"])
                models = {model["name"] for model in yaml.safe_load(text)["spec"]["models"]}
                wait_until(
                    lambda: {m["name"] for m in master.status()["models"]} == models,
                    30,
                    what="the new models",
                )
            else:
                assert reply.status == 422 and reply.json()["error"]["issues"], reply.body[:500]
                assert after == before, "refused: nothing changed"

        apply()
        assert {200, 422} <= set(outcomes), "both kinds were tried"
    finally:
        master.stop()
