"""A client that hangs up while its long prompt is still being read stops that reading at once,
through the master as well as directly: rank 0 cancels the request at its next step instead of
reading the whole prompt first (while other requests, the master's canaries among them, wait)."""

from __future__ import annotations

import json
import random
import re
import socket
import time

import pytest
import test_cluster as harness
from conftest import wait_until

pytestmark = pytest.mark.e2e
PROMPT_WORDS = 12_000  # several seconds of prompt reading for the demo model on a CPU


class LongContextCluster(harness.Cluster):
    def models_text(self, max_batch: int) -> str:
        serving = f"maxBatch: {max_batch}, port: {self.serving_port}, contextLength: 65536"
        return self.model_entry(harness.MODEL, self.storage / harness.MODEL, serving)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_model_dir):
    with harness.ready_cluster(
        tmp_path_factory.mktemp("disconnect"), demo_model_dir, LongContextCluster
    ) as cluster:
        yield cluster


def long_prompt(seed: int) -> str:
    words = ["bay", "oil", "good", "write", "back", "town", "large", "solid", "clear", "draw"]
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(PROMPT_WORDS))


def post_and_hang_up(port: int, token: str, body: dict, after_s: float) -> None:
    """Send a request over a raw socket and close it after ``after_s``, as a client that leaves."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        sock.sendall(head.encode() + data)
        time.sleep(after_s)


def logged_seconds(cluster, marker: str) -> float:
    """How long rank 0 spent on the one request whose log line has ``marker``."""

    def line() -> str | None:
        log = cluster.agent_api("/api/v1/ranks/demo/0/log")
        return next((row for row in reversed(log.splitlines()) if marker in row), None)

    found = wait_until(line, 120, what=f"rank 0 to log a request with {marker}")
    return float(re.search(r" ([0-9.]+)s$", found).group(1))


def test_hanging_up_through_the_master_stops_the_prompt_being_read(cluster) -> None:
    client = cluster.client()
    started = time.monotonic()
    client.chat.completions.create(
        model=harness.MODEL, messages=[{"role": "user", "content": long_prompt(1)}], max_tokens=1
    )
    whole = time.monotonic() - started
    assert whole > 2.0, f"the prompt must take a while to read for this test to mean anything ({whole:.1f}s)"

    body = {"model": harness.MODEL, "messages": [{"role": "user", "content": long_prompt(2)}], "stream": True}
    post_and_hang_up(cluster.master_port, cluster.token, body, after_s=0.5)
    cancelled = logged_seconds(cluster, " 499 ")
    assert cancelled < whole / 2, (
        f"cancelled after {cancelled:.1f}s; reading the whole prompt takes {whole:.1f}s"
    )
