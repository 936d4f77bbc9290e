"""Actions: the small frozen steps a plan is made of. The executor carries them out."""

from __future__ import annotations

from dataclasses import dataclass

from genmlx.node_state import RankLaunch


@dataclass(frozen=True)
class StartRankGroup:
    """Start every rank of a model at once (MLX ranks cannot join a running group)."""

    model: str
    spec_hash: str
    launches: tuple[tuple[str, RankLaunch], ...]  # (node, launch), rank order

    def describe(self) -> str:
        where = ", ".join(f"rank {launch.rank} on {node}:{launch.port}" for node, launch in self.launches)
        return f"+ start {self.model} ({where})"


@dataclass(frozen=True)
class StopRankGroup:
    """Stop ranks of a model: a whole group, or ranks nothing wants any more."""

    model: str
    ranks: tuple[tuple[str, int], ...]  # (node, rank)
    reason: str

    def describe(self) -> str:
        where = ", ".join(f"rank {rank} on {node}" for node, rank in self.ranks)
        return f"- stop {self.model} ({where}): {self.reason}"


Action = StartRankGroup | StopRankGroup
