"""The executor: a hung agent call fails its action at the deadline; the others still run."""

from __future__ import annotations

import asyncio

import pytest

import genmlx.master.runtime.execute as executor
from genmlx.master.planning.actions import StopRankGroup


class HangingThenWorkingAgent:
    """An agent whose first call never returns (it accepted the connection and went silent)."""

    def __init__(self) -> None:
        self.stopped: list[tuple[str, int]] = []

    async def stop_rank(self, model: str, rank: int) -> None:
        if not self.stopped:
            self.stopped.append(("hung", -1))
            await asyncio.Event().wait()
        self.stopped.append((model, rank))


def test_an_action_past_its_deadline_fails_and_the_next_one_runs(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(executor.DEADLINES_S, StopRankGroup, 0.2)
    agent = HangingThenWorkingAgent()
    actions = [StopRankGroup("big", (("a", 0),), "gone"), StopRankGroup("small", (("a", 0),), "gone")]
    results = asyncio.run(executor.execute(actions, {"a": agent}))
    assert [r.ok for r in results] == [False, True]
    assert results[0].error == "not done within its 0.2s deadline"
    assert agent.stopped == [("hung", -1), ("small", 0)]
