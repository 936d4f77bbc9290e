"""The master's status document (``GET /api/v1/status``) and event history, as typed documents.

The master builds a ``ClusterStatus`` and sends ``to_json()``; ``genmlx status``, ``get``,
``describe``, ``apply --wait`` and ``mesh plan`` read it back with ``ClusterStatus.from_json``.
Conditions follow Kubernetes (``type``, ``status``, ``reason``, ``message``,
``lastTransitionTime``); times are ISO 8601 in UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from genmlx.wire.agent_state import NodeFacts, PromptCacheTier, RankInfo, StorageReport, Transfer
from genmlx.wire.codec import WireType
from genmlx.wire.links import LinkCheck

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Revision(WireType):
    """The git commit a manifest file was read at, and whether the file differed from it."""

    commit: str
    dirty: bool  # the file has uncommitted changes, or is not tracked at all

    def __str__(self) -> str:
        return self.commit[:12] + ("-dirty" if self.dirty else "")


@dataclass(frozen=True)
class ConditionReport(WireType):
    type: str  # "Ready", "Reconciling", "Stalled", "Degraded", ...
    status: ConditionStatus
    reason: str
    message: str
    last_transition_time: str | None = None
    issues: tuple[str, ...] = ()  # a Stalled cluster's manifest errors, every one


@dataclass(frozen=True)
class NodeStatus(WireType):
    """A declared node: its conditions and what its agent last reported (nothing while unreachable)."""

    name: str
    conditions: tuple[ConditionReport, ...]
    address: str | None = None
    facts: NodeFacts | None = None
    storage: tuple[StorageReport, ...] = ()
    ranks: tuple[RankInfo, ...] = ()
    transfers: tuple[Transfer, ...] = ()


@dataclass(frozen=True)
class ModelRank(RankInfo):
    """A rank of the model and the node that runs it."""

    node: str = ""


@dataclass(frozen=True)
class ModelCopy(WireType):
    """A complete copy of the model on a node, with the commit it holds."""

    node: str
    path: str
    size_bytes: int
    commit: str | None = None


@dataclass(frozen=True)
class ModelPromptCache(WireType):
    """A model's prompt cache on one node's disk, as its agent measured it last."""

    node: str
    bytes: int
    blocks: int


@dataclass(frozen=True)
class ModelBatching(WireType):
    """How many requests the model's ranks decode together and how many more may wait, and why:
    as the manifest set them, or as its nodes' memory allows."""

    max_batch: int
    max_queue: int
    reason: str


@dataclass(frozen=True)
class ModelStatus(WireType):
    name: str
    source: str
    revision: str
    nodes: tuple[str, ...]
    parallelism: str
    phase: str  # Ready, Progressing, Waiting, Blocked, Backoff
    conditions: tuple[ConditionReport, ...]
    endpoint: str | None = None  # rank 0's base URL once checked
    ranks: tuple[ModelRank, ...] = ()
    copies: tuple[ModelCopy, ...] = ()
    prompt_caches: tuple[ModelPromptCache, ...] = ()  # its disk tier on each node that has one
    prompt_cache: tuple[PromptCacheTier, ...] = ()  # each tier as rank 0 of the serving group counts it
    batching: ModelBatching | None = None  # once placement has checked its nodes' memory


@dataclass(frozen=True)
class AnnouncedAgent(WireType):
    """An agent that announces itself on zeroconf, or joined with a join code."""

    name: str
    address: str  # "ip:port" of its API
    node_id: str
    version: str
    storage: tuple[str, ...] = ()  # its storage paths, where known (it joined): for the YAML to add


@dataclass(frozen=True)
class ImpostorReport(WireType):
    """Something that announces a declared node's name but cannot prove it holds the cluster
    token: never sent anything that reveals state, never acted on."""

    name: str
    address: str
    message: str


@dataclass(frozen=True)
class TokenRotationReport(WireType):
    """A rotation of the cluster token whose grace window is open."""

    previous_until: str  # when the old token stops counting
    nodes_on_previous_token: tuple[str, ...]
    manual: bool  # the new token is copied to the nodes by hand, not pushed


@dataclass(frozen=True)
class LastPass(WireType):
    at: str
    duration_seconds: float
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class LinkEndStatus(WireType):
    """One end of a planned Thunderbolt link and what its last check from there found."""

    node: str
    address: str  # the planned one
    interface: str | None = None
    last_check: LinkCheck | None = None


@dataclass(frozen=True)
class LinkStatus(WireType):
    """A cable of the mesh plan that the node facts show, verified from both ends: unaddressed where
    an end lacks its planned address (``genmlx mesh apply``), else down where either end could not
    reach the other, up where both could, unchecked before both have been.
    ``warning`` names a measured bandwidth below what its kind of link should carry."""

    subnet: str
    state: Literal["up", "down", "unaddressed", "unchecked"]
    ends: tuple[LinkEndStatus, ...]
    expected_gbit_s: float | None = None
    warning: str = ""


@dataclass(frozen=True)
class ClusterStatus(WireType):
    """The whole status document. ``conditions[0]`` is the cluster's ``Ready``."""

    generation: int
    observed_generation: int
    conditions: tuple[ConditionReport, ...]
    name: str | None = None  # None until a manifest is applied
    last_applied_revision: Revision | None = None
    last_attempted_revision: Revision | None = None
    manifest_file: str | None = None
    applied_at: str | None = None
    nodes: tuple[NodeStatus, ...] = ()
    models: tuple[ModelStatus, ...] = ()
    unmanaged_agents: tuple[AnnouncedAgent, ...] = ()  # announced, not in the manifest: never used
    impostors: tuple[ImpostorReport, ...] = ()  # announced a declared node's name, proved nothing
    token_rotation: TokenRotationReport | None = None
    links: tuple[LinkStatus, ...] = ()  # the cabled Thunderbolt links and their last checks
    pending_actions: tuple[str, ...] = ()
    last_pass: LastPass | None = None

    def node(self, name: str) -> NodeStatus | None:
        return next((n for n in self.nodes if n.name == name), None)

    def model(self, name: str) -> ModelStatus | None:
        return next((m for m in self.models if m.name == name), None)


@dataclass(frozen=True)
class EventObject(WireType):
    kind: Literal["Cluster", "Node", "Model"]
    name: str


@dataclass(frozen=True)
class EventReport(WireType):
    """One entry of ``GET /api/v1/events``: a condition change or an action, repeats counted."""

    object: EventObject
    type: Literal["Normal", "Warning"]
    reason: str
    message: str
    count: int
    first_timestamp: str
    last_timestamp: str
