"""Client keys: what a ``gmx_…`` key may do on the master, and what it did.

The keys are the applied manifest's ``auth.apiKeys`` (by SHA-256, so adding or revoking one is a
commit and an apply). ``ClientKeys`` is the master's ``Keyring``: it finds a presented key, refuses
one that expired, holds each key to its ``requestsPerMinute`` (a sliding minute: 429 with the
seconds until its oldest request leaves the window), and counts every key's requests and tokens,
kept for ``genmlx key list`` (``GET /api/v1/keys``) and the master's ``/metrics``. What a key did
is kept in memory: a restarted master starts counting again.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from genmlx.core.errors import RateLimited, Unauthorized
from genmlx.core.home import client_key_digest
from genmlx.manifest.types import ApiKey
from genmlx.master.planning.status import iso_time
from genmlx.master.runtime.loop import Reconciler

WINDOW_S = 60.0


@dataclass
class KeyUse:
    """What one key did since the master started."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_limited: int = 0
    last_used: float | None = None  # unix time


class ClientKeys:
    """The applied manifest's client keys, with their limits and their use."""

    def __init__(self, reconciler: Reconciler, clock: Callable[[], float] = time.time):
        self._reconciler = reconciler
        self._clock = clock
        self._use: dict[str, KeyUse] = {}
        self._recent: dict[str, deque[float]] = {}
        self.registry = CollectorRegistry()
        labels = ["key"]
        self._requests = Counter(
            "genmlx_client_requests", "Requests admitted, by client key.", labels, registry=self.registry
        )
        self._tokens = Counter(
            "genmlx_client_tokens",
            "Tokens of the replies, by client key and kind.",
            ["key", "kind"],
            registry=self.registry,
        )
        self._limited = Counter(
            "genmlx_client_rate_limited",
            "Requests refused with 429, by client key.",
            labels,
            registry=self.registry,
        )

    def keys(self) -> tuple[ApiKey, ...]:
        applied = self._reconciler.applied
        return applied.manifest.auth.api_keys if applied else ()

    def find(self, presented: str) -> ApiKey | None:
        digest = client_key_digest(presented)
        found = None
        for key in self.keys():  # every key compared, in constant time each
            if hmac.compare_digest(key.sha256, digest):
                found = key
        return found

    def admit(self, key: ApiKey) -> None:
        now = self._clock()
        if key.expires is not None and now >= key.expires:
            raise Unauthorized(f"The API key {key.name!r} expired at {iso_time(key.expires)}.")
        use = self._use.setdefault(key.name, KeyUse())
        if key.requests_per_minute is not None:
            self._hold_to_rate(key, use, now)
        use.requests += 1
        use.last_used = now
        self._requests.labels(key.name).inc()

    def _hold_to_rate(self, key: ApiKey, use: KeyUse, now: float) -> None:
        recent = self._recent.setdefault(key.name, deque())
        while recent and recent[0] <= now - WINDOW_S:
            recent.popleft()
        if len(recent) >= key.requests_per_minute:
            use.rate_limited += 1
            self._limited.labels(key.name).inc()
            wait = max(1, math.ceil(recent[0] + WINDOW_S - now))
            raise RateLimited(
                f"The API key {key.name!r} may make {key.requests_per_minute} requests a minute; "
                f"retry in {wait} s.",
                retry_after_s=wait,
            )
        recent.append(now)

    def count_tokens(self, key: ApiKey, prompt: int, completion: int) -> None:
        use = self._use.setdefault(key.name, KeyUse())
        use.prompt_tokens += prompt
        use.completion_tokens += completion
        self._tokens.labels(key.name, "prompt").inc(prompt)
        self._tokens.labels(key.name, "completion").inc(completion)

    def report(self) -> list[dict]:
        """Every applied key with its scope and what it did (never the key, nor its digest)."""
        rows = []
        for key in self.keys():
            use = self._use.get(key.name, KeyUse())
            rows.append(
                {
                    "name": key.name,
                    "models": list(key.models) if key.models is not None else None,
                    "expires": iso_time(key.expires) if key.expires is not None else None,
                    "requestsPerMinute": key.requests_per_minute,
                    "metrics": key.metrics,
                    "requests": use.requests,
                    "promptTokens": use.prompt_tokens,
                    "completionTokens": use.completion_tokens,
                    "rateLimited": use.rate_limited,
                    "lastUsed": iso_time(use.last_used) if use.last_used is not None else None,
                }
            )
        return rows
