"""The dispatchers' metrics on the master's ``/metrics``: each serving model's rank 0 is scraped
(signed, its reply's signature checked, as the API proxy does) and its families are served again
with a ``node`` label beside the ``model_name`` they carry, so one scrape of the master gives
Prometheus the whole cluster: serving (``vllm:*``, ``genmlx:prompt_cache_*``), nodes and clients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from genmlx.core.signing import REPLY_HEADER, Keys, SignatureError, check_reply, signed_headers

if TYPE_CHECKING:
    from genmlx.master.runtime.loop import Reconciler

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 5.0
Ranks = Callable[[], dict[str, tuple[str, str]]]  # model -> (rank 0's node, its base URL)


def serving_ranks(reconciler: Reconciler) -> dict[str, tuple[str, str]]:
    """Each model that serves now: the node of its rank 0, and rank 0's base URL."""
    specs = {spec.name: spec for spec in reconciler.applied.manifest.models} if reconciler.applied else {}
    return {
        model: (specs[model].nodes[0], url)
        for model, url in reconciler.serving_endpoints().items()
        if model in specs
    }


class ServingMetrics(Collector):
    def __init__(self, ranks: Ranks, keys_for_host: Callable[[str], Keys], http: AsyncHTTPClient):
        self.ranks = ranks
        self.keys_for_host = keys_for_host
        self.http = http
        self._scraped: dict[str, tuple[str, list[Metric]]] = {}  # model -> (node, its families)
        self._problems: dict[str, str] = {}  # model -> why its metrics were refused last

    async def gather(self) -> None:
        """Scrape every serving model's rank 0 once; a model that stopped serving drops out."""
        ranks = self.ranks()
        for model in set(self._scraped) - set(ranks):
            del self._scraped[model]
        for model, (node, base_url) in ranks.items():
            families = await self._scrape(model, base_url)
            if families is not None:
                self._scraped[model] = (node, families)

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
