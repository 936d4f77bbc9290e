"""KV state of earlier sequences, reused by later prompts that start with the same tokens.

mlx-lm's ``LRUPromptCache`` does the bookkeeping: a token trie, least-recently-used eviction by
entry count and bytes, copies handed out so an entry survives its reuse, a longer entry trimmed
to the shared prefix. This module adds what serving needs around it: at least one prompt token is
always left to compute (the model must see the last token to sample the next), and the ranks of a
group hold the same entries and reuse the same ones.

For that, only rank 0 evicts by its bounds. The other ranks evict nothing by themselves: before
each step's lookups rank 0 tells them how many entries it keeps, and they drop their least recently
added entries down to that number. Every entry rank 0 evicted was older than every entry it kept,
so what remains is exactly rank 0's set. Their reuse is also fixed to rank 0's number of tokens.

With a ``DiskTier``, a sequence put here also leaves its state on disk (``disk_prefixes``: whole
blocks and boundary snapshots, or whole-state snapshots for caches that cannot be cut, as
``cache_layout`` says), and a prompt whose start is on disk beyond what memory holds is read back
from there; in a group, only after every rank said what it can read (``offer``,
``disk_agreement``). Caches that cannot be cut are also put here at the boundaries a request
names (``boundaries_kept``), as the decoders pass them.

Rank 0 counts its lookups and what each tier supplied (``PromptCacheStats``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from genmlx.dispatcher.engine.cache_layout import CacheLayout
from genmlx.dispatcher.engine.disk_prefixes import DiskPrefixes
from genmlx.dispatcher.engine.disk_tier import DiskTier

_KEY = "model"  # LRUPromptCache keys entries by model too; a dispatcher serves one
UNBOUNDED = 1 << 62


class PrefixCacheMismatch(Exception):
    """This rank cannot reuse the prefix rank 0 reused: the ranks' caches differ."""


@dataclass
class PromptCacheStats:
    """Rank 0's lookups since the dispatcher started, how many each tier answered (with how many
    prompt tokens), what memory holds now and how the disk tier keeps state (``CacheLayout.kind``;
    None without one); one per process, kept across the decoders it makes."""

    memory_entries: int = 0
    memory_bytes: int = 0
    disk_kind: str | None = None
    lookups: int = 0
    memory_hits: int = 0
    memory_hit_tokens: int = 0
    disk_hits: int = 0
    disk_hit_tokens: int = 0

    def count(self, tier: str | None, tokens: int) -> None:
        self.lookups += 1
        if tier == "memory":
            self.memory_hits += 1
            self.memory_hit_tokens += tokens
        elif tier == "disk":
            self.disk_hits += 1
            self.disk_hit_tokens += tokens


@dataclass(frozen=True)
class Reused:
    """A copy of cached state covering the first ``tokens`` tokens of a prompt."""

    cache: list[Any]
    tokens: int


class PrefixCache:
    """At most ``max_entries`` sequences' KV state (0: off) in at most ``max_bytes``; with
    ``evicts`` False (ranks other than 0) the bounds are left to ``trim``."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int = UNBOUNDED,
        *,
        evicts: bool = True,
        disk: DiskTier | None = None,
        layout: CacheLayout | None = None,
        stats: PromptCacheStats | None = None,
    ):
        self._lru = None
        if max_entries:
            bounds = (max_entries, max_bytes) if evicts else (UNBOUNDED, UNBOUNDED)
            self._lru = LRUPromptCache(max_size=bounds[0], max_bytes=bounds[1])
        self._disk = DiskPrefixes(disk, layout) if disk is not None and layout is not None else None
        self._kept_whole = layout is not None and layout.kind == "snapshots"
        # Only rank 0 (the one that evicts) decides, so only its lookups count.
        self._stats = stats if evicts else None
        if self._stats is not None:
            self._stats.disk_kind = layout.kind if self._disk else None
            self._note_memory()

    def __len__(self) -> int:
        return len(self._lru) if self._lru is not None else 0

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes if self._lru is not None else 0

    @property
    def disk(self) -> DiskTier | None:
        return self._disk.tier if self._disk else None

    @property
    def boundaries_kept(self) -> bool:
        """Whether the decoders put a sequence's state here at its boundaries as they pass them
        (caches that cannot be cut back to a boundary later)."""
        return self._kept_whole and (self._lru is not None or self._disk is not None)

    def take(self, prompt: list[int], exactly: int | None = None) -> Reused | None:
        """Cached state for the longest prefix of ``prompt`` short of its last token, or for
        ``exactly`` that many tokens (rank 0's choice: from memory where it holds them, else from
        what this rank ``offer``ed from disk); None when nothing is reused. Memory first; alone,
        the disk tier where it holds more of the prompt."""
        limit = len(prompt) - 1 if exactly is None else exactly
        found = self._take_from_memory(prompt, limit) if limit > 0 else None
        have = found.tokens if found else 0
        if exactly is None:
            from_disk = self._disk.take(prompt, have) if self._disk else None
            if from_disk:
                return self._counted(Reused(*from_disk), "disk")
            return self._counted(found, "memory")
        if have == exactly:
            return self._counted(found, "memory")
        offered = self._disk.take_offered(prompt, exactly) if self._disk else None
        if offered is None:
            raise PrefixCacheMismatch(f"rank 0 reused {exactly} cached prompt tokens, this rank has {have}")
        return self._counted(Reused(*offered), "disk")

    def _counted(self, reused: Reused | None, tier: str) -> Reused | None:
        if self._stats is not None:
            self._stats.count(tier if reused else None, reused.tokens if reused else 0)
        return reused

    def memory_tokens(self, prompt: list[int]) -> int:
        """How many tokens of ``prompt`` memory would supply (what ``take`` reuses without disk)."""
        found = self._take_from_memory(prompt, len(prompt) - 1) if len(prompt) > 1 else None
        return found.tokens if found else 0

    def offer(self, prompt: list[int], limit: int | None = None, beyond: int = 0) -> int:
        """How many of the prompt's leading tokens (at most ``limit``; short of its last) this rank
        read and checked on disk, kept for the ``take`` that follows: the answer to a ``Probe``, or
        rank 0's own offer, where its disk holds more than ``beyond`` (what memory holds; 0
        otherwise)."""
        if self._disk is None or len(prompt) < 2:
            return 0
        return self._disk.offer(prompt, len(prompt) - 1 if limit is None else limit, beyond)

    def _take_from_memory(self, prompt: list[int], limit: int) -> Reused | None:
        """The longest prefix memory holds of ``prompt``'s first ``limit`` tokens."""
        if self._lru is None:
            return None
        query = prompt[: limit + 1]
        cache, rest = self._lru.fetch_nearest_cache(_KEY, query)
        if cache is None:
            return None
        if not rest:  # an entry equal to the query: give back its last token to compute
            if not can_trim_prompt_cache(cache):
                return None
            trim_prompt_cache(cache, 1)
            rest = query[-1:]
        return Reused(cache, len(query) - len(rest))

    def put(self, tokens: list[int], cache: list[Any], boundaries: Sequence[int] = ()) -> None:
        """Keep ``cache``, the KV state of ``tokens``, evicting the least recently added if need be;
        its whole blocks, and snapshots at ``boundaries`` and where it ends, go to the disk tier."""
        if self._lru is not None and tokens:
            self._lru.insert_cache(_KEY, list(tokens), cache)
        if self._disk is not None and tokens:
            self._disk.spill(list(tokens), cache, boundaries)
        self._note_memory()

    def put_boundary(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep a copy of ``cache`` (which goes on changing) as the state after ``tokens``, a
        boundary the sequence passed (``boundaries_kept``)."""
        self.put(tokens, copy.deepcopy(cache))

    def trim(self, entries: int) -> None:
        """Evict the least recently added entries down to ``entries`` (followers follow rank 0)."""
        if self._lru is not None:
            self._lru.trim_to(n_sequences=entries)
        self._note_memory()

    def _note_memory(self) -> None:
        if self._stats is not None:
            self._stats.memory_entries, self._stats.memory_bytes = len(self), self.nbytes
