"""What the prefix cache finds on its disk tier, and what it leaves there.

For caches stored in blocks (``cache_layout``): runs of whole blocks, and boundary snapshots after
them. Whole blocks hold 256 tokens each, so a prompt found only by them recomputes up to 255
tokens. At the boundaries conversations share, the cache also stores a snapshot of the partial
block up to that token (its key: the last whole block's key and the snapshot's tokens): where a
sequence's prompt ends (less its last token, which is always recomputed) and where the sequence
itself ended (the next turn of the conversation starts with it). A prompt then reuses its longest
run of whole blocks plus the longest snapshot stored after them.

For caches stored as whole-state snapshots, each snapshot is the complete state after its tokens,
keyed the same way and named with its length; the decoders put one at each boundary as they pass
it and one where the sequence ends. A prompt reuses the longest snapshot of any of its prefixes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from genmlx.dispatcher.engine.cache_layout import (
    CacheLayout,
    cache_from_blocks,
    cache_from_state,
    covered_tokens,
    sliced,
    state_arrays,
)
from genmlx.dispatcher.engine.disk_tier import DiskTier, Record, block_keys

log = logging.getLogger(__name__)
Segment = tuple[int, Record]  # the tokens a block or snapshot covers, and what the disk held


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
    """The prefix cache's side of a ``DiskTier``, for a model's caches as ``layout`` describes them."""

    def __init__(self, tier: DiskTier, layout: CacheLayout):
        self.tier = tier
        self.layout = layout
        self._size = tier.settings.block_tokens
        self._namespace = tier.settings.root.name
        # The prompt and checked segments of the last ``offer``, for the ``take_offered`` after it.
        self._offered: tuple[tuple[int, ...], list[Segment]] | None = None
        log.info("the prompt cache's disk tier keeps %s", layout.describe())

    def plan(self, prompt: Sequence[int], limit: int) -> Planned:
        """What the disk holds of ``prompt``'s first ``limit`` tokens (nothing read yet)."""
        chain = block_keys(self._namespace, prompt[:limit], self._size)
        if self.layout.kind == "snapshots":
            for length in self._snapshot_lengths(limit):
                key = self._snapshot_key(prompt, length, chain)
                if self.tier.holds(key):
                    return Planned([], (key, length), self._size)
            return Planned([], None, self._size)
        keys = chain[: self.tier.cached_run(chain)]
        rest = prompt[len(keys) * self._size : limit]
        for count in range(min(self._size - 1, len(rest)), 0, -1):
            key = self._snapshot_key(prompt, len(keys) * self._size + count, keys)
            if self.tier.holds(key):
                return Planned(keys, (key, count), self._size)
        return Planned(keys, None, self._size)

    def load(self, planned: Planned) -> list[Segment]:
        """The planned segments, each read and checked, up to the first that is not."""
        segments: list[Segment] = []
        for record in self.tier.load(planned.keys):
            if not self._fits(record):
                break
            segments.append((self._size, record))
        if planned.snapshot and len(segments) == len(planned.keys):
            key, count = planned.snapshot
            segments += [(count, record) for record in self.tier.load([key]) if self._fits(record)]
        return segments

    def take(self, prompt: Sequence[int], beyond: int) -> tuple[list[Any], int] | None:
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

    def take_offered(self, prompt: Sequence[int], tokens: int) -> tuple[list[Any], int] | None:
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

    def spill(self, tokens: Sequence[int], cache: list[Any], boundaries: Sequence[int]) -> None:
        """Keep on disk what ``cache``, the state after ``tokens``, holds: its whole blocks the
        disk lacks and a snapshot at each of ``boundaries`` and at the end, sliced from it; or,
        for whole-state snapshots, the state itself (the decoders put the boundaries' own)."""
        held = min(len(tokens), covered_tokens(cache) or 0)
        if self.layout.kind == "snapshots":
            if held == len(tokens) and held > 0:  # the state must be of exactly these tokens
                self._store_state(tokens, cache)
            return
        held_tokens = tokens[:held]
        keys = block_keys(self._namespace, held_tokens, self._size)
        meta = {"cache": self.layout.block_format}
        for index in self.tier.absent(keys):
            self.tier.store(keys[index], sliced(cache, index * self._size, (index + 1) * self._size), meta)
        for boundary in sorted({*boundaries, held}):
            if not 0 < boundary <= held or boundary % self._size == 0:
                continue
            key = self._snapshot_key(held_tokens, boundary, keys)
            if self.tier.absent([key]):
                whole = boundary // self._size * self._size
                self.tier.store(key, sliced(cache, whole, boundary), meta)

    def _store_state(self, tokens: Sequence[int], cache: list[Any]) -> None:
        key = self._snapshot_key(tokens, len(tokens), block_keys(self._namespace, tokens, self._size))
        if not self.tier.absent([key]):
            return
        try:
            arrays, meta = state_arrays(cache)
        except ValueError as e:
            log.warning("the prompt cache cannot keep this model's state on disk: %s", e)
            return
        self.tier.store(key, arrays, meta)

    def _snapshot_key(self, prompt: Sequence[int], length: int, chain: Sequence[str]) -> str:
        """The key of a snapshot of ``prompt``'s first ``length`` tokens, ``chain`` holding (at
        least) the keys of its whole blocks; a whole-state snapshot's ends in its length."""
        whole = length // self._size
        previous = chain[whole - 1] if whole else self._namespace
        key = snapshot_key(previous, prompt[whole * self._size : length])
        return f"{key}-{length}" if self.layout.kind == "snapshots" else key

    def _snapshot_lengths(self, limit: int) -> list[int]:
        """The lengths of the whole-state snapshots on disk up to ``limit``, longest first."""
        lengths = {int(key.rsplit("-", 1)[1]) for key in self.tier.stored() if "-" in key}
        return sorted((n for n in lengths if 0 < n <= limit), reverse=True)

    def _fits(self, record: Record) -> bool:
        """Whether a block or snapshot read back holds this model's caches as this rank keeps
        them (a block of another quantization would decode to wrong values)."""
        if self.layout.kind == "blocks":
            return record[1].get("cache") == self.layout.block_format
        try:
            return tuple(json.loads(record[1]["classes"])) == self.layout.classes
        except (KeyError, TypeError, ValueError):
            return False

    def _used(self, segments: list[Segment]) -> tuple[list[Any], int] | None:
        tokens = covered(segments)
        if self.layout.kind == "snapshots":
            try:
                caches = cache_from_state(*segments[-1][1], self.layout)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                log.warning("a prompt cache snapshot does not fit this model (%s): treated as a miss", e)
                return None
        else:
            caches = cache_from_blocks([(count, record[0]) for count, record in segments], self.layout)
        return caches, tokens


def covered(segments: Sequence[Segment]) -> int:
    return sum(count for count, _ in segments)
