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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

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

    def __init__(self, max_entries: int, max_bytes: int = UNBOUNDED, *, evicts: bool = True):
        self._lru = None
        if max_entries:
            bounds = (max_entries, max_bytes) if evicts else (UNBOUNDED, UNBOUNDED)
            self._lru = LRUPromptCache(max_size=bounds[0], max_bytes=bounds[1])

    def __len__(self) -> int:
        return len(self._lru) if self._lru is not None else 0

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes if self._lru is not None else 0

    def take(self, prompt: list[int], exactly: int | None = None) -> Reused | None:
        """Cached state for the longest prefix of ``prompt`` short of its last token, or for
        ``exactly`` that many tokens (rank 0's choice); None when nothing is reused."""
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
        """Keep ``cache``, the KV state of ``tokens``, evicting the least recently added if need be."""
        if self._lru is not None and tokens:
            self._lru.insert_cache(_KEY, list(tokens), cache)

    def trim(self, entries: int) -> None:
        """Evict the least recently added entries down to ``entries`` (followers follow rank 0)."""
        if self._lru is not None:
            self._lru.trim_to(n_sequences=entries)

    @staticmethod
    def _nothing(exactly: int | None) -> None:
        if exactly:
            raise PrefixCacheMismatch(f"rank 0 reused {exactly} cached prompt tokens, this rank has none")
        return None
