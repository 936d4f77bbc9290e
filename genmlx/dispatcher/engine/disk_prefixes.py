"""What the prefix cache finds on its disk tier, and what it leaves there: runs of whole blocks,
and boundary snapshots after them.

Whole blocks hold 256 tokens each, so a prompt found only by them recomputes up to 255 tokens. At
the boundaries conversations share, the cache also stores a snapshot of the partial block up to
that token (its key: the last whole block's key and the snapshot's tokens): where a sequence's
prompt ends (less its last token, which is always recomputed) and where the sequence itself ended
(the next turn of the conversation starts with it). A prompt then reuses its longest run of whole
blocks plus the longest snapshot stored after them.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from genmlx.dispatcher.engine.disk_tier import DiskTier, block_keys

Segment = tuple[int, dict[str, mx.array]]  # the tokens a block or snapshot covers, and its arrays


def snapshot_key(previous: str, tokens: Sequence[int]) -> str:
    """The key of a snapshot of ``tokens`` right after the block (or namespace) keyed ``previous``."""
    packed = struct.pack(f"<{len(tokens)}q", *tokens)
    return hashlib.sha256(previous.encode() + b"|snapshot|" + packed).hexdigest()


@dataclass(frozen=True)
class Planned:
    """What the disk holds of a prompt: the keys of its run of whole blocks, and the key and
    length of the longest snapshot after them."""

    keys: list[str]
    snapshot: tuple[str, int] | None
    block_tokens: int

    @property
    def tokens(self) -> int:
        return len(self.keys) * self.block_tokens + (self.snapshot[1] if self.snapshot else 0)


class DiskPrefixes:
    """The prefix cache's side of a ``DiskTier``, for a model of ``layers`` plain KV caches."""

    def __init__(self, tier: DiskTier, layers: int):
        self.tier = tier
        self._layers = layers
        self._size = tier.settings.block_tokens
        self._namespace = tier.settings.root.name
        # The prompt and checked segments of the last ``offer``, for the ``take_offered`` after it.
        self._offered: tuple[tuple[int, ...], list[Segment]] | None = None

    def plan(self, prompt: Sequence[int], limit: int) -> Planned:
        """What the disk holds of ``prompt``'s first ``limit`` tokens (nothing read yet)."""
        keys = block_keys(self._namespace, prompt[:limit], self._size)
        keys = keys[: self.tier.cached_run(keys)]
        previous = keys[-1] if keys else self._namespace
        rest = prompt[len(keys) * self._size : limit]
        for count in range(min(self._size - 1, len(rest)), 0, -1):
            key = snapshot_key(previous, rest[:count])
            if self.tier.holds(key):
                return Planned(keys, (key, count), self._size)
        return Planned(keys, None, self._size)

    def load(self, planned: Planned) -> list[Segment]:
        """The planned segments, each read and checked, up to the first that is not."""
        segments: list[Segment] = [(self._size, block) for block in self.tier.load(planned.keys)]
        if planned.snapshot and len(segments) == len(planned.keys):
            key, count = planned.snapshot
            segments += [(count, block) for block in self.tier.load([key])]
        return segments

    def take(self, prompt: Sequence[int], beyond: int) -> tuple[list[KVCache], int] | None:
        """The caches of the prompt's longest prefix on disk (short of its last token), where it
        is longer than ``beyond``, and its length."""
        planned = self.plan(prompt, len(prompt) - 1)
        if planned.tokens <= beyond:
            return None
        segments = self.load(planned)
        return self._used(segments) if covered(segments) > beyond else None

    def offer(self, prompt: Sequence[int], limit: int, beyond: int = 0) -> int:
        """How many of the prompt's first ``limit`` tokens this rank read and checked on disk, where
        the disk holds more than ``beyond`` (0 otherwise, and nothing read); the segments are kept
        for ``take_offered``."""
        planned = self.plan(prompt, limit)
        if planned.tokens <= beyond:
            self._offered = None
            return 0
        segments = self.load(planned)
        self._offered = (tuple(prompt[: covered(segments)]), segments) if segments else None
        return covered(segments)

    def take_offered(self, prompt: Sequence[int], tokens: int) -> tuple[list[KVCache], int] | None:
        """The caches of exactly ``tokens`` of ``prompt`` from the last offer; None where it did
        not hold them (a run that ends elsewhere, another prompt)."""
        offered, self._offered = self._offered, None
        if offered is None or tuple(prompt[:tokens]) != offered[0][:tokens]:
            return None
        used, total = [], 0
        for segment in offered[1]:
            if total >= tokens:
                break
            used.append(segment)
            total += segment[0]
        return self._used(used) if total == tokens else None

    def spill(self, tokens: Sequence[int], cache: list[KVCache], boundaries: Sequence[int]) -> None:
        """Queue the whole blocks of ``tokens`` the disk lacks, and a snapshot at each of
        ``boundaries`` and at the end, all sliced from ``cache`` (whose state covers them)."""
        covered_tokens = tokens[: min(len(tokens), *(layer.offset for layer in cache))]
        keys = block_keys(self._namespace, covered_tokens, self._size)
        for index in self.tier.absent(keys):
            self.tier.store(keys[index], sliced(cache, index * self._size, (index + 1) * self._size))
        for boundary in sorted({*boundaries, len(covered_tokens)}):
            whole = boundary // self._size
            if not 0 < boundary <= len(covered_tokens) or boundary % self._size == 0:
                continue
            previous = keys[whole - 1] if whole else self._namespace
            key = snapshot_key(previous, covered_tokens[whole * self._size : boundary])
            if self.tier.absent([key]):
                self.tier.store(key, sliced(cache, whole * self._size, boundary))

    def _used(self, segments: list[Segment]) -> tuple[list[KVCache], int]:
        tokens = covered(segments)
        self.tier.count_hit(tokens)
        return caches_from_segments(segments, self._layers), tokens


def covered(segments: Sequence[Segment]) -> int:
    return sum(count for count, _ in segments)


def sliced(cache: list[KVCache], start: int, end: int) -> dict[str, mx.array]:
    """Every layer's keys and values of positions ``start`` to ``end``."""
    arrays = {}
    for i, layer in enumerate(cache):
        arrays[f"layers.{i}.keys"] = layer.keys[..., start:end, :]
        arrays[f"layers.{i}.values"] = layer.values[..., start:end, :]
    return arrays


def caches_from_segments(segments: Sequence[Segment], layers: int) -> list[Any]:
    """One ``KVCache`` per layer holding the segments' keys and values, in order."""
    caches = []
    for i in range(layers):
        cache = KVCache()
        keys = mx.concatenate([block[f"layers.{i}.keys"] for _, block in segments], axis=2)
        values = mx.concatenate([block[f"layers.{i}.values"] for _, block in segments], axis=2)
        cache.state = (keys, values, keys.shape[2])
        caches.append(cache)
    mx.eval([c.keys_and_values() for c in caches])
    return caches
