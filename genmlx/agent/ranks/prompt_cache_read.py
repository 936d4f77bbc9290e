"""What a serving rank 0's prompt cache holds and supplied (``GET /api/v1/prompt-cache`` of the rank,
signed with the cluster token's key), read by the agent after each health check that found it ready
and reported in its ``RankInfo``."""

from __future__ import annotations

import json
import logging

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from genmlx.core.signing import REPLY_HEADER, Keys, SignatureError, check_reply, signed_headers
from genmlx.core.tokens import TokenSource
from genmlx.wire.agent_state import PromptCacheTier
from genmlx.wire.codec import WireError, decode

log = logging.getLogger(__name__)
TIMEOUT_S = 1.0


def token_keys(token: str | TokenSource) -> Keys:
    return Keys.of(token) if isinstance(token, str) else token.keys()


async def read_prompt_cache(
    http: AsyncHTTPClient, host: str, port: int, keys: Keys
) -> tuple[PromptCacheTier, ...] | None:
    """Rank 0's tiers; None where it did not say (busy, an older dispatcher, an answer not signed
    by this cluster's key)."""
    url = f"http://{host}:{port}/api/v1/prompt-cache"
    headers, nonce = signed_headers(keys, "GET", url, None)
    try:
        response = await http.fetch(
            url, headers=headers, connect_timeout=TIMEOUT_S, request_timeout=TIMEOUT_S, raise_error=False
        )
        check_reply(keys, nonce, response.code, response.headers.get(REPLY_HEADER), response.body)
    except (OSError, HTTPClientError, SignatureError) as e:
        log.debug("no prompt cache figures from %s: %s", url, e)
        return None
    if response.code != 200:
        return None
    try:
        tiers = json.loads(response.body)["tiers"]
        return tuple(decode(PromptCacheTier, tier, unknown="ignore") for tier in tiers)
    except (ValueError, KeyError, TypeError, WireError) as e:
        log.debug("unreadable prompt cache figures from %s: %s", url, e)
        return None
