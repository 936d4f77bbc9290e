"""A rotation of the cluster token, carried to the agents and followed in status.

``genmlx token rotate`` writes a new token into the master's token file and keeps the old one
there until the end of a grace window (``genmlx.core.tokens``). The master takes it within a
second; on each pass it then gives every proven agent still on the old token the new one, sealed
for that node under the old token's key and signed with it (nothing in clear on the network),
unless the rotation is ``manual``: then each node's operator copies the file. Until the window
ends both tokens count everywhere; status lists the nodes still on the old one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from genmlx.core.errors import GenMLXError
from genmlx.core.signing import key_id, signing_key
from genmlx.core.tokens import TokenSource, seal_token
from genmlx.master.planning.observed import Observed
from genmlx.master.runtime.agent_client import AgentClient
from genmlx.master.runtime.events import EventLog

log = logging.getLogger("genmlx.master")


@dataclass(frozen=True)
class Rotation:
    """A rotation whose grace window is open: until when, and which nodes still hold the old token."""

    previous_until: float
    nodes_on_previous: tuple[str, ...]
    manual: bool


def rotation_under_way(tokens: TokenSource, observed: Observed) -> Rotation | None:
    held = tokens.current()
    if held.previous is None or observed.now >= held.previous_until:
        return None
    previous_id = key_id(signing_key(held.previous))
    behind = tuple(
        name
        for name, node in observed.nodes.items()
        if node.state is not None and node.state.key_id == previous_id
    )
    return Rotation(held.previous_until, behind, held.manual)


async def push_rotated_token(
    tokens: TokenSource,
    observed: Observed,
    clients: dict[str, AgentClient],
    events: EventLog | None,
    warned: set[tuple[str, str]],
) -> None:
    """Give each proven agent still on the previous token the current one, sealed for it. A push
    that fails is tried again each pass, and told once per node and token (``warned``)."""
    rotation = rotation_under_way(tokens, observed)
    if rotation is None or rotation.manual:
        return
    held = tokens.current()
    previous_key = signing_key(held.previous)
    for name in rotation.nodes_on_previous:
        client = clients.get(name)
        if client is None:
            continue
        try:
            sealed = seal_token(held.current, previous_key, name)
            await client.push_token(sealed, held.previous_until, key_id(previous_key))
        except GenMLXError as e:
            told = (name, key_id(signing_key(held.current)))
            if told not in warned:
                warned.add(told)
                log.warning("could not give node %s the rotated token: %s", name, e)
                if events is not None:
                    events.record("Node", name, "Warning", "TokenNotPushed", str(e))
            continue
        log.info("gave node %s the rotated cluster token", name)
        if events is not None:
            events.record("Node", name, "Normal", "TokenRotated", "took the rotated cluster token")
