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

With a ``DiskTier`` (a rank alone, whose every layer keeps a plain ``KVCache``), a sequence put
here also leaves its whole blocks of tokens on disk, and a prompt whose leading blocks are on disk
beyond what memory holds is read back from there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import (
    KVCache,
    LRUPromptCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)

from genmlx.dispatcher.engine.disk_tier import DiskTier, block_keys

log = logging.getLogger(__name__)

_KEY = "model"  # LRUPromptCache keys entries by model too; a dispatcher serves one
UNBOUNDED = 1 << 62


class PrefixCacheMismatch(Exception):
    """This rank cannot reuse the prefix rank 0 reused: the ranks' caches differ."""


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
        layers: int = 0,
    ):
        self._lru = None
        if max_entries:
            bounds = (max_entries, max_bytes) if evicts else (UNBOUNDED, UNBOUNDED)
            self._lru = LRUPromptCache(max_size=bounds[0], max_bytes=bounds[1])
        self._disk = disk
        self._layers = layers  # the model's, for the caches read back from disk
        # The prompt tokens and checked blocks of the last ``offer``, for the ``take`` after it.
        self._offered: tuple[tuple[int, ...], list[dict[str, mx.array]]] | None = None

    def __len__(self) -> int:
        return len(self._lru) if self._lru is not None else 0

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes if self._lru is not None else 0

    @property
    def disk(self) -> DiskTier | None:
        return self._disk

    def take(self, prompt: list[int], exactly: int | None = None) -> Reused | None:
        """Cached state for the longest prefix of ``prompt`` short of its last token, or for
        ``exactly`` that many tokens (rank 0's choice: from memory where it holds them, else from
        the disk blocks this rank ``offer``ed); None when nothing is reused. Memory first; alone,
        the disk tier where it holds more of the prompt."""
        limit = len(prompt) - 1 if exactly is None else exactly
        found = self._take_from_memory(prompt, limit) if limit > 0 else None
        if exactly is None:
            from_disk = self._take_from_disk(prompt, found.tokens if found else 0) if self._disk else None
            return from_disk or found
        if (found.tokens if found else 0) == exactly:
            return found
        offered = self._offered_blocks(prompt, exactly)
        if offered is None:
            have = found.tokens if found else 0
            raise PrefixCacheMismatch(f"rank 0 reused {exactly} cached prompt tokens, this rank has {have}")
        return Reused(caches_from_blocks(offered, self._layers), exactly)

    def memory_tokens(self, prompt: list[int]) -> int:
        """How many tokens of ``prompt`` memory would supply (what ``take`` reuses without disk)."""
        found = self._take_from_memory(prompt, len(prompt) - 1) if len(prompt) > 1 else None
        return found.tokens if found else 0

    def offer(self, prompt: list[int], blocks: int | None = None) -> int:
        """How many of the prompt's leading disk blocks (at most ``blocks``; short of its last
        token) this rank has read and checked, kept for the ``take`` that follows: the answer to a
        ``Probe``, or rank 0's own offer, where its disk holds more than memory (0 otherwise)."""
        self._offered = None
        if self._disk is None or len(prompt) < 2:
            return 0
        size = self._disk.settings.block_tokens
        keys = block_keys(self._disk.settings.root.name, prompt[: len(prompt) - 1], size)[:blocks]
        run = self._disk.cached_run(keys)
        if blocks is None and run * size <= self.memory_tokens(prompt):
            return 0
        loaded = self._disk.load(keys[:run])
        if loaded:
            self._offered = (tuple(prompt[: len(loaded) * size]), loaded)
        return len(loaded)

    def _offered_blocks(self, prompt: list[int], tokens: int) -> list[dict[str, mx.array]] | None:
        if self._offered is None or self._disk is None or tokens % self._disk.settings.block_tokens:
            return None
        covered, blocks = self._offered
        self._offered = None
        if len(covered) < tokens or tuple(prompt[:tokens]) != covered[:tokens]:
            return None
        used = blocks[: tokens // self._disk.settings.block_tokens]
        self._disk.count_hit(len(used))
        return used

    def _take_from_disk(self, prompt: list[int], beyond: int) -> Reused | None:
        """The prompt's leading whole blocks from disk, where they cover more than ``beyond``."""
        disk = self._disk
        keys = block_keys(disk.settings.root.name, prompt[: len(prompt) - 1], disk.settings.block_tokens)
        run = disk.cached_run(keys)
        if run * disk.settings.block_tokens <= beyond:
            return None
        blocks = disk.load(keys[:run])  # short of a block found damaged or gone
        if len(blocks) * disk.settings.block_tokens <= beyond:
            return None
        disk.count_hit(len(blocks))
        return Reused(caches_from_blocks(blocks, self._layers), len(blocks) * disk.settings.block_tokens)

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

    def put(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep ``cache``, the KV state of ``tokens``, evicting the least recently added if need be;
        its whole blocks go to the disk tier too."""
        if self._lru is not None and tokens:
            self._lru.insert_cache(_KEY, list(tokens), cache)
        if self._disk is not None and tokens and plain_kv(cache):
            self._spill(list(tokens), cache)

    def _spill(self, tokens: list[int], cache: list[KVCache]) -> None:
        """Queue the blocks of ``tokens`` the disk lacks, sliced from ``cache``."""
        disk, size = self._disk, self._disk.settings.block_tokens
        covered = tokens[: min(len(tokens), *(layer.offset for layer in cache))]
        keys = block_keys(disk.settings.root.name, covered, size)
        for index in disk.absent(keys):
            window = slice(index * size, (index + 1) * size)
            arrays = {}
            for i, layer in enumerate(cache):
                arrays[f"layers.{i}.keys"] = layer.keys[..., window, :]
                arrays[f"layers.{i}.values"] = layer.values[..., window, :]
            disk.store(keys[index], arrays)

    def trim(self, entries: int) -> None:
        """Evict the least recently added entries down to ``entries`` (followers follow rank 0)."""
        if self._lru is not None:
            self._lru.trim_to(n_sequences=entries)


def disk_tier_for(model: Any, tier: DiskTier | None) -> DiskTier | None:
    """``tier`` where ``model`` keeps plain KV caches, which the disk tier stores in blocks."""
    if tier is not None and not plain_kv(make_prompt_cache(model)):
        log.warning("the prompt cache's disk tier is off: this model's caches are not plain KV caches")
        return None
    return tier


def plain_kv(cache: list[Any]) -> bool:
    """Whether every layer keeps a plain ``KVCache``: the caches the disk tier stores in blocks."""
    return bool(cache) and all(type(layer) is KVCache for layer in cache)


def caches_from_blocks(blocks: list[dict[str, mx.array]], layers: int) -> list[KVCache]:
    """One ``KVCache`` per layer holding the blocks' keys and values, in order."""
    caches = []
    for i in range(layers):
        cache = KVCache()
        keys = mx.concatenate([block[f"layers.{i}.keys"] for block in blocks], axis=2)
        values = mx.concatenate([block[f"layers.{i}.values"] for block in blocks], axis=2)
        cache.state = (keys, values, keys.shape[2])
        caches.append(cache)
    mx.eval([c.keys_and_values() for c in caches])
    return caches
