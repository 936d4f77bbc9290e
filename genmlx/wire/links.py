"""Verifying a Thunderbolt link between two nodes: what the master asks an agent to check (one end
of one planned /30 link) and what the agent found, as ``POST /api/v1/links/check`` carries them.

An agent checks its end by reaching the peer's planned address from its own (on the link's
interface: the /30 is routed over it alone), timing TCP connects to the peer's agent as the
round-trip time, and reading a bounded stream of bytes from the peer agent's
``GET /api/v1/links/probe`` for the bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from genmlx.wire.codec import WireType, bounded

MAX_PROBE_BYTES = 1 << 30  # what one check may move, at most
MAX_PROBE_SECONDS = 10.0  # and for how long
DEFAULT_PROBE_BYTES = 256 << 20
DEFAULT_PROBE_SECONDS = 1.0


@dataclass(frozen=True)
class LinkCheckRequest(WireType):
    """Check one end of a link: from ``local_address`` (on ``interface``, where the facts tell which
    port the cable is in) to the peer agent at ``peer_address``:``peer_port``."""

    local_address: str = bounded(non_empty=True)
    peer_address: str = bounded(non_empty=True)
    peer_port: int = bounded(minimum=1, maximum=65535)
    interface: str | None = bounded(None, non_empty=True)
    probe_bytes: int = bounded(DEFAULT_PROBE_BYTES, minimum=0, maximum=MAX_PROBE_BYTES)
    probe_seconds: float = bounded(DEFAULT_PROBE_SECONDS, minimum=0.05, maximum=MAX_PROBE_SECONDS)


@dataclass(frozen=True)
class LinkCheck(WireType):
    """What one end of a link found: up (the peer answered over it) or down and why, the round trip
    and the bandwidth it measured."""

    local_address: str
    peer_address: str
    up: bool
    checked_at: float  # unix time
    interface: str | None = None
    detail: str = ""  # why it is down, or what the probe could not measure
    rtt_ms: float | None = None  # median of a few TCP connects to the peer agent
    gbit_s: float | None = None  # what the probe moved, per second
    probe_bytes: int = 0  # how many bytes it moved
    # False where the planned address is not on the port: nothing measured, nothing known broken.
    addressed: bool = True
