"""How the ranks of a group agree on what the prompt cache's disk tier supplies.

Each rank keeps its own shard of every block on its own disk, and disks can differ (a block
evicted on one rank, damaged on another). So rank 0, when its disk holds more of a prompt than
memory does, first asks: it sends a ``Probe`` (the prompt and how many blocks it read and checked),
every rank reads and checks its own blocks and answers in the next message's header, and the
request joins with the blocks every rank has: a rank that cannot read its block makes them a miss
for the whole group. Memory needs no such question: its entries are the same on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

from genmlx.dispatcher.engine.decoding import Decoder
from genmlx.dispatcher.engine.lockstep import Heartbeat, Probe, RankChannel


def agree_on_disk(channel: RankChannel | None, decoder: Decoder, prompt: Sequence[int]) -> int | None:
    """Rank 0 of a group: how many prompt tokens every rank reuses, where its disk tier may supply
    more than memory; None where it cannot (or the rank is alone), and the join asks as always."""
    if channel is None:
        return None
    tokens = list(prompt)
    memory = decoder.memory_tokens(tokens)
    offered = decoder.offer_disk(tokens, beyond=memory)
    if not offered:
        return None
    entries = decoder.cache_entries
    channel.send(Probe(tuple(tokens), offered), entries)
    answers = channel.send(Heartbeat(), entries)  # its header carries every rank's answer
    return max(min(offered, *answers[1:]), memory)
