"""Reading a ``POST /api/v1/ranks`` body into a ``RankLaunch``, refusing anything malformed.

Every refusal names the field at fault, so the master's event log says what to fix; the rules are
the wire type's own (``genmlx.wire.rank_launch``).
"""

from __future__ import annotations

from genmlx.core.errors import AgentRequestError
from genmlx.wire.codec import decode_json
from genmlx.wire.rank_launch import RankLaunch


class InvalidLaunch(AgentRequestError):
    """A rank launch request was malformed; the message names the field (HTTP 400)."""


def parse_rank_launch(body: bytes) -> RankLaunch:
    """Validate a JSON body and build the launch it describes."""
    return decode_json(RankLaunch, body, error=InvalidLaunch)
