"""Checks an agent makes before it starts a jaccl rank, so that a group that cannot come up on
RDMA is refused at once, with the reason, instead of failing inside MLX (or crashing in
``ibv_reg_mr``) after every rank has started.

Each device the rank's row of the device matrix names must be active on this node now (RDMA
enabled, the port ``PORT_ACTIVE``: the facts list an interface's RDMA device only then), and the
last verification of the link it rides must not have found the peer unreachable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from genmlx.core.errors import AgentConflict
from genmlx.wire.agent_state import NodeFacts
from genmlx.wire.rank_launch import RDMA_NOT_READY, RankLaunch


class RdmaNotReady(AgentConflict):
    """A jaccl rank was asked for, but this node's RDMA devices or links cannot carry it."""


def check_rdma_launch(launch: RankLaunch, facts: NodeFacts, links_down: Mapping[str, str]) -> None:
    """Raise ``RdmaNotReady`` unless every RDMA device ``launch`` needs is active here and its link
    is not known to be down. ``links_down``: interface name -> why its last check failed."""
    if launch.backend == "ring" or launch.rdma_devices is None:
        return
    wanted = [device for device in json.loads(launch.rdma_devices)[launch.rank] if device]
    active = {i.rdma_device: i.name for i in facts.interfaces if i.rdma_device}
    missing = [device for device in wanted if device not in active]
    if missing and not active:
        refuse(
            launch,
            f"no RDMA device is active on this node (wanted {', '.join(missing)}): enable RDMA once "
            "from Recovery (rdma_ctl enable, then restart) and check the Thunderbolt cables",
        )
    if missing:
        refuse(
            launch,
            f"{', '.join(missing)} not PORT_ACTIVE on this node (active: {', '.join(sorted(active))}): "
            "is the Thunderbolt cable in?",
        )
    down = [f"{active[d]} ({links_down[active[d]]})" for d in wanted if active[d] in links_down]
    if down:
        refuse(launch, f"the peer is unreachable over {', '.join(down)}")


def refuse(launch: RankLaunch, why: str) -> None:
    raise RdmaNotReady(f"{RDMA_NOT_READY} for {launch.key} on {launch.backend}: {why}")
