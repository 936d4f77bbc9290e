"""The protocol that keeps the ranks of one model in step: rank 0 leads, every other rank follows.

Every rank runs the same decoding steps over the same batch, and the model's own collectives (tensor
parallel all-reduces, pipeline sends) pair up only if every rank runs them in the same order. So
rank 0 decides everything that could differ and tells the others, over the same ``mx.distributed``
group, before each step:

- ``Step``: which requests join the batch (``Join``: the already validated, tokenized request with
  a concrete sampling seed, since rank 0 draws one when the client gave none, and how many of its
  prompt tokens come from the prefix cache) and which leave it (client gone, stop string matched,
  shutdown). Every rank applies them, then runs one decoding step. A bad request is rejected on
  rank 0 before anything is sent, so followers never see it.
- ``Heartbeat`` while idle, once a second: a follower whose leader died (or a leader whose follower
  died) learns it within a second instead of at the next request.
- ``Shutdown`` when rank 0 stops cleanly: followers leave their loop and exit 0.

Each message travels with a header of integers, one ``all_sum``: the payload's length, the number
of prefix-cache entries rank 0 keeps (a follower drops its least recently used entries down to it,
so both hold the same prefixes), and in slot ``2 + r`` rank r's checksum of the tokens it sampled
in the previous step. Ranks that sampled differently would otherwise serve garbage silently, so a
difference breaks the group instead.

The ring backend has no broadcast, so the header and the payload are each an ``all_sum`` to which
followers add zeros (their checksum slot aside). A peer that died closes its sockets and MLX raises
``RuntimeError`` ("connection to a peer was lost") in the next collective; that is our failure
detector, turned into ``LockstepBroken`` and an exit status of 1, since MLX ranks cannot rejoin a
group (the master restarts the whole group). A peer that hangs without closing its sockets would
hang its partners; ``--parent-pid`` still ends every rank when its agent goes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genmlx.dispatcher.engine.events import GenerationRequest
from genmlx.dispatcher.engine.model_loading import Sharding
from genmlx.wire.codec import decode, encode
from genmlx.wire.rank_launch import JOINED_GROUP_MARK

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
HEADER_SLOTS = 2  # payload length, prefix-cache entries; then a checksum and a probe answer per rank


@dataclass(frozen=True)
class Join:
    """``request`` joins the batch as sequence ``uid``, ``cached_tokens`` of its prompt reused."""

    uid: int
    request: GenerationRequest
    cached_tokens: int


@dataclass(frozen=True)
class Step:
    """Apply ``leaves`` (sequence uids) and ``joins``, in that order, then decode one step."""

    joins: tuple[Join, ...] = ()
    leaves: tuple[int, ...] = ()


@dataclass(frozen=True)
class Probe:
    """How many of the first ``tokens`` tokens of ``prompt`` can each rank read back from disk?
    Each rank answers in the header of the next message (``RankChannel.answer``); rank 0 then
    joins the request with the blocks every rank can read, so a rank that cannot read its block
    makes it a miss for the whole group, never a rank out of step."""

    prompt: tuple[int, ...]
    tokens: int


@dataclass(frozen=True)
class Heartbeat:
    """Nothing to do; proves the group is still whole."""


@dataclass(frozen=True)
class Shutdown:
    """Rank 0 is stopping; followers stop too."""


Message = Step | Probe | Heartbeat | Shutdown


@dataclass(frozen=True)
class Received:
    """What a follower received: the message and rank 0's prefix-cache entry count."""

    message: Message
    cache_entries: int


class LockstepBroken(Exception):
    """A peer rank is gone or the ranks fell out of step: this rank cannot serve any more."""


class BackendJoinFailed(Exception):
    """MLX could not set up the group's backend on this rank (jaccl without RDMA, a device that
    is down, a peer that never came): the rank exits with ``BACKEND_JOIN_FAILED_EXIT`` so its agent
    and the master can tell it from a crash and fall back to another backend."""


def with_seed(request: GenerationRequest) -> GenerationRequest:
    """``request`` with a concrete sampling seed, drawn here when the client gave none."""
    if request.sampling.seed is not None:
        return request
    seeded = dataclasses.replace(request.sampling, seed=secrets.randbits(63))
    return dataclasses.replace(request, sampling=seeded)


def step_checksum(tokens: Iterable[tuple[int, int]]) -> int:
    """A checksum of one step's ``(uid, token)`` pairs, in order."""
    checksum = 0
    for uid, token in tokens:
        checksum = zlib.crc32(f"{uid}:{token};".encode(), checksum)
    return checksum


@dataclass(frozen=True)
class RankGroup:
    """This rank's place in a multi-rank group, its MLX backend, and how the group splits the model."""

    rank: int
    world_size: int
    hostfile: Path | None  # the ring backend's; jaccl reads its files from the environment
    sharding: Sharding = Sharding()
    backend: str = "ring"  # ring, jaccl, jaccl-ring (jaccl with MLX_JACCL_RING set) or nccl


# Our backend names to MLX's: jaccl-ring is jaccl with MLX_JACCL_RING set.
MLX_BACKENDS = {"ring": "ring", "jaccl": "jaccl", "jaccl-ring": "jaccl", "nccl": "nccl"}


def join_group(group: RankGroup) -> Any:
    """Join MLX's group of ``group`` (a ``RankGroup``) on its backend; the ``mx.distributed.Group``.

    The ring backend reads the hostfile the command line names; jaccl and nccl read what the agent
    put in the environment (``MLX_IBV_DEVICES``, ``MLX_JACCL_COORDINATOR``, ``MLX_JACCL_RING``;
    ``NCCL_HOST_IP``, ``NCCL_PORT``, ``MLX_WORLD_SIZE``). Raises ``BackendJoinFailed`` where MLX
    cannot set the backend up."""
    import mlx.core as mx

    # The agent also sets these; the command line wins so a hand-started rank needs no environment.
    os.environ["MLX_RANK"] = str(group.rank)
    if group.backend == "ring":
        os.environ["MLX_HOSTFILE"] = str(group.hostfile)
    try:
        joined = mx.distributed.init(strict=True, backend=MLX_BACKENDS[group.backend])
    except RuntimeError as e:  # MLX's own message says what failed ("Cannot initialize jaccl ...")
        raise BackendJoinFailed(f"{group.backend} backend: {e}") from e
    if (joined.rank(), joined.size()) != (group.rank, group.world_size):
        raise LockstepBroken(
            f"joined the {group.backend} group as rank {joined.rank()} of {joined.size()}, "
            f"but was started as rank {group.rank} of {group.world_size}: check its hostfile or devices"
        )
    log.info("%s as rank %d of %d on %s", JOINED_GROUP_MARK, group.rank, group.world_size, group.backend)
    return joined


class RankChannel:
    """One rank's end of the lockstep protocol. Only the model thread may use it."""

    def __init__(self, group: Any):
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        self._mx = mx
        self._group = group
        self._stream = generation_stream
        self._checksum = 0  # of the tokens this rank sampled in its last step
        self._answer = 0  # to the last probe, sent in the next header

    @property
    def rank(self) -> int:
        return self._group.rank()

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def stepped(self, checksum: int) -> None:
        """Every rank, after each step: the checksum the next header compares across ranks."""
        self._checksum = checksum

    def answer(self, value: int) -> None:
        """A follower, after a ``Probe``: its answer, which the next header carries to rank 0."""
        self._answer = value

    def send(self, message: Message, cache_entries: int = 0) -> list[int]:
        """Rank 0: deliver ``message`` (and its prefix-cache entry count) to every other rank; the
        probe answers the header carried, by rank."""
        payload = encode_message(message)
        _, _, answers = self._exchange_header(len(payload), cache_entries)
        self._sum_bytes(len(payload), payload)
        return answers

    def receive(self) -> Received:
        """A follower: block until rank 0 sends the next message."""
        length, cache_entries, _ = self._exchange_header(0, 0)
        return Received(decode_message(self._sum_bytes(length, None)), cache_entries)

    def _exchange_header(self, length: int, cache_entries: int) -> tuple[int, int, list[int]]:
        size = self._group.size()
        header = [length, cache_entries] + [0] * (2 * size)
        header[HEADER_SLOTS + self.rank] = self._checksum
        header[HEADER_SLOTS + size + self.rank], self._answer = self._answer, 0
        summed = self._sum_ints(header)
        checksums = summed[HEADER_SLOTS : HEADER_SLOTS + size]
        if any(c != checksums[0] for c in checksums):
            raise LockstepBroken(f"the ranks sampled different tokens (checksums by rank: {checksums})")
        return summed[0], summed[1], summed[HEADER_SLOTS + size :]

    def _sum_ints(self, values: list[int]) -> list[int]:
        mx = self._mx
        return self._all_sum(mx.array(values, dtype=mx.int64)).tolist()

    def _sum_bytes(self, length: int, payload: bytes | None) -> bytes:
        import numpy as np

        mx = self._mx
        if not length:
            return b""
        data = mx.array(np.frombuffer(payload, dtype=np.uint8)) if payload else mx.zeros((length,), mx.uint8)
        return np.array(self._all_sum(data)).tobytes()

    def _all_sum(self, data: Any) -> Any:
        mx = self._mx
        try:
            # mlx-lm's generation stream, where decoding runs the model's own collectives: one
            # stream keeps every collective in submission order, so they pair up across ranks
            # even while the previous step still runs asynchronously.
            with mx.stream(self._stream):
                summed = mx.distributed.all_sum(data, group=self._group)
            mx.eval(summed)
        except RuntimeError as e:  # MLX's word for a peer that closed its connection
            raise LockstepBroken(f"rank {self.rank} lost its group: {e}") from e
        return summed


def encode_message(message: Message) -> bytes:
    """``message`` as the bytes rank 0 sends (compact JSON, through the wire codec)."""
    body: dict[str, Any] = {"kind": type(message).__name__}
    if isinstance(message, Step | Probe):
        body |= encode(message)
    return json.dumps(body, separators=(",", ":")).encode()


def decode_message(payload: bytes) -> Message:
    """The message ``encode_message`` turned into ``payload``."""
    body = json.loads(payload)
    kind = body.pop("kind")
    if kind == "Step":
        return decode(Step, body)
    if kind == "Probe":
        return decode(Probe, body)
    if kind == "Heartbeat":
        return Heartbeat()
    if kind == "Shutdown":
        return Shutdown()
    raise LockstepBroken(f"unknown lockstep message {kind!r}: are all ranks the same version?")
