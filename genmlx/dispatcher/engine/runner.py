"""The model thread: it loads the model, then decodes every admitted request together, one token
per step (continuous batching).

Only this thread touches MLX. The event loop submits a ``GenerationRequest`` and gets a ``Job`` back;
jobs wait in a queue (``max_queue`` long, then 429) until the batch has room (the decoder's
capacity, ``--max-batch``), and join it between two steps. After each step the engine posts every
event it produced to the loop in one ``IOLoop.add_callback``, so the handlers that wait on them
never share state with this thread beyond each job's cancel flag.

In a multi-rank group (``ModelSource.group``) this thread first joins MLX's ring and loads its shard.
Rank 0 then serves as above (``leader``) and, before each step, tells the other ranks which requests join and
leave (``lockstep``); the other ranks apply the same changes, decode the same step and discard what
they sample; a request whose prompt the disk tier may supply waits until every rank has said what
its disk holds (``disk_agreement``). A broken group (a peer gone, a failed step) ends the thread
and the process with status 1.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tornado.ioloop import IOLoop

from genmlx.core.errors import NotReady, QueueFull
from genmlx.core.home import genmlx_home
from genmlx.dispatcher.engine.compiled_decode import compile_decode_mlps
from genmlx.dispatcher.engine.decoding import DecoderSettings
from genmlx.dispatcher.engine.events import (
    EngineEvent,
    Finished,
    GenerationRequest,
    Job,
    StepStats,
    Usage,
)
from genmlx.dispatcher.engine.fused_projections import fuse_projections
from genmlx.dispatcher.engine.leader import Leader
from genmlx.dispatcher.engine.lockstep import (
    BackendJoinFailed,
    Heartbeat,
    LockstepBroken,
    Probe,
    RankChannel,
    RankGroup,
    Shutdown,
    join_group,
    step_checksum,
)
from genmlx.dispatcher.engine.model_loading import keep_compiled_kernels, load_shard, load_whole
from genmlx.dispatcher.engine.quantized_batches import MEASUREMENTS_FILE, dequantize_where_it_pays
from genmlx.wire.rank_launch import BACKEND_JOIN_FAILED_EXIT
from genmlx.wire.serving import ServingSettings

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from genmlx.dispatcher.engine.decoding import Decoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to generate, with its tokenizer and the context length it is served with."""

    model: Any  # an mlx.nn.Module of one of mlx-lm's architectures
    tokenizer: TokenizerWrapper
    context_length: int | None
    context_length_set: bool = False  # by serving.contextLength (--context-length), not the model


@dataclass(frozen=True)
class ModelSource:
    """Where the engine loads its model from, and the rank group it shares the model with (None:
    this rank holds the whole model)."""

    model_dir: Path
    group: RankGroup | None = None


class Engine:
    """Owns the model thread. Every public method is called from the event loop's thread."""

    def __init__(
        self,
        source: ModelSource,
        io_loop: IOLoop,
        *,
        serving: ServingSettings,
        decoding: DecoderSettings,
        on_loaded: Callable[[LoadedModel], None],
        on_load_failed: Callable[[str, int], None],
        on_group_ended: Callable[[int], None] = lambda code: None,
    ):
        """``on_group_ended(code)`` is called when a multi-rank group ends the model thread by
        itself: 0 when rank 0 stopped the group, 1 when the group broke; ``on_load_failed(message,
        code)`` when the model could not be loaded, with the exit status the process should end
        with (``BACKEND_JOIN_FAILED_EXIT`` where the group's backend could not be joined). ``serving`` is the
        model's serving settings as the manifest gave them (queue bound, context length)."""
        self._source = source
        self._io_loop = io_loop
        self._serving = serving
        self._decoding = decoding
        self._on_loaded = on_loaded
        self._on_load_failed = on_load_failed
        self._on_group_ended = on_group_ended
        self._channel: RankChannel | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._stopping = threading.Event()  # set on the event loop, read by the model thread
        self.loaded: LoadedModel | None = None
        self.step_stats = StepStats()  # rank 0's steps, for the metrics
        self._thread = threading.Thread(target=self._run, name="genmlx-model", daemon=True)

    def start(self) -> None:
        """Start the model thread; it loads the model first."""
        self._thread.start()

    def submit(self, request: GenerationRequest, deliver: Callable[[EngineEvent], None]) -> Job:
        """Queue ``request``; ``deliver`` will be called on the event loop with each of its events."""
        if self._stopping.is_set():
            raise NotReady("The server is shutting down.", code="shutting_down")
        if self.loaded is None:
            raise NotReady("The model is still loading; retry shortly.")
        if self._queue.qsize() >= self._serving.max_queue:
            raise QueueFull(f"{self._serving.max_queue} requests are already waiting; retry shortly.")
        job = Job(request, deliver)
        self._queue.put(job)
        return job

    def stop(self) -> None:
        """Cancel the running and waiting jobs and let the model thread end."""
        self._stopping.set()
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
            code = BACKEND_JOIN_FAILED_EXIT if isinstance(e, BackendJoinFailed) else 1
            self._io_loop.add_callback(self._on_load_failed, f"{type(e).__name__}: {e}", code)
            return
        self._io_loop.add_callback(self._publish_loaded, loaded)
        try:
            if self._channel is None or self._channel.is_leader:
                Leader(
                    loaded.tokenizer,
                    lambda: self._make_decoder(loaded),
                    self._queue,
                    self._stopping,
                    self._io_loop,
                    self._channel,
                    self.step_stats,
                ).run()
            else:
                self._follow(loaded)
        except LockstepBroken as e:
            log.error("%s; this rank stops (ranks cannot rejoin a group)", e)
            self._cancel_waiting()
            self._io_loop.add_callback(self._on_group_ended, 1)
            return
        self._cancel_waiting()
        if self._channel is not None:
            self._io_loop.add_callback(self._on_group_ended, 0)

    def _make_decoder(self, loaded: LoadedModel) -> Decoder:
        from genmlx.dispatcher.engine.decoders import make_decoder

        leads = self._channel is None or self._channel.is_leader
        settings = dataclasses.replace(self._decoding, leads=leads)
        return make_decoder(loaded.model, loaded.tokenizer.eos_token_ids, settings, loaded.tokenizer)

    def _follow(self, loaded: LoadedModel) -> None:
        """A follower's whole life after loading: apply what rank 0 sends and decode the same steps,
        until it says ``Shutdown`` or this rank is told to stop (rank 0 then finds the group broken
        at its next heartbeat)."""
        channel, decoder = self._channel, self._make_decoder(loaded)
        while not self._stopping.is_set():
            received = channel.receive()
            message = received.message
            if isinstance(message, Shutdown):
                log.info("rank 0 stopped the group")
                return
            if isinstance(message, Heartbeat):
                decoder.trim_cache(received.cache_entries)
            elif isinstance(message, Probe):
                channel.answer(decoder.offer_disk(list(message.prompt), message.tokens))
            else:
                try:
                    for uid in message.leaves:
                        decoder.leave(uid)
                    decoder.trim_cache(received.cache_entries)
                    for join in message.joins:
                        decoder.join(join.uid, join.request, join.cached_tokens)
                    sampled = decoder.step()
                except Exception as e:  # this rank is now out of step with rank 0
                    log.exception("decoding failed on rank %d", channel.rank)
                    problem = f"decoding failed on rank {channel.rank} ({type(e).__name__})"
                    raise LockstepBroken(problem) from e
                channel.stepped(step_checksum((s.uid, s.token) for s in sampled))

    def _load(self) -> LoadedModel:
        from mlx_lm.utils import maybe_set_recommended_wired_limit

        keep_compiled_kernels(genmlx_home())
        group = self._source.group
        if group is None:
            model, tokenizer, config = load_whole(self._source.model_dir)
        else:
            mlx_group = join_group(group)
            self._channel = RankChannel(mlx_group)
            model, tokenizer, config = load_shard(self._source.model_dir, mlx_group, group.sharding)
        fuse_projections(model)  # first: the layers below batch and measure the stacked layers
        # Rows as one matrix; a measurement on a GPU is kept for the next load on this machine.
        decoding = self._decoding
        dequantize_where_it_pays(
            model, decoding.dequantize_rows, genmlx_home() / MEASUREMENTS_FILE, decoding.spare_bytes
        )
        compile_decode_mlps(model)  # after the layers above: a trace keeps what it read
        # On Apple silicon keep the weights wired for the life of the server (a no-op elsewhere).
        maybe_set_recommended_wired_limit()
        given = self._serving.context_length
        context_length = given or config.get("max_position_embeddings")
        return LoadedModel(model, tokenizer, context_length, context_length_set=given is not None)

    def _publish_loaded(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._on_loaded(loaded)

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
