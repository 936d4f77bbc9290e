"""The reconcile loop: level-triggered passes of observe → plan → execute → status.

Anything that matters (an apply, an agent announcing or leaving, a timer) only wakes the loop;
the pass re-reads everything and the newest manifest always wins. While the cluster has not
converged passes come every second, afterwards every ``resync_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tornado.httpclient import AsyncHTTPClient

from genmlx.core.errors import ManifestError
from genmlx.core.tokens import TokenSource
from genmlx.manifest import load_manifest_text
from genmlx.manifest.types import Manifest
from genmlx.master.planning.actions import Action, FetchModel, StartRankGroup
from genmlx.master.planning.mesh import observed_mesh_nodes
from genmlx.master.planning.observed import Observed, RolloutRecord
from genmlx.master.planning.plan import ModelAssessment, actions_for, assess_models, plan
from genmlx.master.planning.status import (
    Condition,
    carry_all,
    carry_transition,
    cluster_phase_conditions,
    cluster_ready,
    model_phase_conditions,
    model_ready,
    node_conditions,
    node_phase_conditions,
)
from genmlx.master.runtime.agent_client import AgentClient
from genmlx.master.runtime.agent_clients import AgentClients
from genmlx.master.runtime.applied import AppliedManifest, AppliedStore
from genmlx.master.runtime.canary import Canaries
from genmlx.master.runtime.discovery import AgentDiscovery, DiscoveredAgent, with_known
from genmlx.master.runtime.events import EventLog
from genmlx.master.runtime.execute import ActionResult, execute
from genmlx.master.runtime.fallbacks import BackendFailureMemory
from genmlx.master.runtime.link_checks import LinkChecks
from genmlx.master.runtime.observe import observe
from genmlx.master.runtime.rotation import Rotation, push_rotated_token, rotation_under_way
from genmlx.wire.status import LinkStatus, Revision

log = logging.getLogger("genmlx.master")


@dataclass(frozen=True)
class Snapshot:
    """What one pass saw, concluded and did."""

    generation: int
    observed: Observed
    assessments: tuple[ModelAssessment, ...]
    cluster: Condition
    nodes: dict[str, Condition]
    models: dict[str, Condition]  # Ready, by model
    planned: tuple[Action, ...]
    model_phases: dict[str, tuple[Condition, ...]] = field(default_factory=dict)  # the other conditions
    node_phases: dict[str, tuple[Condition, ...]] = field(default_factory=dict)  # the other conditions
    cluster_phases: tuple[Condition, ...] = ()  # Reconciling, Stalled, Degraded of the whole cluster
    results: tuple[ActionResult, ...] = ()
    duration_s: float = 0.0
    errors: tuple[str, ...] = field(default=())
    unmanaged_agents: tuple[DiscoveredAgent, ...] = ()  # announced, but not in the manifest
    rotation: Rotation | None = None  # a token rotation whose grace window is open
    links: tuple[LinkStatus, ...] = ()  # the cabled Thunderbolt links and their last checks


@dataclass(frozen=True)
class RejectedManifest:
    """The newest manifest that failed validation; the last good one keeps serving meanwhile."""

    filename: str
    revision: Revision | None
    issues: tuple[str, ...]
    at: float  # unix time


@dataclass(frozen=True)
class ApplyOutcome:
    applied: AppliedManifest
    changed: bool
    after_pass: int  # passes started before the apply: the next one plans it (``planned``)


class Reconciler:
    def __init__(
        self,
        token: str | TokenSource,
        store: AppliedStore,
        http: AsyncHTTPClient,
        resync_s: float = 5.0,
        busy_resync_s: float = 1.0,
        discovery: AgentDiscovery | None = None,
        known_agents: dict[str, DiscoveredAgent] | None = None,
        events: EventLog | None = None,
    ):
        self.tokens = token if isinstance(token, TokenSource) else TokenSource.fixed(token)
        self._store = store
        self._http = http
        self._resync_s = resync_s
        self._busy_resync_s = busy_resync_s
        self._discovery = discovery
        self.known_agents = known_agents or {}  # found without discovery: its own agent, joined nodes
        self.events = events
        self._pass_listeners: list[Callable[[], None]] = []
        self._wake = asyncio.Event()
        self.clients = AgentClients(self.tokens, http)
        self._rollouts: dict[str, RolloutRecord] = {}
        self._backend_failures = BackendFailureMemory(events)
        self._push_warnings: set[tuple[str, str]] = set()  # (node, key id) pushes already warned of
        self._canaries = Canaries.from_environment(http, self.clients.keys_for_host)
        self._canaries.on_result = self.wake
        self.link_checks = LinkChecks.from_environment()
        self.link_checks.on_result = self.wake
        self._stopping = False
        self._passes_started = 0
        self._plan_waiters: list[tuple[int, asyncio.Future[Snapshot]]] = []
        self.applied: AppliedManifest | None = store.load()
        self.snapshot: Snapshot | None = None
        self.rejected: RejectedManifest | None = None

    def apply(self, text: str, filename: str, revision: Revision | None) -> ApplyOutcome:
        """Validate and adopt a manifest. An invalid one raises ``ManifestError`` and changes
        nothing but the record of the rejection, which status shows until a valid one comes."""
        try:
            manifest = load_manifest_text(text, filename)
        except ManifestError as e:
            self.rejected = RejectedManifest(filename, revision, tuple(str(i) for i in e.issues), time.time())
            raise
        self.rejected = None
        self._backend_failures.forget()  # the manifest asks again: a failed faster backend is retried
        current = self.applied
        changed = current is None or current.manifest != manifest
        generation = (current.generation if current else 0) + (1 if changed else 0)
        applied = AppliedManifest(manifest, text, filename, revision, generation, time.time())
        if not changed and current is not None and current.revision == revision:
            applied = replace(applied, applied_at=current.applied_at)
        self._store.save(applied)
        self.applied = applied
        self.wake()
        return ApplyOutcome(applied, changed, self._passes_started)

    async def planned(self, after_pass: int) -> Snapshot:
        """The snapshot of the first pass started after pass number ``after_pass``, as soon as it
        has planned and before it acts: its ``planned`` actions are exactly what that pass carries
        out, so an apply can show the plan the loop executes rather than a second guess."""
        future: asyncio.Future[Snapshot] = asyncio.get_running_loop().create_future()
        self._plan_waiters.append((after_pass, future))
        return await future

    async def preview(self, manifest: Manifest) -> list[Action]:
        """What a pass would do for ``manifest`` now, without doing it."""
        return plan(manifest, await self._observe(manifest))

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self.link_checks.stop()
        self.wake()

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                snapshot = await self.run_pass()
                busy = bool(snapshot and (snapshot.planned or snapshot.cluster.status != "True"))
            except Exception:
                log.exception("a reconcile pass failed; the next one starts over")
                busy = True
            delay = self._busy_resync_s if busy else self._resync_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def run_pass(self) -> Snapshot | None:
        applied = self.applied
        if applied is None:
            return None
        started = time.monotonic()
        self._passes_started += 1
        number = self._passes_started
        observed = await self._observe(applied.manifest)
        proven = self.clients.proven(observed)
        await push_rotated_token(self.tokens, observed, proven, self.events, self._push_warnings)
        assessments = assess_models(applied.manifest, observed)
        actions = actions_for(applied.manifest, observed, assessments)
        previous = self.snapshot
        snapshot = self._conclude(applied, observed, assessments, actions)
        self.snapshot = snapshot
        self._tell_planned(number, snapshot)
        self._record_transitions(previous, snapshot, applied.manifest.name)
        results = await execute(actions, self.clients.proven(observed)) if actions else []
        self._remember_rollouts(snapshot, results, observed.now)
        self._backend_failures.note_refused_starts(results, observed)
        self._record_results(results)
        errors = tuple(f"{r.action.describe()}: {r.error}" for r in results if not r.ok)
        self.snapshot = replace(
            snapshot, results=tuple(results), errors=errors, duration_s=time.monotonic() - started
        )
        for listener in list(self._pass_listeners):
            listener()
        return self.snapshot

    def model_names(self) -> tuple[str, ...]:
        """The models of the applied manifest, in its order (none before the first apply)."""
        return tuple(spec.name for spec in self.applied.manifest.models) if self.applied else ()

    def serving_endpoints(self) -> dict[str, str]:
        """Rank 0's base URL of every model the last pass found Ready, by model name."""
        snapshot = self.snapshot
        if snapshot is None:
            return {}
        endpoints = snapshot.observed.endpoints
        ready = (a.model for a in snapshot.assessments if a.phase == "Ready")
        return {model: endpoints[model].url for model in ready if model in endpoints}

    def why_not_serving(self, model: str) -> str:
        """What the last pass said of ``model``'s readiness, for a client it cannot serve."""
        condition = self.snapshot.models.get(model) if self.snapshot else None
        return condition.message if condition else "the master has not observed the cluster yet"

    def _tell_planned(self, number: int, snapshot: Snapshot) -> None:
        waiting = []
        for after, future in self._plan_waiters:
            if future.done():  # its apply stopped waiting
                continue
            if number > after:
                future.set_result(snapshot)
            else:
                waiting.append((after, future))
        self._plan_waiters = waiting

    def on_pass(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` after every pass (the status stream); returns the unsubscribe."""
        self._pass_listeners.append(listener)
        return lambda: self._pass_listeners.remove(listener)

    def _record_transitions(self, previous: Snapshot | None, snapshot: Snapshot, cluster: str) -> None:
        """An event for every Ready condition whose status or reason changed since the last pass
        (a message that only moves on, like download progress, is no event)."""
        if self.events is None:
            return
        pairs = [("Cluster", cluster, previous.cluster if previous else None, snapshot.cluster)]
        pairs += [
            ("Node", n, previous.nodes.get(n) if previous else None, c) for n, c in snapshot.nodes.items()
        ]
        pairs += [
            ("Model", m, previous.models.get(m) if previous else None, c) for m, c in snapshot.models.items()
        ]
        for kind, name, old, new in pairs:
            if old is None or (old.status, old.reason) != (new.status, new.reason):
                self.events.record(
                    kind, name, "Normal" if new.status == "True" else "Warning", new.reason, new.message
                )

    def _record_results(self, results: list[ActionResult]) -> None:
        if self.events is None:
            return
        for result in results:
            action = result.action
            name = action.request.model if isinstance(action, FetchModel) else action.model
            if result.ok:
                self.events.record("Model", name, "Normal", type(action).__name__, action.describe())
            else:
                self.events.record(
                    "Model", name, "Warning", "ActionFailed", f"{action.describe()}: {result.error}"
                )

    async def _observe(self, manifest: Manifest) -> Observed:
        candidates = self.clients.candidates(manifest, self.announced())
        now = time.time()
        observed = await observe(manifest, candidates, self._http, self._rollouts, now, self._canaries)
        observed = self._backend_failures.note_ranks(manifest, observed)
        return replace(observed, links_down=self.link_checks.down())

    def _conclude(
        self,
        applied: AppliedManifest,
        observed: Observed,
        assessments: list[ModelAssessment],
        actions: list[Action],
    ) -> Snapshot:
        previous = self.snapshot
        nodes = node_conditions(applied.manifest, observed)
        models = {a.model: model_ready(a, observed.now) for a in assessments}
        if previous is not None:
            nodes = {k: carry_transition(c, previous.nodes.get(k)) for k, c in nodes.items()}
            models = {k: carry_transition(c, previous.models.get(k)) for k, c in models.items()}
        cluster = cluster_ready(applied.manifest, nodes, models, observed.now)
        if previous is not None:
            cluster = carry_transition(cluster, previous.cluster)
        assessed = tuple(assessments)
        phases = {a.model: model_phase_conditions(a, observed.now) for a in assessments}
        if previous is not None:
            phases = {m: carry_all(cs, previous.model_phases.get(m, ())) for m, cs in phases.items()}
        node_phases = node_phase_conditions(applied.manifest, observed, assessments)
        if previous is not None:
            node_phases = {n: carry_all(cs, previous.node_phases.get(n, ())) for n, cs in node_phases.items()}
        cluster_phases = carry_all(
            cluster_phase_conditions(node_phases, phases, observed.now),
            previous.cluster_phases if previous else (),
        )
        snapshot = Snapshot(
            applied.generation, observed, assessed, cluster, nodes, models, tuple(actions), phases
        )
        return replace(
            snapshot,
            node_phases=node_phases,
            cluster_phases=cluster_phases,
            unmanaged_agents=self._unmanaged_agents(applied.manifest),
            rotation=rotation_under_way(self.tokens, observed),
            links=self._follow_links(applied.manifest, observed),
        )

    def _follow_links(self, manifest: Manifest, observed: Observed) -> tuple[LinkStatus, ...]:
        names = [n.name for n in manifest.nodes if n.name in observed.nodes]
        nodes = {node.name: node for node in observed_mesh_nodes(names, observed.nodes)}
        return self.link_checks.follow(manifest, nodes, observed, self.clients.proven(observed))

    def proven_clients(self) -> dict[str, AgentClient]:
        """The clients of the agents the last pass found proven, by node (none before a pass)."""
        return self.clients.proven(self.snapshot.observed) if self.snapshot else {}

    async def verify_links(self) -> tuple[LinkStatus, ...]:
        """Check every cabled link now, from both ends; the links as the pass after shows them."""
        self.link_checks.ask()
        first = self._passes_started
        self.wake()
        snapshot = await self.planned(first)  # that pass starts the checks
        if not self.link_checks.any_planned():
            return snapshot.links  # no cable to check: no second pass to wait for
        await self.link_checks.settled(self.link_checks.longest_check_s)
        snapshot = await self.planned(self._passes_started)
        return snapshot.links

    def _remember_rollouts(self, snapshot: Snapshot, results: list[ActionResult], now: float) -> None:
        for assessment in snapshot.assessments:
            record = self._rollouts.get(assessment.model)
            if assessment.phase == "Ready" and record is not None:
                self._rollouts[assessment.model] = replace(record, attempts=0)
        for result in results:
            if isinstance(result.action, StartRankGroup) and result.ok:
                record = self._rollouts.get(result.action.model)
                attempts = (
                    record.attempts + 1 if record and record.spec_hash == result.action.spec_hash else 1
                )
                self._rollouts[result.action.model] = RolloutRecord(result.action.spec_hash, attempts, now)

    def announced(self) -> dict[str, tuple[DiscoveredAgent, ...]]:
        """Whatever announces each node name, and the agents known without announcing."""
        found = dict(self._discovery.announcers) if self._discovery else {}
        for name, agent in self.known_agents.items():
            found[name] = with_known(found.get(name, ()), agent)
        return found

    def _unmanaged_agents(self, manifest: Manifest) -> tuple[DiscoveredAgent, ...]:
        declared = {node.name for node in manifest.nodes}
        announced = sorted(self.announced().items())
        return tuple(agent for name, agents in announced if name not in declared for agent in agents)
