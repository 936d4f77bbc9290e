"""The executor: carries planned actions out through the agent clients, one after another.

Retries happen here and only here (tenacity, temporary errors only). Each action has a deadline,
so an agent that accepts a connection and never answers cannot hold the loop: past it the action
fails like any other. A failed action is reported, never raised: the next pass re-observes and
plans again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from genmlx.core.errors import GenMLXError, PermanentError, TemporaryError
from genmlx.master.planning.actions import Action, DeleteModel, FetchModel, StartRankGroup, StopRankGroup
from genmlx.master.runtime.agent_client import AgentClient

log = logging.getLogger("genmlx.master")

# Seconds for each kind of action, retries included. Agent calls return once the work is under way
# (a transfer runs on the agent afterwards); stopping waits for SIGTERM's grace, then SIGKILL.
DEADLINES_S: dict[type, float] = {
    StopRankGroup: 60.0,
    StartRankGroup: 60.0,
    FetchModel: 30.0,
    DeleteModel: 60.0,
}


@dataclass(frozen=True)
class ActionResult:
    action: Action
    error: str | None = None
    node: str | None = None  # of a failed group start: the node whose agent refused its rank

    @property
    def ok(self) -> bool:
        return self.error is None


class RankStartFailed(GenMLXError):
    """A rank of a group could not be started: the agent's own error, and the node it was for."""

    def __init__(self, node: str, cause: GenMLXError):
        super().__init__(str(cause))
        self.node = node


def retrying() -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception_type(TemporaryError),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.2, max=2.0),
        reraise=True,
    )


async def execute(actions: list[Action], clients: dict[str, AgentClient]) -> list[ActionResult]:
    results = []
    for action in actions:
        log.info("%s", action.describe())
        deadline = DEADLINES_S[type(action)]
        try:
            async with asyncio.timeout(deadline):
                await execute_one(action, clients)
            results.append(ActionResult(action))
        except GenMLXError as e:
            log.warning("failed: %s: %s", action.describe(), e)
            results.append(ActionResult(action, str(e), e.node if isinstance(e, RankStartFailed) else None))
        except TimeoutError:
            log.warning("failed: %s: not done within %gs", action.describe(), deadline)
            results.append(ActionResult(action, f"not done within its {deadline:g}s deadline"))
    return results


async def execute_one(action: Action, clients: dict[str, AgentClient]) -> None:
    if isinstance(action, StopRankGroup):
        for node, rank in action.ranks:
            async for attempt in retrying():
                with attempt:
                    await agent(clients, node).stop_rank(action.model, rank)
    elif isinstance(action, StartRankGroup):
        await start_group(action, clients)
    elif isinstance(action, FetchModel):
        async for attempt in retrying():
            with attempt:
                await agent(clients, action.node).fetch_model(action.request)
    elif isinstance(action, DeleteModel):
        async for attempt in retrying():
            with attempt:
                await agent(clients, action.node).delete_model(action.storage_path, action.model)


def agent(clients: dict[str, AgentClient], node: str) -> AgentClient:
    """The client of ``node``'s proven agent; a node without one cannot be acted on (this pass)."""
    client = clients.get(node)
    if client is None:
        raise PermanentError(f"no agent of node {node} has proven itself in this pass")
    return client


async def start_group(action: StartRankGroup, clients: dict[str, AgentClient]) -> None:
    """Start every rank; if one fails, stop those already started so no half group lingers."""
    started: list[tuple[str, int]] = []
    try:
        for node, launch in action.launches:
            try:
                async for attempt in retrying():
                    with attempt:
                        await agent(clients, node).start_rank(launch)
            except GenMLXError as e:
                raise RankStartFailed(node, e) from e
            started.append((node, launch.rank))
    except GenMLXError:
        for node, rank in started:
            try:
                await agent(clients, node).stop_rank(action.model, rank)
            except GenMLXError as e:
                log.warning(
                    "could not stop rank %d of %s on %s after a failed start: %s", rank, action.model, node, e
                )
        raise
