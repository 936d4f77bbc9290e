"""The protocol that keeps the ranks of one model in step: rank 0 leads, every other rank follows.

Every rank runs the same generation steps, and the model's own collectives (tensor parallel
all-reduces, pipeline sends) pair up only if every rank runs them in the same order. So rank 0
decides everything that could differ and tells the others, over the same ``mx.distributed`` group:

- ``StartRequest``: the already validated, tokenized request, with a concrete sampling seed (rank 0
  draws one when the client gave none) so every rank samples the same tokens. A bad request is
  rejected on rank 0 before anything is sent, so followers never see it.
- before each token, ``agree_cancel``: rank 0 says continue or cancel (client gone, shutdown), and
  every rank stops at the same token.
- ``Heartbeat`` while idle, once a second: a follower whose leader died (or a leader whose follower
  died) learns it within a second instead of at the next request.
- ``Shutdown`` when rank 0 stops cleanly: followers leave their loop and exit 0.

After each request every rank compares what it generated (token count and a checksum of the text,
one ``all_gather``): ranks that sampled differently would otherwise serve garbage silently, so a
difference breaks the group instead.

The ring backend has no broadcast, so a message is an ``all_sum`` of its length, then of its bytes,
to which followers add zeros. A peer that died closes its sockets and MLX raises ``RuntimeError``
("connection to a peer was lost") in the next collective; that is our failure detector, turned into
``LockstepBroken`` and an exit status of 1, since MLX ranks cannot rejoin a group (the master
restarts the whole group). A peer that hangs without closing its sockets would hang its partners;
``--parent-pid`` still ends every rank when its agent goes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import typing
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genmlx.dispatcher.events import EngineEvent, Finished, GenerationRequest, TextDelta

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0


@dataclass(frozen=True)
class StartRequest:
    """Generate ``request`` now, on every rank."""

    request: GenerationRequest


@dataclass(frozen=True)
class Heartbeat:
    """Nothing to do; proves the group is still whole."""


@dataclass(frozen=True)
class Shutdown:
    """Rank 0 is stopping; followers stop too."""


Message = StartRequest | Heartbeat | Shutdown


class LockstepBroken(Exception):
    """A peer rank is gone or the ranks fell out of step: this rank cannot serve any more."""


def join_ring(rank: int, world_size: int, hostfile: Path) -> Any:
    """Join MLX's ring group described by ``hostfile``; the group (an ``mx.distributed.Group``)."""
    import mlx.core as mx

    # The agent also sets these; the command line wins so a hand-started rank needs no environment.
    os.environ["MLX_RANK"] = str(rank)
    os.environ["MLX_HOSTFILE"] = str(hostfile)
    group = mx.distributed.init(strict=True, backend="ring")
    if (group.rank(), group.size()) != (rank, world_size):
        raise LockstepBroken(
            f"joined the ring as rank {group.rank()} of {group.size()}, "
            f"but was started as rank {rank} of {world_size}: check the hostfile {hostfile}"
        )
    return group


class RankChannel:
    """One rank's end of the lockstep protocol. Only the model thread may use it."""

    def __init__(self, group: Any):
        import mlx.core as mx

        self._mx = mx
        self._group = group

    @property
    def rank(self) -> int:
        return self._group.rank()

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def announce(self, request: GenerationRequest) -> GenerationRequest:
        """Rank 0: send ``request`` with a seed every rank shares; returns the request to run."""
        if request.sampling.seed is None:
            seeded = dataclasses.replace(request.sampling, seed=secrets.randbits(63))
            request = dataclasses.replace(request, sampling=seeded)
        self.send(StartRequest(request))
        return request

    def send(self, message: Message) -> None:
        """Rank 0: deliver ``message`` to every other rank."""
        payload = encode_message(message)
        self._sum_bytes(self._sum_ints([len(payload)])[0], payload)

    def receive(self) -> Message:
        """A follower: block until rank 0 sends the next message."""
        length = self._sum_ints([0])[0]
        return decode_message(self._sum_bytes(length, None))

    def agree_cancel(self, cancel: bool) -> bool:
        """Every rank, before each token: whether to stop now. Only rank 0's ``cancel`` counts."""
        vote = 1 if cancel and self.is_leader else 0
        return self._sum_ints([vote])[0] > 0

    def agreeing(self, is_cancelled: Callable[[], bool]) -> Callable[[], bool]:
        """``is_cancelled`` made group-wide: what rank 0's says, every rank answers."""
        return lambda: self.agree_cancel(is_cancelled())

    def confirm_same_output(self, output: OutputDigest) -> None:
        """Every rank, after each request: raise ``LockstepBroken`` unless all generated the same."""
        mx = self._mx
        try:
            gathered = mx.distributed.all_gather(mx.array(output.values(), dtype=mx.int64), group=self._group)
            rows = gathered.reshape(self._group.size(), -1).tolist()
        except RuntimeError as e:
            raise LockstepBroken(f"rank {self.rank} lost its group: {e}") from e
        if any(row != rows[0] for row in rows):
            raise LockstepBroken(f"the ranks generated different output (tokens, checksum by rank: {rows})")

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
            # The default stream, as the model's own collectives use: one stream keeps every
            # collective in submission order, so they pair up across ranks even while a step runs.
            summed = mx.distributed.all_sum(data, group=self._group)
            mx.eval(summed)
        except RuntimeError as e:  # MLX's word for a peer that closed its connection
            raise LockstepBroken(f"rank {self.rank} lost its group: {e}") from e
        return summed


class OutputDigest:
    """What one rank generated for a request, reduced to what the ranks compare."""

    def __init__(self) -> None:
        self._checksum = 0
        self._tokens = -1  # until Finished says

    def add(self, event: EngineEvent) -> None:
        if isinstance(event, TextDelta):
            self._checksum = zlib.crc32(event.text.encode(), self._checksum)
        elif isinstance(event, Finished):
            self._tokens = event.usage.completion_tokens

    def values(self) -> list[int]:
        return [self._tokens, self._checksum]


def follow_leader(
    channel: RankChannel,
    run_request: Callable[[GenerationRequest, Callable[[], bool]], None],
    stopping: Callable[[], bool],
) -> None:
    """A follower's whole life after loading: run what rank 0 announces until it says ``Shutdown``
    or this rank is told to stop (then rank 0 finds the group broken at its next heartbeat).

    ``run_request(request, is_cancelled)`` generates and discards the output; ``LockstepBroken``
    propagates, as does any failure of ``run_request`` (this rank is out of step after it).
    """
    while not stopping():
        message = channel.receive()
        if isinstance(message, Shutdown):
            log.info("rank 0 stopped the group")
            return
        if isinstance(message, StartRequest):
            run_request(message.request, channel.agreeing(lambda: False))


def encode_message(message: Message) -> bytes:
    """``message`` as the bytes rank 0 sends (compact JSON)."""
    body: dict[str, Any] = {"kind": type(message).__name__}
    if isinstance(message, StartRequest):
        body["request"] = dataclasses.asdict(message.request)
    return json.dumps(body, separators=(",", ":")).encode()


def decode_message(payload: bytes) -> Message:
    """The message ``encode_message`` turned into ``payload``."""
    body = json.loads(payload)
    kind = body["kind"]
    if kind == "StartRequest":
        return StartRequest(_request_from_dict(body["request"]))
    if kind == "Heartbeat":
        return Heartbeat()
    if kind == "Shutdown":
        return Shutdown()
    raise LockstepBroken(f"unknown lockstep message {kind!r}: are all ranks the same version?")


def _request_from_dict(fields: dict[str, Any]) -> GenerationRequest:
    return _dataclass_from_json(GenerationRequest, fields)


def _dataclass_from_json(cls: type, fields: dict[str, Any]) -> Any:
    """Undo ``dataclasses.asdict`` + JSON for frozen request types: nested dataclasses come back
    from their hints, and lists (JSON's only sequence) as tuples."""
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in fields.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            values[name] = _dataclass_from_json(hint, value)
        else:
            values[name] = _tuples(value)
    return cls(**values)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
