"""Rank 0's (or the only rank's) scheduling loop (``Leader``): it admits queued jobs into the
batch between two steps, decodes a step, turns each sequence's token into its job's events and
posts them to the event loop in one callback; in a group it tells the other ranks each step's
joins and leaves first (``lockstep``). ``runner.Engine`` runs it on the model thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tornado.ioloop import IOLoop

from genmlx.dispatcher.engine.disk_agreement import agree_on_disk
from genmlx.dispatcher.engine.events import EngineEvent, Failed, Finished, Job, StepStats, Usage
from genmlx.dispatcher.engine.lockstep import (
    HEARTBEAT_SECONDS,
    Heartbeat,
    Join,
    LockstepBroken,
    RankChannel,
    Shutdown,
    Step,
    step_checksum,
    with_seed,
)

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from genmlx.dispatcher.engine.decoding import Decoder
    from genmlx.dispatcher.engine.generation import Reply

log = logging.getLogger(__name__)


@dataclass
class Running:
    job: Job
    reply: Reply


class Leader:
    """Rank 0's (or the only rank's) scheduling loop: admit, step, deliver, until ``stopping``.

    It takes jobs from ``jobs`` (None: wake up and look at ``stopping``), decodes with what
    ``make_decoder`` makes (a fresh one after a failed step), posts events through ``io_loop``, in
    a group tells the other ranks each step through ``channel``, and counts each step in ``stats``."""

    def __init__(
        self,
        tokenizer: TokenizerWrapper,
        make_decoder: Callable[[], Decoder],
        jobs: queue.Queue[Job | None],
        stopping: threading.Event,
        io_loop: IOLoop,
        channel: RankChannel | None,
        stats: StepStats,
    ):
        self._tokenizer = tokenizer
        self._stats = stats
        self._make_decoder = make_decoder
        self._jobs = jobs
        self._stopping = stopping
        self._io_loop = io_loop
        self._channel = channel
        self._decoder = make_decoder()
        self._running: dict[int, Running] = {}
        self._leaving: list[int] = []  # sequences that ended here but not in the decoder
        self._uids = itertools.count()
        self._outbox: list[tuple[Job, list[EngineEvent]]] = []

    def run(self) -> None:
        while True:
            first = None
            if not self._running and not self._leaving:
                first = self._wait_for_job()
            if self._stopping.is_set():
                break
            self._step(first)
        for run in self._running.values():
            self._outbox.append((run.job, run.reply.cancel()))
        self._running.clear()
        self._flush()
        if self._channel is not None:
            self._channel.send(Shutdown())

    def _step(self, first: Job | None) -> None:
        """Apply this step's leaves and joins, tell the other ranks, decode one step, deliver."""
        decoder, started = self._decoder, time.perf_counter()
        for uid, run in list(self._running.items()):
            if run.job.cancelled:
                self._outbox.append((run.job, run.reply.cancel()))
                del self._running[uid]
                self._leaving.append(uid)
        leaves, self._leaving = tuple(self._leaving), []
        try:
            for uid in leaves:
                decoder.leave(uid)
            cache_entries = decoder.cache_entries
            joins = self._admit(first)
            if self._channel is not None:
                self._channel.send(Step(joins, leaves), cache_entries)
            sampled = decoder.step()
        except LockstepBroken:
            raise
        except Exception as e:  # a failed step must not take the model thread down with it
            self._fail_batch(e)
            return
        if self._channel is not None:
            self._channel.stepped(step_checksum((s.uid, s.token) for s in sampled))
        for s in sampled:
            run = self._running[s.uid]
            self._outbox.append((run.job, run.reply.add(s.token, s.logprobs, s.end)))
            if run.reply.finished:
                del self._running[s.uid]
                if s.end is None:  # a stop string or an end of turn the decoder did not see
                    self._leaving.append(s.uid)
        self._flush()
        self._stats.record(time.perf_counter() - started, len(sampled))

    def _admit(self, first: Job | None) -> tuple[Join, ...]:
        from genmlx.dispatcher.engine.generation import Reply

        joins = []
        tokenizer = self._tokenizer
        while self._decoder.active < self._decoder.capacity:
            job, first = (first, None) if first is not None else (self._next_job(), None)
            if job is None:
                break
            if job.cancelled:  # its client left while it waited: skip the prefill
                self._outbox.append((job, [Finished("cancelled", Usage(len(job.request.prompt_tokens), 0))]))
                continue
            request = with_seed(job.request) if self._channel is not None else job.request
            uid = next(self._uids)
            agreed = (
                agree_on_disk(self._channel, self._decoder, request.prompt_tokens) if self._channel else None
            )
            cached = self._decoder.join(uid, request, agreed)
            self._running[uid] = Running(job, Reply(tokenizer, request, cached))
            joins.append(Join(uid, request, cached))
        return tuple(joins)

    def _wait_for_job(self) -> Job | None:
        """Block until a job comes (None: ``stop``); in a group, send a heartbeat every second."""
        channel, jobs = self._channel, self._jobs
        while True:
            try:
                return jobs.get(timeout=HEARTBEAT_SECONDS if channel else None)
            except queue.Empty:
                channel.send(Heartbeat(), self._decoder.cache_entries)

    def _next_job(self) -> Job | None:
        try:
            return self._jobs.get_nowait()
        except queue.Empty:
            return None

    def _fail_batch(self, error: Exception) -> None:
        """Every running request fails with ``error``; the decoder starts afresh (its state after a
        failed step is unknown). In a group the other ranks may be anywhere: the group ends."""
        log.exception("decoding failed; failing the %d requests in the batch", len(self._running))
        failed = Failed(f"generation failed: {type(error).__name__}")
        for run in self._running.values():
            self._outbox.append((run.job, [failed]))
        self._running.clear()
        self._leaving.clear()
        self._flush()
        if self._channel is not None:
            raise LockstepBroken(f"decoding failed on rank 0 ({type(error).__name__})") from error
        self._decoder = self._make_decoder()

    def _flush(self) -> None:
        if self._outbox:
            self._io_loop.add_callback(deliver_all, self._outbox)
            self._outbox = []


def deliver_all(outbox: list[tuple[Job, list[EngineEvent]]]) -> None:
    for job, events in outbox:
        for event in events:
            job.deliver(event)
