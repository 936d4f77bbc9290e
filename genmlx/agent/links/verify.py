"""One end of a Thunderbolt link, verified from this node: is its planned address on the
interface, does the peer's agent answer at the peer's planned address (which only that link
routes), how long a TCP connect takes there and back, and how fast a bounded stream of bytes comes
back from the peer agent's probe (``GET /api/v1/links/probe``, signed both ways).

Each verdict is kept by local address, so the agent can refuse to start a jaccl rank over a link
its last check found down.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from genmlx.core.signing import REPLY_HEADER, Keys, SignatureError, check_reply, signed_headers
from genmlx.wire.links import LinkCheck, LinkCheckRequest

RTT_SAMPLES = 3
CONNECT_TIMEOUT_S = 1.0
# Below this many bytes the probe's timing says more about the first chunk than about the link.
MIN_MEASURED_BYTES = 1 << 20
PROBE_READ_BYTES = 1 << 20  # one buffer, read into again and again


class LinkDown(Exception):
    """The link cannot carry traffic; the message says why, in a user's words."""


class LinkUnaddressed(LinkDown):
    """The planned address is not on the link's port: nothing could be measured, and nothing is
    known to be broken (jaccl needs no address on it; ring and the checks do)."""


class LinkVerifier:
    """Checks link ends on request and remembers each one's last verdict."""

    def __init__(self, keys: Callable[[], Keys]):
        self._keys = keys
        self._last: dict[str, LinkCheck] = {}  # by local address

    def down(self) -> dict[str, str]:
        """Interface name -> why, for every link end whose last check found it down (not merely
        without its planned address)."""
        return {
            c.interface: c.detail for c in self._last.values() if not c.up and c.addressed and c.interface
        }

    async def check(self, request: LinkCheckRequest) -> LinkCheck:
        started = time.time()
        try:
            await asyncio.to_thread(check_local_end, request)
            try:
                rtt_ms = await measure_rtt(request)
                probe = await probe_bandwidth(request, self._keys())
            except LinkDown:  # a cable pulled during the check: this end says so, if it can
                await asyncio.to_thread(check_local_end, request)
                raise
        except LinkDown as e:
            ends = (request.local_address, request.peer_address)
            addressed = not isinstance(e, LinkUnaddressed)
            result = LinkCheck(*ends, False, started, request.interface, str(e), addressed=addressed)
        else:
            result = LinkCheck(
                request.local_address,
                request.peer_address,
                True,
                started,
                request.interface,
                probe.detail,
                rtt_ms,
                probe.gbit_s,
                probe.moved,
            )
        self._last[request.local_address] = result
        return result


def check_local_end(request: LinkCheckRequest) -> None:
    """Raise what is wrong at this end before anything is sent: the interface missing or down
    (``LinkDown``), or the planned address not on it (``LinkUnaddressed``). Blocking (psutil): run
    it in a thread."""
    local, interface = request.local_address, request.interface
    addresses = {name: {a.address for a in entries} for name, entries in psutil.net_if_addrs().items()}
    if interface is None:
        if not any(local in found for found in addresses.values()):
            raise LinkUnaddressed(f"no interface has {local} (genmlx mesh apply sets the planned address)")
        return
    stats = psutil.net_if_stats().get(interface)
    if stats is None:
        raise LinkDown(f"{interface} is not an interface of this node")
    if not stats.isup:
        raise LinkDown(f"{interface} is down or has no carrier (is the cable in at both ends?)")
    if local not in addresses.get(interface, ()):
        raise LinkUnaddressed(
            f"{interface} does not have {local} (genmlx mesh apply sets the planned address)"
        )


async def measure_rtt(request: LinkCheckRequest) -> float:
    """The median time, in ms, of a few TCP connects from the local address to the peer's agent."""
    samples = []
    for _ in range(RTT_SAMPLES):
        started = time.perf_counter()
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    request.peer_address, request.peer_port, local_addr=(request.local_address, 0)
                ),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as e:
            why = str(e) or f"no answer in {CONNECT_TIMEOUT_S:g}s"
            over = f" over {request.interface}" if request.interface else ""
            raise LinkDown(f"{request.peer_address}:{request.peer_port} unreachable{over}: {why}") from None
        samples.append((time.perf_counter() - started) * 1000)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return round(statistics.median(samples), 3)


@dataclass(frozen=True)
class ProbeReading:
    """What came back from the peer's probe: the bytes after the first read (which starts the
    clock) and how long they took."""

    moved: int = 0
    elapsed_s: float = 0.0
    detail: str = ""

    @property
    def gbit_s(self) -> float | None:
        if self.moved < MIN_MEASURED_BYTES or self.elapsed_s <= 0:
            return None
        return round(self.moved * 8 / self.elapsed_s / 1e9, 3)


async def probe_bandwidth(request: LinkCheckRequest, keys: Keys) -> ProbeReading:
    """Read up to ``probe_bytes`` from the peer's probe for at most ``probe_seconds``; what moved
    and how fast. Runs in a thread with blocking reads into one buffer (as a plain TCP client
    would), so the agent's event loop costs the measurement nothing. A peer that answers but cannot
    prove it holds the cluster token is ``LinkDown``: the link may carry traffic, but not to a node
    of this cluster."""
    if request.probe_bytes == 0:
        return ProbeReading()
    return await asyncio.to_thread(read_probe, request, keys)


def read_probe(request: LinkCheckRequest, keys: Keys) -> ProbeReading:
    peer = request.peer_address
    path = f"/api/v1/links/probe?bytes={request.probe_bytes}"
    headers, nonce = signed_headers(keys, "GET", f"http://{peer}:{request.peer_port}{path}", None)
    connection = http.client.HTTPConnection(
        peer, request.peer_port, timeout=CONNECT_TIMEOUT_S, source_address=(request.local_address, 0)
    )
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        try:
            check_reply(keys, nonce, response.status, response.getheader(REPLY_HEADER))
        except SignatureError as e:
            raise LinkDown(f"what answers at {peer} is not an agent of this cluster: {e}") from None
        if response.status != 200:
            raise LinkDown(f"the probe from {peer} answered HTTP {response.status}")
        return timed_read(response, request.probe_seconds)
    except (OSError, http.client.HTTPException) as e:
        raise LinkDown(f"the probe from {peer} failed: {e or type(e).__name__}") from None
    finally:
        connection.close()


def timed_read(response: http.client.HTTPResponse, seconds: float) -> ProbeReading:
    """Read the reply's body into one buffer until it ends or ``seconds`` pass after its first bytes."""
    buffer = memoryview(bytearray(PROBE_READ_BYTES))
    if not response.readinto(buffer):
        return ProbeReading(detail="the probe sent nothing")
    first = last = time.perf_counter()
    moved, stopped = 0, ""
    while count := response.readinto(buffer):
        moved += count
        last = time.perf_counter()
        if last - first >= seconds:
            stopped = f"probe stopped after {seconds:g}s"
            break
    return ProbeReading(moved, last - first, stopped)
