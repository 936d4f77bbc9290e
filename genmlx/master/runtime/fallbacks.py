"""The master's memory of failed starts on a faster backend than ring (jaccl, nccl), which the
planner reads from ``Observed.backend_failures``: each pass adds the ranks its agents say could
not join their group, and the group starts they refused; an apply forgets everything, so the
manifest asking again retries the faster backend. Lost on restart, which also retries: fine.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from genmlx.manifest.types import Manifest
from genmlx.master.planning.actions import StartRankGroup
from genmlx.master.planning.backend_failures import failure_of_refused_start, failures_in_ranks, remember
from genmlx.master.planning.backends import UNAVAILABLE_REASONS
from genmlx.master.planning.observed import BackendFailure, Observed
from genmlx.master.runtime.events import EventLog
from genmlx.master.runtime.execute import ActionResult

log = logging.getLogger("genmlx.master")


class BackendFailureMemory:
    """Failed faster-backend starts by model; each new one is logged and recorded as an event."""

    def __init__(self, events: EventLog | None):
        self._events = events
        self._failures: dict[str, BackendFailure] = {}

    def forget(self) -> None:
        self._failures = {}

    def note_ranks(self, manifest: Manifest, observed: Observed) -> Observed:
        """``observed`` with every failure known, those its ranks show included."""
        self._note(failures_in_ranks(manifest, observed))
        return replace(observed, backend_failures=dict(self._failures))

    def note_refused_starts(self, results: list[ActionResult], observed: Observed) -> None:
        refused = {}
        for result in results:
            if isinstance(result.action, StartRankGroup) and not result.ok and result.node:
                failure = failure_of_refused_start(result.action, result.node, result.error or "", observed)
                if failure is not None:
                    refused[result.action.model] = failure
        self._note(refused)

    def _note(self, found: dict[str, BackendFailure]) -> None:
        known = self._failures
        self._failures = remember(known, found)
        for model, failure in self._failures.items():
            if known.get(model) is not failure:
                log.warning("model %s: %s", model, failure.describe())
                if self._events is not None:
                    reason = UNAVAILABLE_REASONS[failure.backend]
                    self._events.record("Model", model, "Warning", reason, failure.describe())
