"""The model thread: it loads the model, then generates queued requests one at a time.

Only this thread touches MLX. The event loop submits a ``GenerationRequest`` and gets a ``Job`` back;
the engine posts the job's events to the loop with ``IOLoop.add_callback``, so the handler that
waits on them never shares state with this thread beyond the job's cancel flag.

Requests run one after another for now; continuous batching will replace ``_serve`` with a
scheduler that interleaves ``generate_events``-style steps of several jobs.

In a multi-rank group (``ModelSource.group``) this thread first joins MLX's ring and loads its shard.
Rank 0 then serves as above, announcing each request and each continue-or-cancel decision to the
other ranks through ``lockstep``; the other ranks follow rank 0 and discard what they generate. A
broken group (a peer gone, a failed step) ends the thread and the process with status 1.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tornado.ioloop import IOLoop

from genmlx.api_errors import NotReady, QueueFull
from genmlx.dispatcher.events import EngineEvent, Failed, Finished, GenerationRequest, Usage
from genmlx.dispatcher.lockstep import (
    HEARTBEAT_SECONDS,
    Heartbeat,
    LockstepBroken,
    OutputDigest,
    RankChannel,
    Shutdown,
    follow_leader,
    join_ring,
)
from genmlx.dispatcher.model_loading import Sharding, load_shard, load_whole

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to generate, with its tokenizer and the context length it is served with."""

    model: Any  # an mlx.nn.Module of one of mlx-lm's architectures
    tokenizer: TokenizerWrapper
    context_length: int | None


class Job:
    """A submitted request: the handler may cancel it; the engine delivers its events."""

    def __init__(self, request: GenerationRequest, deliver: Callable[[EngineEvent], None]):
        self.request = request
        self.deliver = deliver
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this job at the next token (or skip it if it has not started)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(frozen=True)
class RankGroup:
    """This rank's place in a multi-rank group and how the group splits the model."""

    rank: int
    world_size: int
    hostfile: Path
    sharding: Sharding = Sharding()


@dataclass(frozen=True)
class ModelSource:
    """Where the engine loads its model from, the context length to serve it with, and the rank
    group it shares the model with (None: this rank holds the whole model)."""

    model_dir: Path
    context_length: int | None = None
    group: RankGroup | None = None


class Engine:
    """Owns the model thread. Every public method is called from the event loop's thread."""

    def __init__(
        self,
        source: ModelSource,
        io_loop: IOLoop,
        *,
        max_queue: int,
        on_loaded: Callable[[LoadedModel], None],
        on_load_failed: Callable[[str], None],
        on_group_ended: Callable[[int], None] = lambda code: None,
    ):
        """``on_group_ended(code)`` is called when a multi-rank group ends the model thread by
        itself: 0 when rank 0 stopped the group, 1 when the group broke."""
        self._source = source
        self._io_loop = io_loop
        self._max_queue = max_queue
        self._on_loaded = on_loaded
        self._on_load_failed = on_load_failed
        self._on_group_ended = on_group_ended
        self._channel: RankChannel | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._current: Job | None = None
        self._stopping = False
        self.loaded: LoadedModel | None = None
        self._thread = threading.Thread(target=self._run, name="genmlx-model", daemon=True)

    def start(self) -> None:
        """Start the model thread; it loads the model first."""
        self._thread.start()

    def submit(self, request: GenerationRequest, deliver: Callable[[EngineEvent], None]) -> Job:
        """Queue ``request``; ``deliver`` will be called on the event loop with each of its events."""
        if self._stopping:
            raise NotReady("The server is shutting down.", code="shutting_down")
        if self.loaded is None:
            raise NotReady("The model is still loading; retry shortly.")
        if self._queue.qsize() >= self._max_queue:
            raise QueueFull(f"{self._max_queue} requests are already waiting; retry shortly.")
        job = Job(request, deliver)
        self._queue.put(job)
        return job

    def stop(self) -> None:
        """Cancel the running and waiting jobs and let the model thread end."""
        self._stopping = True
        if self._current is not None:
            self._current.cancel()
        self._queue.put(None)

    def join(self, timeout: float) -> bool:
        """Wait for the model thread to end; whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            # MLX and mlx-lm are imported here, not at module import, so /health answers while
            # the (slow) imports and the load run.
            loaded = self._load()
        except Exception as e:  # anything at all: the dispatcher must exit and say why
            log.exception("loading the model from %s failed", self._source.model_dir)
            self._io_loop.add_callback(self._on_load_failed, f"{type(e).__name__}: {e}")
            return
        self._io_loop.add_callback(self._publish_loaded, loaded)
        try:
            if self._channel is None or self._channel.is_leader:
                self._lead(loaded)
            else:
                follow_leader(
                    self._channel,
                    lambda request, cancelled: self._follow(loaded, request, cancelled),
                    lambda: self._stopping,
                )
        except LockstepBroken as e:
            log.error("%s; this rank stops (ranks cannot rejoin a group)", e)
            self._cancel_waiting()
            self._io_loop.add_callback(self._on_group_ended, 1)
            return
        self._cancel_waiting()
        if self._channel is not None:
            self._io_loop.add_callback(self._on_group_ended, 0)

    def _lead(self, loaded: LoadedModel) -> None:
        """Serve queued jobs until ``stop``; in a group, keep the followers in step meanwhile."""
        channel = self._channel
        while True:
            try:
                job = self._queue.get(timeout=HEARTBEAT_SECONDS if channel else None)
            except queue.Empty:
                channel.send(Heartbeat())
                continue
            if job is None:
                break
            self._serve(loaded, job)
        if channel is not None:
            channel.send(Shutdown())

    def _follow(
        self, loaded: LoadedModel, request: GenerationRequest, is_cancelled: Callable[[], bool]
    ) -> None:
        from genmlx.dispatcher.generation import generate_events

        output = OutputDigest()  # rank 0 answers the client; this rank only checks it kept in step
        try:
            for event in generate_events(loaded.model, loaded.tokenizer, request, is_cancelled):
                output.add(event)
            self._channel.confirm_same_output(output)
        except LockstepBroken:
            raise
        except Exception as e:  # this rank is now out of step with rank 0
            log.exception("generation failed for request %s", request.request_id)
            rank = self._channel.rank if self._channel else 0
            raise LockstepBroken(f"generation failed on rank {rank} ({type(e).__name__})") from e

    def _load(self) -> LoadedModel:
        from mlx_lm.utils import maybe_set_recommended_wired_limit

        group = self._source.group
        if group is None:
            model, tokenizer, config = load_whole(self._source.model_dir)
        else:
            mlx_group = join_ring(group.rank, group.world_size, group.hostfile)
            self._channel = RankChannel(mlx_group)
            model, tokenizer, config = load_shard(self._source.model_dir, mlx_group, group.sharding)
        # On Apple silicon keep the weights wired for the life of the server (a no-op elsewhere).
        maybe_set_recommended_wired_limit()
        context_length = self._source.context_length or config.get("max_position_embeddings")
        return LoadedModel(model=model, tokenizer=tokenizer, context_length=context_length)

    def _publish_loaded(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._on_loaded(loaded)

    def _serve(self, loaded: LoadedModel, job: Job) -> None:
        from genmlx.dispatcher.generation import generate_events

        if job.cancelled or self._stopping:  # its client left while it waited: skip the prefill
            return self._skip(job)
        self._current = job
        request, is_cancelled = job.request, lambda: job.cancelled or self._stopping
        output = OutputDigest()
        try:
            if self._channel is not None:
                request = self._channel.announce(request)
                is_cancelled = self._channel.agreeing(is_cancelled)
            for event in generate_events(loaded.model, loaded.tokenizer, request, is_cancelled):
                output.add(event)
                self._io_loop.add_callback(job.deliver, event)
        except Exception as e:  # a failed request must not take the model thread down with it
            log.exception("generation failed for request %s", job.request.request_id)
            self._io_loop.add_callback(job.deliver, Failed(f"generation failed: {type(e).__name__}"))
            if self._channel is not None:
                # The other ranks may be anywhere in this request now: the group cannot go on.
                raise LockstepBroken(f"generation failed on rank 0 ({type(e).__name__})") from e
        finally:
            self._current = None
        if self._channel is not None:
            self._channel.confirm_same_output(output)

    def _cancel_waiting(self) -> None:
        """Answer the jobs still queued at shutdown so no handler waits forever."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._skip(job)

    def _skip(self, job: Job) -> None:
        usage = Usage(prompt_tokens=len(job.request.prompt_tokens), completion_tokens=0)
        self._io_loop.add_callback(job.deliver, Finished("cancelled", usage))
