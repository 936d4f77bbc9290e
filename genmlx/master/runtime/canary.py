"""The canary: a one-token completion sent to each serving group's rank 0.

``/health`` answers from rank 0's event loop, so it says 200 even when the model thread is stuck:
a rank of the group that hangs without dying (stopped, wedged in a collective) holds every other
rank in its next collective, and nothing generates any more. The only proof that a group serves is
a completion. So a group is Ready only once a canary came back, and while it serves, a canary runs
every ``interval_s``; one that takes longer than ``timeout_s`` marks the group hung, and the planner
restarts it.

Canaries run in the background: a pass never waits on one, it reads the latest verdict. A verdict
belongs to one running group (its spec hash and rank 0's pid), so a restarted group starts unproven.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from genmlx.core.signing import REPLY_HEADER, Keys, SignatureError, check_reply, signed_headers

KeysFor = Callable[[str], Keys]  # the keys to sign a request to a rank on this host with

log = logging.getLogger("genmlx.master")

Verdict = Literal["passed", "pending", "hung"]

DEFAULT_INTERVAL_S = 30.0
DEFAULT_TIMEOUT_S = 60.0  # a full batch may make the canary wait for a slot


@dataclass(frozen=True)
class CanaryResult:
    group: str
    at: float  # unix time the canary was sent
    verdict: Verdict
    detail: str = ""


class Canaries:
    """Runs each group's canary when it is due and remembers the last verdict."""

    def __init__(self, http: AsyncHTTPClient, keys_for: KeysFor, interval_s: float, timeout_s: float):
        self.on_result: Callable[[], None] = lambda: None  # the loop wakes: a verdict may change status
        self._http = http
        self._keys_for = keys_for
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._results: dict[str, CanaryResult] = {}
        self._running: dict[str, asyncio.Task] = {}

    @classmethod
    def from_environment(cls, http: AsyncHTTPClient, keys: KeysFor) -> Canaries:
        """Interval and timeout from ``GENMLX_CANARY_INTERVAL_S`` / ``GENMLX_CANARY_TIMEOUT_S``."""
        interval = float(os.environ.get("GENMLX_CANARY_INTERVAL_S", DEFAULT_INTERVAL_S))
        timeout = float(os.environ.get("GENMLX_CANARY_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        return cls(http, keys, interval, timeout)

    def verdict(self, model: str, group: str, base_url: str) -> tuple[Verdict, str]:
        """Where ``model``'s group (``group``), serving at ``base_url``, stands; starts a canary
        when one is due. A group that passed stays passed while its next canary runs."""
        last = self._results.get(model)
        if last is not None and last.group != group:
            last = None
        due = last is None or time.time() - last.at >= self._interval_s
        if due and model not in self._running:
            self._running[model] = asyncio.ensure_future(self._run(model, group, base_url))
        if last is None:
            return "pending", "waiting for a one-token completion (the canary)"
        return last.verdict, last.detail

    def forget(self, keep: set[str]) -> None:
        """Drop what is known of models that no longer run."""
        for model in set(self._results) - keep:
            del self._results[model]

    async def _run(self, model: str, group: str, base_url: str) -> None:
        sent = time.time()
        try:
            verdict, detail = await self._complete_one_token(model, base_url)
        finally:
            del self._running[model]
        if verdict is not None:
            if verdict == "hung":
                log.warning("%s: canary failed: %s", model, detail)
            previous = self._results.get(model)
            self._results[model] = CanaryResult(group, sent, verdict, detail)
            if previous is None or (previous.group, previous.verdict) != (group, verdict):
                self.on_result()

    async def _complete_one_token(self, model: str, base_url: str) -> tuple[Verdict | None, str]:
        """``passed``, ``hung`` with why, or None when the answer proves nothing (busy, restarting)."""
        url = f"{base_url}/completions"
        body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}).encode()
        keys = self._keys_for(urlsplit(url).hostname or "")
        signed, nonce = signed_headers(keys, "POST", url, body)
        try:
            response = await self._http.fetch(
                url,
                method="POST",
                body=body,
                headers={**signed, "Content-Type": "application/json"},
                connect_timeout=5.0,
                request_timeout=self._timeout_s,
                raise_error=False,
            )
        except HTTPClientError as e:  # tornado's timeout (599)
            return "hung", f"the canary completion got no answer in {self._timeout_s:.0f}s ({e})"
        except OSError as e:
            return None, f"rank 0 does not answer: {e}"
        if response.code == 599:
            return "hung", f"the canary completion got no answer in {self._timeout_s:.0f}s"
        try:
            check_reply(keys, nonce, response.code, response.headers.get(REPLY_HEADER), response.body)
        except SignatureError as e:
            return "hung", f"what answers at {base_url} is not this cluster's rank 0: {e}"
        if response.code == 200:
            return "passed", ""
        if response.code in (429, 503):
            return None, f"rank 0 is busy (HTTP {response.code})"
        return "hung", f"the canary completion failed with HTTP {response.code}"
