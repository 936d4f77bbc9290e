"""Actions: the small frozen steps a plan is made of. The executor carries them out."""

from __future__ import annotations

from dataclasses import dataclass

from genmlx.wire.agent_state import FetchRequest
from genmlx.wire.rank_launch import RankLaunch


@dataclass(frozen=True)
class StartRankGroup:
    """Start every rank of a model at once (MLX ranks cannot join a running group)."""

    model: str
    spec_hash: str
    launches: tuple[tuple[str, RankLaunch], ...]  # (node, launch), rank order

    def describe(self) -> str:
        where = ", ".join(f"rank {launch.rank} on {node}:{launch.port}" for node, launch in self.launches)
        return f"+ start {self.model}{self.split()} ({where})"

    def split(self) -> str:
        """How the ranks share the model, for a group of more than one: ", pipeline parallel 24/8"."""
        first = self.launches[0][1]
        if first.world_size == 1:
            return ""
        layers = "/".join(map(str, first.layer_split)) if first.layer_split else ""
        return f", {first.parallelism} parallel{' ' + layers if layers else ''}"


@dataclass(frozen=True)
class StopRankGroup:
    """Stop ranks of a model: a whole group, or ranks nothing wants any more."""

    model: str
    ranks: tuple[tuple[str, int], ...]  # (node, rank)
    reason: str

    def describe(self) -> str:
        where = ", ".join(f"rank {rank} on {node}" for node, rank in self.ranks)
        return f"- stop {self.model} ({where}): {self.reason}"


@dataclass(frozen=True)
class FetchModel:
    """Make a model present on a node: download it from its source, or copy it from a peer."""

    node: str
    request: FetchRequest

    def describe(self) -> str:
        request = self.request
        where = f"{self.node}:{request.storage_path}"
        if request.peer is not None:
            return f"+ sync {request.model} to {where} from {request.peer}"
        return f"+ download {request.model} to {where} from {request.source}@{request.revision}"


@dataclass(frozen=True)
class DeleteModel:
    """Prune a copy GenMLX made of a model from a node that no longer needs it."""

    node: str
    storage_path: str
    model: str  # the directory's name: the (former) manifest model name
    reason: str

    def describe(self) -> str:
        return f"- prune {self.model} from {self.node}:{self.storage_path}: {self.reason}"


Action = StartRankGroup | StopRankGroup | FetchModel | DeleteModel


def describe_plan(actions: list[Action]) -> list[str]:
    """One line per change, as `genmlx apply` and `genmlx diff` print it: ``+`` create, ``~``
    change (a group stopped and started again), ``-`` remove."""
    restarted = {a.model for a in actions if isinstance(a, StartRankGroup)} & {
        a.model for a in actions if isinstance(a, StopRankGroup)
    }
    lines = []
    for action in actions:
        if isinstance(action, StopRankGroup) and action.model in restarted:
            lines.append(f"~ restart {action.model}: {action.reason}")
        elif not (isinstance(action, StartRankGroup) and action.model in restarted):
            lines.append(action.describe())
    return lines


def plan_summary(lines: list[str]) -> str:
    """The closing line: how many creations, changes and removals."""
    counts = {sign: sum(line.startswith(sign) for line in lines) for sign in "+~-"}
    return f"{counts['+']} to create, {counts['~']} to change, {counts['-']} to remove"
