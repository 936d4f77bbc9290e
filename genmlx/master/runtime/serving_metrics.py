"""The dispatchers' metrics on the master's ``/metrics``: each serving model's rank 0 is scraped
(signed, its reply's signature checked, as the API proxy does) and its families are served again
with a ``node`` label beside the ``model_name`` they carry, so one scrape of the master gives
Prometheus the whole cluster: serving (``vllm:*``, ``genmlx:prompt_cache_*``), nodes and clients.

Each scrape also adds a point to the model's series of the last five minutes (``series``, for the
status page's charts): tokens per second, time to first token and the queue, from the counters'
change since the scrape before.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from genmlx.core.signing import REPLY_HEADER, Keys, SignatureError, check_reply, signed_headers
from genmlx.wire.telemetry import ServingSample

if TYPE_CHECKING:
    from genmlx.master.runtime.loop import Reconciler

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 5.0
SERIES_S = 300.0  # as long as the nodes' telemetry is kept
Ranks = Callable[[], dict[str, tuple[str, str]]]  # model -> (rank 0's node, its base URL)


def serving_ranks(reconciler: Reconciler) -> dict[str, tuple[str, str]]:
    """Each model that serves now: the node of its rank 0, and rank 0's base URL."""
    specs = {spec.name: spec for spec in reconciler.applied.manifest.models} if reconciler.applied else {}
    return {
        model: (specs[model].nodes[0], url)
        for model, url in reconciler.serving_endpoints().items()
        if model in specs
    }


@dataclass(frozen=True)
class Totals:
    """What a rank 0's metrics say at one scrape: its counters and its queue."""

    at: float
    node: str  # where the rank 0 they came from runs
    generation_tokens: float
    prompt_tokens: float
    ttft_sum: float
    ttft_count: float
    waiting: float
    running: float

    @classmethod
    def of(cls, families: Iterable[Metric], at: float, node: str) -> Totals | None:
        """The totals in a scrape; None where it lacks a dispatcher's families."""
        values = {sample.name: sample.value for family in families for sample in family.samples}
        try:
            return cls(
                at,
                node,
                values["vllm:generation_tokens_total"],
                values["vllm:prompt_tokens_total"],
                values["vllm:time_to_first_token_seconds_sum"],
                values["vllm:time_to_first_token_seconds_count"],
                values["vllm:num_requests_waiting"],
                values["vllm:num_requests_running"],
            )
        except KeyError:
            return None

    def since(self, before: Totals | None) -> ServingSample:
        """The point for the interval from ``before`` to these totals."""
        elapsed = self.at - before.at if before else 0.0
        # Counters of another rank 0 (the model moved), or that went back (a rank started again):
        # nothing to tell for the interval.
        counted = (
            before is not None
            and before.node == self.node
            and elapsed > 0
            and self.generation_tokens >= before.generation_tokens
            and self.ttft_count >= before.ttft_count
        )

        def rate(now: float, then: float) -> float | None:
            return (now - then) / elapsed if counted else None

        requests = self.ttft_count - before.ttft_count if counted else 0
        return ServingSample(
            at=self.at,
            node=self.node,
            generation_tokens_per_s=rate(self.generation_tokens, before.generation_tokens if before else 0),
            prompt_tokens_per_s=rate(self.prompt_tokens, before.prompt_tokens if before else 0),
            time_to_first_token_s=(self.ttft_sum - before.ttft_sum) / requests if requests > 0 else None,
            requests_waiting=self.waiting,
            requests_running=self.running,
        )


class ServingMetrics(Collector):
    def __init__(self, ranks: Ranks, keys_for_host: Callable[[str], Keys], http: AsyncHTTPClient):
        self.ranks = ranks
        self.keys_for_host = keys_for_host
        self.http = http
        self._scraped: dict[str, tuple[str, list[Metric]]] = {}  # model -> (node, its families)
        self._problems: dict[str, str] = {}  # model -> why its metrics were refused last
        self._totals: dict[str, Totals] = {}  # model -> its last scrape's totals
        self._series: dict[str, collections.deque[ServingSample]] = {}

    async def gather(self) -> None:
        """Scrape every serving model's rank 0 once; a model that stopped serving drops out."""
        ranks = self.ranks()
        for model in set(self._scraped) - set(ranks):
            del self._scraped[model]
        for model in set(self._series) - set(ranks):
            self._series.pop(model)
            self._totals.pop(model, None)
        for model, (node, base_url) in ranks.items():
            families = await self._scrape(model, base_url)
            if families is not None:
                self._scraped[model] = (node, families)
                self._add_point(model, node, families)

    def _add_point(self, model: str, node: str, families: list[Metric]) -> None:
        totals = Totals.of(families, time.time(), node)
        if totals is None:
            return
        before = self._totals.get(model)
        self._totals[model] = totals
        kept = self._series.setdefault(model, collections.deque())
        kept.append(totals.since(before))
        while kept and kept[0].at < totals.at - SERIES_S:
            kept.popleft()

    def series(self, since: float = 0.0) -> dict[str, tuple[ServingSample, ...]]:
        """Each serving model's points after ``since``, oldest first."""
        return {model: tuple(p for p in kept if p.at > since) for model, kept in sorted(self._series.items())}

    async def _scrape(self, model: str, base_url: str) -> list[Metric] | None:
        parts = urlsplit(base_url)
        url = f"{parts.scheme}://{parts.netloc}/metrics"
        keys = self.keys_for_host(parts.hostname or "")
        headers, nonce = signed_headers(keys, "GET", url, None)
        try:
            reply = await self.http.fetch(
                url, headers=headers, request_timeout=SCRAPE_TIMEOUT_S, raise_error=False
            )
        except (OSError, HTTPClientError) as e:  # refused, reset, timed out: the pass will see it
            log.debug("no metrics from %s's rank 0: %s", model, e)
            return None
        try:
            check_reply(keys, nonce, reply.code, reply.headers.get(REPLY_HEADER), reply.body)
        except SignatureError as e:
            return self._refuse(model, f"what answers at {url} is not its rank 0: {e}")
        if reply.code != 200:
            return self._refuse(model, f"its rank 0 answered /metrics with HTTP {reply.code}")
        try:
            families = list(text_string_to_metric_families(reply.body.decode()))
        except (UnicodeDecodeError, ValueError) as e:
            return self._refuse(model, f"its rank 0 sent metrics that do not parse: {e}")
        self._problems.pop(model, None)
        return families

    def _refuse(self, model: str, problem: str) -> None:
        """Say why a model's metrics are left out: once, not at every scrape."""
        if self._problems.get(model) != problem:
            log.warning("leaving out %s's metrics: %s", model, problem)
        self._problems[model] = problem

    def collect(self) -> Iterator[Metric]:
        """Every scraped family once, its samples from every model, each with its ``node``."""
        merged: dict[str, Metric] = {}
        for node, families in self._scraped.values():
            for family in families:
                target = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    target.add_sample(sample.name, {**sample.labels, "node": node}, sample.value)
        yield from merged.values()
