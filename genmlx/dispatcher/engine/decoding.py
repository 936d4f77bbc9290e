"""Decoders: the sequences being generated, advanced one token each per ``step``.

``BatchDecoder`` is continuous batching on mlx-lm's ``BatchGenerator``: sequences join and leave
between steps, and each step decodes one token for every sequence already past its prompt and then
processes one chunk of the prompts still being read: ``prefill_chunk_alone`` tokens when one
prompt is read and nothing else is under way, so that a prompt with nothing to wait for is read in
as few steps as mlx-lm's own servers take, and ``prefill_chunk`` otherwise, so a long prompt holds
the others back by at most one short chunk per token (and prompts read together stay short). A
sequence that ends leaves its KV state in the ``PrefixCache`` for later prompts that start the same
way. A sequence that joins an empty
decoder runs by itself (``_Solo``) on plain caches, as mlx-lm's ``generate_step`` decodes, which
is faster than a batch of one (and, where the model allows, through one compiled step per token,
``fixed_decode``); when a second one joins, it moves into the batch with its cache.

``decoders.SequentialDecoder`` serves models whose caches cannot be batched (mlx-lm's ``merge``),
and quantized KV caches, one sequence at a time (``solo``); ``decoders.make_decoder`` picks
between the two.

For caches that cannot be cut back to a boundary later (``PrefixCache.boundaries_kept``), a
sequence's prompt is read in segments that end at its boundaries (mlx-lm's
``insert_segments``), and the state at each segment's end goes to the prefix cache.

Both are deterministic given the same calls in the same order, which is what keeps the ranks of a
group in step: rank 0 decides every join and leave, and every rank makes the same calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from genmlx.dispatcher.engine.cache_layout import cache_layout
from genmlx.dispatcher.engine.constraints import GrammarConstraints, RequestRow, sample_held
from genmlx.dispatcher.engine.disk_tier import DiskTier
from genmlx.dispatcher.engine.events import GenerationRequest
from genmlx.dispatcher.engine.fixed_decode import fixed_decode_for
from genmlx.dispatcher.engine.lazy_logprobs import use_lazy_logprobs
from genmlx.dispatcher.engine.prefix_cache import PrefixCache, PromptCacheStats
from genmlx.dispatcher.engine.sampling import BatchSampler, make_logits_processors
from genmlx.dispatcher.engine.solo import End, KvQuantization, Sampled, Solo

__all__ = ["BatchDecoder", "Decoder", "DecoderSettings", "End", "Sampled", "prefix_cache_for"]


@dataclass(frozen=True)
class DecoderSettings:
    """How many sequences decode together, how many prompt tokens one step reads (while others
    decode, and while none does), and the prefix cache's bounds (``cache_entries`` 0 turns it
    off), which only rank 0 (``leads``) enforces, and its disk tier (the process's one, shared by
    every decoder it makes)."""

    max_batch: int = 8
    prefill_chunk: int = 512
    prefill_chunk_alone: int = 2048  # the dispatcher picks it for the device (``settings``)
    cache_entries: int = 16
    cache_bytes: int = 4 << 30
    leads: bool = True
    disk_tier: DiskTier | None = None
    kv_bits: int | None = None  # a quantized KV cache: one sequence at a time (``decoders``)
    kv_group_size: int = 64
    # Quantized layers multiply this many rows or more through their dequantized weight (0: never;
    # None: where the engine measures that it pays, when it loads the model: ``quantized_batches``).
    dequantize_rows: int | None = 0
    # Memory their weights dequantized once may take, kept beside them (None: none; ``--spare-gb``).
    spare_bytes: int | None = None
    stats: PromptCacheStats = field(default_factory=PromptCacheStats)  # the process's one

    @property
    def quantization(self) -> KvQuantization | None:
        return KvQuantization(self.kv_bits, self.kv_group_size) if self.kv_bits else None


def prefix_cache_for(model: Any, settings: DecoderSettings) -> PrefixCache:
    """The prefix cache a decoder of ``model`` keeps, by ``settings``."""
    return PrefixCache(
        settings.cache_entries,
        settings.cache_bytes,
        evicts=settings.leads,
        disk=settings.disk_tier,
        layout=cache_layout(model, settings.quantization),
        stats=settings.stats,
    )


class Decoder(Protocol):
    capacity: int

    @property
    def active(self) -> int: ...

    @property
    def cache_entries(self) -> int: ...

    def join(self, uid: int, request: GenerationRequest, cached_tokens: int | None = None) -> int: ...

    def leave(self, uid: int) -> None: ...

    def step(self) -> list[Sampled]: ...

    def trim_cache(self, entries: int) -> None: ...

    def offer_disk(self, prompt: list[int], limit: int | None = None, beyond: int = 0) -> int: ...

    def memory_tokens(self, prompt: list[int]) -> int: ...


class BatchDecoder:
    """Continuous batching over mlx-lm's ``BatchGenerator``, with a prefix cache."""

    def __init__(
        self,
        model: Any,
        eos_ids: set[int],
        settings: DecoderSettings,
        constraints: GrammarConstraints | None = None,
    ):
        from mlx_lm.generate import BatchGenerator

        self._constraints = constraints
        self.capacity = settings.max_batch
        self._model = model
        self._eos_ids = eos_ids
        self._prefill_chunk = settings.prefill_chunk
        self._prefill_chunk_alone = settings.prefill_chunk_alone
        self._solo: Solo | None = None
        self._fixed = fixed_decode_for(model)  # the compiled step a sequence decoded alone takes
        self._carried: list[Sampled] = []  # the token a sequence sampled alone before it moved
        self._generator = BatchGenerator(
            model,
            stop_tokens=[[eos] for eos in sorted(eos_ids)],
            completion_batch_size=settings.max_batch,
            prefill_batch_size=settings.max_batch,
            # The most a step reads: ``step`` sets each step's chunk, which the prompt batch must
            # then read in one call.
            prefill_step_size=max(settings.prefill_chunk, settings.prefill_chunk_alone),
        )
        use_lazy_logprobs(self._generator)  # rows of log-probabilities computed only where read
        self._prefixes = prefix_cache_for(model, settings)
        self._uids: dict[int, int] = {}  # ours -> the generator's
        self._boundaries: dict[int, tuple[int, ...]] = {}  # ours -> its snapshot points, until it ends
        self._rows: dict[int, RequestRow] = {}  # the generator's uid -> its request's sampler
        self._batch_sampler = BatchSampler()
        self._sample_batch = self._sample_generation_batch  # one object: mlx-lm compares by identity

    @property
    def active(self) -> int:
        return len(self._uids) + (self._solo is not None)

    @property
    def cache_entries(self) -> int:
        return len(self._prefixes)

    def join(self, uid: int, request: GenerationRequest, cached_tokens: int | None = None) -> int:
        """Add ``request`` as sequence ``uid``; how many prompt tokens the prefix cache supplied.

        ``cached_tokens`` is rank 0's answer on the other ranks: exactly that many are reused.
        """
        prompt = list(request.prompt_tokens)
        reused = self._prefixes.take(prompt, cached_tokens)
        # Where the disk tier snapshots the sequence when it ends: the shared boundaries, and the
        # prompt's end short of its last token (the same prompt again reuses all but that).
        self._boundaries[uid] = (*request.boundaries, len(prompt) - 1)
        cached = reused.tokens if reused else 0
        cache = reused.cache if reused else None
        processors = make_logits_processors(request.sampling)  # penalties; a grammar masks in ``row``
        row = RequestRow.of(request, self._constraints)
        if self.active == 0 and not processors:
            if cache is None:
                cache = make_prompt_cache(self._model)
            read, unread = prompt[:cached], prompt[cached:]
            self._solo = Solo(
                uid, self._model, cache, read, unread, row, request.max_tokens, fixed=self._fixed
            )
            self._solo.stops, self._solo.on_stop = self._stops(uid), self._prefixes.put_boundary
            return cached
        if self._solo is not None:
            self._move_solo_into_batch()
        self._insert(uid, prompt[cached:], prompt[:cached], cache, row, processors, request.max_tokens)
        return cached

    def _stops(self, uid: int) -> Sequence[int]:
        """Where sequence ``uid``'s state goes to the prefix cache as its prompt is read."""
        return self._boundaries[uid] if self._prefixes.boundaries_kept else ()

    def _insert(
        self,
        uid: int,
        unread: list[int],
        read: list[int],
        cache: list[Any] | None,
        row: RequestRow,
        processors: list,
        max_tokens: int,
    ) -> None:
        start, stops = len(read), sorted(set(self._stops(uid)))
        cuts = [0, *(stop - start for stop in stops if start < stop < start + len(unread)), len(unread)]
        (inner,) = self._generator.insert_segments(
            [[unread[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]],
            max_tokens=[max_tokens],
            caches=[cache],
            all_tokens=[read],
            samplers=[row],
            logits_processors=[processors],
        )
        self._uids[uid], self._rows[inner] = inner, row

    def _move_solo_into_batch(self) -> None:
        """The sequence running alone joins the batch where it stands, its cache with it. A token it
        already sampled is still delivered by the next ``step``; if that token ended it, it ends."""
        solo = self._solo
        carried = solo.settle(self._eos_ids)
        if carried is not None:
            self._carried.append(carried)
            if carried.end is not None:
                return self._end_solo()
        self._solo = None
        left = solo.max_tokens - solo.generated
        self._insert(solo.uid, solo.unread, solo.read, solo.cache, solo.row, [], left)

    def leave(self, uid: int) -> None:
        """Drop sequence ``uid`` before it ended by itself; what it had read stays in the cache."""
        self._carried = [c for c in self._carried if c.uid != uid]
        if self._solo is not None and self._solo.uid == uid:
            return self._end_solo()
        if uid not in self._uids:  # it ended with a token carried out of its solo run
            return
        inner = self._uids.pop(uid)
        del self._rows[inner]
        for cache, tokens in self._generator.remove([inner], return_prompt_caches=True).values():
            self._prefixes.put(tokens, cache, self._boundaries.pop(uid, ()))

    def step(self) -> list[Sampled]:
        """One token for each sequence past its prompt, and one chunk of the prompts being read."""
        sampled, self._carried = self._carried, []
        if self._solo is not None:
            return sampled + self._step_solo()
        ours = {inner: uid for uid, inner in self._uids.items()}
        alone = reads_alone(self._generator)
        self._generator.prefill_step_size = self._prefill_chunk_alone if alone else self._prefill_chunk
        read, responses = self._generator.next()
        if self._prefixes.boundaries_kept:
            passed = [r.uid for r in read if r.end_of_segment and not r.end_of_prompt]
            for cache, tokens in self._generator.extract_cache(passed).values():
                self._prefixes.put(list(tokens), cache)
        for response in responses:
            uid = ours[response.uid]
            sampled.append(Sampled(uid, response.token, response.logprobs, response.finish_reason))
            if response.finish_reason is not None:
                del self._uids[uid], self._rows[response.uid]
                boundaries = self._boundaries.pop(uid, ())
                self._prefixes.put(response.all_tokens, response.prompt_cache, boundaries)
        self._sample_batches_together()
        return sampled

    def _step_solo(self) -> list[Sampled]:
        solo = self._solo
        with mx.stream(self._generator.stream):
            sampled = solo.step(self._eos_ids, self._prefill_chunk_alone)  # nothing else decodes
        if sampled is None:
            return []
        if sampled.end is not None:
            self._end_solo()
        return [sampled]

    def _end_solo(self) -> None:
        """The sequence running alone ends here (any step under way is finished and its token
        dropped); what it read stays in the prefix cache."""
        solo, self._solo = self._solo, None
        solo.settle(self._eos_ids)
        self._prefixes.put(solo.read, solo.cache, self._boundaries.pop(solo.uid, ()))

    def _sample_batches_together(self) -> None:
        """Give every sequence being decoded the one shared sampler, so the next step samples them
        all in one call.

        mlx-lm's ``GenerationBatch`` makes one sampler call for the whole batch only when every row
        has the same sampler object, and otherwise one per row. A sequence enters the batch with its
        own ``RowSampler`` (its first token is sampled alone); from then on it gets
        ``_sample_batch``, which maps the batch's rows (in the order of its ``uids``) to their
        requests' ``RowSampler``. Both are private to mlx-lm (pinned to 0.32): without them every row
        samples by itself, as correct and slower."""
        batch = getattr(self._generator, "_generation_batch", None)
        samplers = getattr(batch, "samplers", None)
        if samplers is not None and hasattr(batch, "uids"):
            samplers[:] = [self._sample_batch] * len(samplers)

    def _sample_generation_batch(self, logprobs: mx.array) -> mx.array:
        rows = [self._rows[inner] for inner in self._generator._generation_batch.uids]
        samplers = [row.sampler for row in rows]

        def sample(held: mx.array) -> mx.array:
            return self._batch_sampler.sample(held, samplers)

        return sample_held(logprobs, [row.grammar for row in rows], sample)

    def trim_cache(self, entries: int) -> None:
        self._prefixes.trim(entries)

    def offer_disk(self, prompt: list[int], limit: int | None = None, beyond: int = 0) -> int:
        """The prompt's leading tokens this rank read and checked on disk (``PrefixCache.offer``)."""
        return self._prefixes.offer(prompt, limit, beyond)

    def memory_tokens(self, prompt: list[int]) -> int:
        return self._prefixes.memory_tokens(prompt)


def reads_alone(generator: Any) -> bool:
    """Whether ``generator``'s next step reads one prompt and nothing else: no sequence generating,
    and one sequence still reading, with more than its last token left (with only that, it starts
    generating in that step). Reads mlx-lm's private queues (pinned to 0.32); where they are not
    there, says no (short chunks). The same on every rank of a group: their generators are in step."""
    try:
        if len(generator._generation_batch):
            return False
        reading = [segments for segments, *_ in generator._currently_processing]
        reading += [sequence[1] for sequence in generator._unprocessed_sequences]
    except (AttributeError, TypeError, ValueError, IndexError):
        return False
    return len(reading) == 1 and not (len(reading[0]) == 1 and len(reading[0][0]) <= 1)
