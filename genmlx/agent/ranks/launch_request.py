"""Reading a ``POST /api/v1/ranks`` body into a ``RankLaunch``, refusing anything malformed.

Every refusal names the field at fault, so the master's event log says what to fix.
"""

from __future__ import annotations

import json
import re
from typing import Any

from genmlx.core.errors import AgentRequestError
from genmlx.wire.agent_state import MODEL_NAME, RankLaunch

HOST_PORT = re.compile(r"[^\s:]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}")
FIELDS = {
    "model",
    "modelPath",
    "rank",
    "worldSize",
    "port",
    "specHash",
    "hostfile",
    "maxBatch",
    "maxQueue",
    "contextLength",
    "parallelism",
    "layerSplit",
}
PARALLELISMS = ("tensor", "pipeline")


class InvalidLaunch(AgentRequestError):
    """A rank launch request was malformed; the message names the field (HTTP 400)."""

    def __init__(self, message: str):
        super().__init__(message, status=400)


def parse_rank_launch(body: bytes) -> RankLaunch:
    """Validate a JSON body and build the launch it describes."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidLaunch(f"body: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InvalidLaunch("body: expected a JSON object")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise InvalidLaunch(f"{unknown[0]}: unknown field")
    launch = RankLaunch(
        model=model_name_field(data),
        model_path=string_field(data, "modelPath"),
        rank=int_field(data, "rank", minimum=0),
        world_size=int_field(data, "worldSize", minimum=1),
        port=int_field(data, "port", minimum=1, maximum=65535),
        spec_hash=string_field(data, "specHash"),
        hostfile=hostfile_field(data),
        max_batch=int_field(data, "maxBatch", minimum=1, default=8),
        max_queue=int_field(data, "maxQueue", minimum=1, default=64),
        context_length=optional_int_field(data, "contextLength", minimum=1),
        parallelism=parallelism_field(data),
        layer_split=layer_split_field(data),
    )
    check_group_shape(launch)
    return launch


def check_group_shape(launch: RankLaunch) -> None:
    if launch.rank >= launch.world_size:
        raise InvalidLaunch(f"rank: {launch.rank} is not below worldSize {launch.world_size}")
    if launch.layer_split is not None and len(launch.layer_split) != launch.world_size:
        raise InvalidLaunch(
            f"layerSplit: {len(launch.layer_split)} entries for worldSize {launch.world_size}"
        )
    if launch.hostfile and len(launch.hostfile) != launch.world_size:
        raise InvalidLaunch(
            f"hostfile: {len(launch.hostfile)} entries for worldSize {launch.world_size}; "
            "give one per rank, or none"
        )


def model_name_field(data: dict[str, Any]) -> str:
    name = string_field(data, "model")
    if not MODEL_NAME.fullmatch(name):
        raise InvalidLaunch(
            f"model: {name!r} must be 1 to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def string_field(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidLaunch(f"{key}: required, a non-empty string")
    return value


def int_field(
    data: dict[str, Any], key: str, minimum: int, maximum: int | None = None, default: int | None = None
) -> int:
    value = data.get(key, default)
    # bool is an int in Python but never a sensible count or port.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidLaunch(f"{key}: required, an integer")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise InvalidLaunch(f"{key}: {value} must be at least {minimum}{upper}")
    return value


def optional_int_field(data: dict[str, Any], key: str, minimum: int) -> int | None:
    if data.get(key) is None:
        return None
    return int_field(data, key, minimum)


def hostfile_field(data: dict[str, Any]) -> tuple[str, ...]:
    value = data.get("hostfile") or []
    if not isinstance(value, list) or not all(isinstance(v, str) and HOST_PORT.fullmatch(v) for v in value):
        raise InvalidLaunch('hostfile: expected a list of "host:port" strings, one per rank')
    return tuple(value)


def parallelism_field(data: dict[str, Any]) -> str:
    value = data.get("parallelism", "tensor")
    if value not in PARALLELISMS:
        raise InvalidLaunch(f"parallelism: {value!r} must be one of {', '.join(PARALLELISMS)}")
    return value


def layer_split_field(data: dict[str, Any]) -> tuple[int, ...] | None:
    value = data.get("layerSplit")
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value
    ):
        raise InvalidLaunch("layerSplit: expected a list of positive layer counts, one per rank")
    return tuple(value)
