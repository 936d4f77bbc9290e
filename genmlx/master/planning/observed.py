"""Observed state: what the agents and dispatchers reported at the start of a pass.

Frozen data, built once per pass by ``observe`` and read by the pure planner and by status.
Time and the master's own memory of past rollouts come in here as data, so ``plan`` needs no
clock and no globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from genmlx.wire.agent_state import AgentState, RankInfo

NodeReachability = Literal["ready", "unreachable", "unauthorized", "clock-skew"]
EndpointState = Literal["ready", "loading", "down", "hung"]


@dataclass(frozen=True)
class ObservedNode:
    name: str
    address: str  # "host:port" of its agent
    reachability: NodeReachability
    detail: str = ""  # why it is not ready
    state: AgentState | None = None

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def ranks(self) -> tuple[RankInfo, ...]:
        return self.state.ranks if self.state else ()


@dataclass(frozen=True)
class EndpointHealth:
    """What rank 0's ``GET /health`` and the canary completion said: ``ready`` only when both
    passed, ``hung`` when /health answers but a completion does not."""

    url: str
    state: EndpointState
    detail: str = ""


@dataclass(frozen=True)
class RolloutRecord:
    """The master's memory of its last start of a model's rank group (lost on restart: fine)."""

    spec_hash: str
    attempts: int  # starts since the group last served
    last_start: float  # unix time


@dataclass(frozen=True)
class BackendFailure:
    """The master's memory of a model's group that could not start on a faster backend than ring
    (jaccl, nccl): kept until the facts it was planned from change or the manifest is applied
    again (lost on restart, which tries again: fine)."""

    backend: str  # "jaccl", "jaccl-ring" or "nccl"
    fingerprint: str  # ``backends.backend_fingerprint`` of the nodes when it was planned
    node: str  # where it failed
    error: str  # what the rank's log or the agent's refusal said
    spec_hash: str  # of the group that failed

    def describe(self) -> str:
        return f"{self.backend} failed to start on {self.node}: {self.error}"


@dataclass(frozen=True)
class Impostor:
    """Something at ``address`` that announces itself as node ``name`` but could not prove that it
    holds the cluster token: nothing that reveals state and no action is ever sent to it."""

    name: str
    address: str
    detail: str


@dataclass(frozen=True)
class Observed:
    now: float
    nodes: dict[str, ObservedNode] = field(default_factory=dict)
    endpoints: dict[str, EndpointHealth] = field(default_factory=dict)  # by model name
    rollouts: dict[str, RolloutRecord] = field(default_factory=dict)  # by model name
    backend_failures: dict[str, BackendFailure] = field(default_factory=dict)  # by model name
    # Thunderbolt cables whose last check found them down: (node, node), names in order -> why.
    links_down: dict[tuple[str, str], str] = field(default_factory=dict)
    impostors: tuple[Impostor, ...] = ()
