"""Prometheus metrics of rank 0, under vLLM's names and buckets so existing dashboards work.

Every measurement is taken on the event loop from the engine's events as they arrive
(``RequestMetrics.observing`` wraps a job's ``deliver``), so neither the engine nor the handlers
keep timers. Timing is therefore per text event: a token that completes no character yet (part of
a multi-byte character, a possible stop-string start) is timed together with the next one.
Token counters come from each request's final ``Usage``, cancelled requests included.

A request counts as waiting from submission until its first event (so a prefill in progress counts
as waiting) and as running from then until it ends. The prefix-cache counters count prompt tokens
looked up and reused, from each request's final ``Usage`` (``cached_tokens``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from genmlx.dispatcher.api.prompt_cache import PromptCacheView
from genmlx.dispatcher.engine.events import EngineEvent, Failed, Finished, StepStats, TextDelta

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so its dashboards' quantiles mean the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0)
TTFT_BUCKETS += (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
ITL_BUCKETS += (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
E2E_BUCKETS += (120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
LABELS = ("model_name",)

Phase = Literal["arrived", "waiting", "running", "ended"]


class DispatcherMetrics:
    """The metrics of one served model, in a registry of their own (one per process)."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.requests_running = self._gauge("num_requests_running", "Number of requests generating now.")
        self.requests_waiting = self._gauge("num_requests_waiting", "Number of requests waiting to start.")
        self.time_to_first_token = self._histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = self._histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.e2e_request_latency = self._histogram(
            "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", E2E_BUCKETS
        )
        self.prompt_tokens = self._counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = self._counter("generation_tokens", "Number of generation tokens processed.")
        self.prefix_cache_queries = self._counter(
            "prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_cache_hits = self._counter(
            "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )

    def request_arrived(self, arrived: float) -> RequestMetrics:
        """Start measuring a request that arrived at ``arrived`` (``time.monotonic()``)."""
        return RequestMetrics(self, arrived)

    def record_prefix_cache(self, queried_tokens: int, cached_tokens: int) -> None:
        """The prefix cache's hook: prompt tokens looked up and how many of them were reused."""
        self.prefix_cache_queries.inc(queried_tokens)
        self.prefix_cache_hits.inc(cached_tokens)

    def watch_prompt_cache(self, view: PromptCacheView) -> None:
        """Expose the prompt cache's tiers: what each holds and supplied, and what the disk tier
        read, wrote and found damaged since the process started."""
        self.registry.register(PromptCacheCollector(self.model_name, view))

    def watch_steps(self, stats: StepStats) -> None:
        """Expose the model thread's steps: how many, the seconds they took and the tokens they
        decoded, from which a dashboard reads the mean step and the mean batch."""
        self.registry.register(StepCollector(self.model_name, stats))

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of every metric and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _gauge(self, name: str, documentation: str) -> Gauge:
        family = Gauge(f"vllm:{name}", documentation, LABELS, registry=self.registry)
        return family.labels(self.model_name)

    def _counter(self, name: str, documentation: str) -> Counter:
        # prometheus_client appends the ``_total`` that vLLM's names end with.
        family = Counter(f"vllm:{name}", documentation, LABELS, registry=self.registry)
        return family.labels(self.model_name)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        family = Histogram(f"vllm:{name}", documentation, LABELS, buckets=buckets, registry=self.registry)
        return family.labels(self.model_name)


class RequestMetrics:
    """One request's timers and phase; fed every engine event of its job on the event loop.

    The handler calls ``submitted`` once the engine took the job and ``leave`` when it is done
    with it, so the gauges let go of a request even if its last event never came.
    """

    def __init__(self, metrics: DispatcherMetrics, arrived: float):
        self._metrics = metrics
        self._arrived = arrived
        self._last_event: float | None = None
        self._phase: Phase = "arrived"
        self._generated = 0  # tokens the generation counter got from this request's deltas

    def submitted(self) -> None:
        """The engine accepted the job: it waits until its first event."""
        self._move_to("waiting")

    def observing(self, deliver: Callable[[EngineEvent], None]) -> Callable[[EngineEvent], None]:
        """``deliver`` with every event recorded first."""

        def record_then_deliver(event: EngineEvent) -> None:
            self.record(event)
            deliver(event)

        return record_then_deliver

    def record(self, event: EngineEvent) -> None:
        """Time ``event``; a ``Finished`` also adds its tokens to the counters."""
        now = time.monotonic()
        match event:
            case TextDelta(tokens=tokens):
                self._record_output(now)
                self._count_generated(tokens)
            case Finished(usage=usage):
                if usage.completion_tokens > 0 and self._last_event is None:
                    self._record_output(now)  # tokens that made no text (end of turn at once)
                self._metrics.prompt_tokens.inc(usage.prompt_tokens)
                self._count_generated(usage.completion_tokens - self._generated)
                self._metrics.record_prefix_cache(usage.prompt_tokens, usage.cached_tokens)
                self._metrics.e2e_request_latency.observe(now - self._arrived)
            case Failed():
                self._metrics.e2e_request_latency.observe(now - self._arrived)
        if isinstance(event, Finished | Failed):
            self.leave()

    def _count_generated(self, tokens: int) -> None:
        """Count tokens as they are generated, so that a rate over the counter follows a long
        stream instead of jumping when it ends."""
        if tokens > 0:
            self._metrics.generation_tokens.inc(tokens)
            self._generated += tokens

    def leave(self) -> None:
        """Stop counting this request in the gauges (once)."""
        self._move_to("ended")

    def _record_output(self, now: float) -> None:
        if self._last_event is None:
            self._metrics.time_to_first_token.observe(now - self._arrived)
            self._move_to("running")
        else:
            self._metrics.inter_token_latency.observe(now - self._last_event)
        self._last_event = now

    def _move_to(self, phase: Phase) -> None:
        gauges = {"waiting": self._metrics.requests_waiting, "running": self._metrics.requests_running}
        if self._phase == "ended" or phase == self._phase:
            return
        if self._phase in gauges:
            gauges[self._phase].dec()
        if phase in gauges:
            gauges[phase].inc()
        self._phase = phase


class StepCollector:
    """``genmlx:engine_step*``, read when scraped. Over an interval, seconds over steps is the mean
    step (a prompt chunk, a token for each generating sequence, or both), tokens over steps the
    mean batch, and seconds over the interval how busy the model thread was."""

    def __init__(self, model_name: str, stats: StepStats):
        self.model_name = model_name
        self.stats = stats

    def collect(self):
        stats = self.stats
        yield from counters(
            "genmlx:engine_",
            self.model_name,
            ("steps", "Steps the model thread took.", stats.steps),
            ("step_seconds", "Seconds the model thread spent in steps.", stats.seconds),
            ("step_tokens", "Tokens the steps decoded, one per generating sequence a step.", stats.tokens),
        )


class PromptCacheCollector:
    """``genmlx:prompt_cache_*``, read when scraped: each tier's entries, bytes, hits and hit
    tokens (label ``tier``), the lookups, and the disk tier's reads, writes and damaged blocks."""

    def __init__(self, model_name: str, view: PromptCacheView):
        self.model_name = model_name
        self.view = view

    def collect(self):
        tiers = self.view.tiers()
        families = (
            ("entries", "Sequences in memory, block and snapshot files on disk.", "entries"),
            ("bytes", "Bytes of KV state a tier holds.", "bytes"),
        )
        for name, help_text, attribute in families:
            family = GaugeMetricFamily(f"genmlx:prompt_cache_{name}", help_text, labels=(*LABELS, "tier"))
            for tier in tiers:
                family.add_metric([self.model_name, tier.tier], getattr(tier, attribute))
            yield family
        for name, help_text, attribute in (
            ("hits", "Prompts whose reused prefix a tier supplied.", "hits"),
            ("hit_tokens", "Prompt tokens a tier supplied.", "hit_tokens"),
        ):
            family = CounterMetricFamily(f"genmlx:prompt_cache_{name}", help_text, labels=(*LABELS, "tier"))
            for tier in tiers:
                family.add_metric([self.model_name, tier.tier], getattr(tier, attribute))
            yield family
        lookups = CounterMetricFamily("genmlx:prompt_cache_lookups", "Prompts looked up.", labels=LABELS)
        lookups.add_metric([self.model_name], tiers[0].lookups)
        yield lookups
        if self.view.disk is None:
            return
        disk = self.view.disk
        yield from counters(
            "genmlx:prompt_cache_disk_",
            self.model_name,
            ("read_bytes", "Bytes of KV state read from disk.", disk.read_bytes),
            ("written_bytes", "Bytes of KV state written to disk.", disk.written_bytes),
            ("damaged_blocks", "Blocks found not to match their checksum (each a miss).", disk.damaged),
        )


def counters(prefix: str, model_name: str, *rows: tuple[str, str, float]) -> Iterator[CounterMetricFamily]:
    """A counter family labelled ``model_name`` for each (name after ``prefix``, help, value)."""
    for name, help_text, value in rows:
        family = CounterMetricFamily(prefix + name, help_text, labels=LABELS)
        family.add_metric([model_name], value)
        yield family
