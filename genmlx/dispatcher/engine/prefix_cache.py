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
        ``exactly`` that many tokens (rank 0's choice); None when nothing is reused. Memory first;
        the disk tier where it holds more of the prompt."""
        found = self._take_from_memory(prompt, exactly)
        if self._disk is None or exactly is not None:
            return found
        from_disk = self._take_from_disk(prompt, found.tokens if found else 0)
        return from_disk or found

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

    def _take_from_memory(self, prompt: list[int], exactly: int | None) -> Reused | None:
        limit = len(prompt) - 1 if exactly is None else exactly
        if self._lru is None or limit <= 0:
            return self._nothing(exactly)
        query = prompt[: limit + 1]
        cache, rest = self._lru.fetch_nearest_cache(_KEY, query)
        if cache is None:
            return self._nothing(exactly)
        if not rest:  # an entry equal to the query: give back its last token to compute
            if not can_trim_prompt_cache(cache):
                return self._nothing(exactly)
            trim_prompt_cache(cache, 1)
            rest = query[-1:]
        reused = len(query) - len(rest)
        if exactly is not None and reused != exactly:
            raise PrefixCacheMismatch(f"rank 0 reused {exactly} cached prompt tokens, this rank has {reused}")
        return Reused(cache, reused)

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

    @staticmethod
    def _nothing(exactly: int | None) -> None:
        if exactly:
            raise PrefixCacheMismatch(f"rank 0 reused {exactly} cached prompt tokens, this rank has none")
        return None


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
