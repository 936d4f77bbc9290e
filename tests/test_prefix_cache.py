"""The prefix cache on real mlx-lm KV caches: the longest reusable prefix short of the last prompt
token, copies that leave the entry intact, and the rule that keeps other ranks' caches equal to
rank 0's (only rank 0 evicts; the others trim to its entry count)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from genmlx.dispatcher.engine.prefix_cache import PrefixCache, PrefixCacheMismatch

LAYERS = 2


def kv_state(tokens: list[int]) -> list[KVCache]:
    """A two-layer KV cache that has read ``tokens`` (each token's keys and values are its id)."""
    caches = []
    for _ in range(LAYERS):
        cache = KVCache()
        values = mx.array(tokens, dtype=mx.float32).reshape(1, 1, len(tokens), 1)
        cache.update_and_fetch(values, values)
        caches.append(cache)
    return caches


def read_tokens(cache: list[KVCache]) -> list[int]:
    keys, _ = cache[0].keys_and_values()
    return [int(t) for t in keys.reshape(-1).tolist()]


def test_the_longest_shared_prefix_is_reused_short_of_the_last_token() -> None:
    prefixes = PrefixCache(max_entries=4)
    prefixes.put([1, 2, 3, 4, 5], kv_state([1, 2, 3, 4, 5]))
    shared = prefixes.take([1, 2, 3, 9, 9])
    assert shared.tokens == 3 and read_tokens(shared.cache) == [1, 2, 3]
    whole = prefixes.take([1, 2, 3, 4, 5])  # the same prompt: its last token is computed again
    assert whole.tokens == 4 and read_tokens(whole.cache) == [1, 2, 3, 4]
    longer = prefixes.take([1, 2, 3, 4, 5, 6, 7])
    assert longer.tokens == 5
    assert prefixes.take([7, 1, 2]) is None
    assert read_tokens(prefixes.take([1, 2, 3, 4, 5, 6]).cache) == [1, 2, 3, 4, 5]  # entry intact


def test_rank_0_sets_how_much_is_reused_and_a_rank_that_cannot_breaks() -> None:
    prefixes = PrefixCache(max_entries=4)
    prefixes.put([1, 2, 3, 4, 5], kv_state([1, 2, 3, 4, 5]))
    assert prefixes.take([1, 2, 3, 4, 5, 6], exactly=2).tokens == 2
    assert prefixes.take([1, 2, 3], exactly=0) is None
    with pytest.raises(PrefixCacheMismatch):
        prefixes.take([1, 2, 8, 8], exactly=3)
    with pytest.raises(PrefixCacheMismatch):
        PrefixCache(max_entries=0).take([1, 2, 3], exactly=2)


def test_followers_trimmed_to_rank_0s_count_hold_rank_0s_entries() -> None:
    one_entry = sum(c.nbytes for c in kv_state([1, 2, 3]))
    leader = PrefixCache(max_entries=3, max_bytes=2 * one_entry)  # bytes bind before entries
    follower = PrefixCache(max_entries=3, max_bytes=2 * one_entry, evicts=False)
    sequences = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 2, 4]]
    for tokens in sequences:
        for prefixes in (leader, follower):
            prefixes.put(tokens, kv_state(tokens))
    assert len(leader) == 2 and len(follower) == 4
    follower.trim(len(leader))
    for tokens in sequences:
        reused = [p.take([*tokens, 0]) for p in (leader, follower)]
        assert [r and r.tokens for r in reused] == [reused[0] and reused[0].tokens] * 2
    assert leader.take([1, 2, 3, 0]).tokens == 2  # [1, 2, 3] was evicted; [1, 2, 4] shares two


def test_turned_off_it_keeps_nothing() -> None:
    prefixes = PrefixCache(max_entries=0)
    prefixes.put([1, 2, 3], kv_state([1, 2, 3]))
    assert len(prefixes) == 0 and prefixes.take([1, 2, 3, 4]) is None
