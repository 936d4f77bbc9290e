"""The master's HTTP client for agents and for rank 0's health check.

Every request to an agent is signed with the cluster token's key (``genmlx.core.signing``), and
every answer but a refusal must carry the agent's signature over the request's nonce and the
answer's body: one that does not comes from an impostor (``ImpostorError``), whatever it says.

Maps transport outcomes onto the error tree: no answer or a 5xx is ``AgentUnreachable`` (worth
retrying), 401/403 is ``AuthError``, 404 ``AgentNotFound``, 409 ``AgentConflict``, any other 4xx
``AgentRequestError`` (all three permanent).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any
from urllib.parse import quote, urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from genmlx.core.errors import (
    AgentConflict,
    AgentNotFound,
    AgentRequestError,
    AgentUnreachable,
    AuthError,
    ImpostorError,
)
from genmlx.core.signing import REPLY_HEADER, Keys, SignatureError, check_reply, signed_headers
from genmlx.master.planning.observed import EndpointHealth
from genmlx.wire.agent_state import AgentState, FetchRequest, RankInfo
from genmlx.wire.rank_launch import RankLaunch

STATE_TIMEOUT_S = 5.0
HEALTH_TIMEOUT_S = 3.0
# The error each 4xx an agent answers with becomes here; any other is an ``AgentRequestError``.
REJECTIONS: dict[int, type[AgentRequestError]] = {404: AgentNotFound, 409: AgentConflict}


class AgentClient:
    """Talks to one agent at ``address`` ("host:port"), signing with the cluster's ``keys``."""

    def __init__(self, address: str, keys: Keys, http: AsyncHTTPClient, stop_timeout_s: float = 30.0):
        self.address = address
        self._keys = keys
        self._http = http
        self._stop_timeout_s = stop_timeout_s

    async def state(self) -> AgentState:
        return AgentState.from_json(await self._call("GET", "/api/v1/state", timeout=STATE_TIMEOUT_S))

    async def start_rank(self, launch: RankLaunch) -> RankInfo:
        return RankInfo.from_json(await self._call("POST", "/api/v1/ranks", launch.to_json()))

    async def stop_rank(self, model: str, rank: int) -> None:
        """Stop a rank and forget it; a rank the agent does not know is already stopped."""
        with contextlib.suppress(AgentNotFound):
            await self._call("DELETE", rank_path(model, rank), timeout=self._stop_timeout_s)

    async def fetch_model(self, request: FetchRequest) -> None:
        """Ask the agent to download or sync a model; one already under way is fine."""
        with contextlib.suppress(AgentConflict):
            await self._call("POST", "/api/v1/models", request.to_json())

    async def delete_model(self, storage_path: str, model: str) -> None:
        """Prune a model directory GenMLX put in ``storage_path`` (the agent refuses a user's own
        directory with 409); one that is already gone is fine."""
        query = urlencode({"storagePath": storage_path, "managedOnly": "true"})
        with contextlib.suppress(AgentNotFound):
            await self._call("DELETE", f"/api/v1/models/{quote(model, safe='')}?{query}")

    async def rank_log(self, model: str, rank: int, tail: int = 65536) -> str:
        return await self._call("GET", f"{rank_path(model, rank)}/log?tail={tail}")

    async def _call(self, method: str, path: str, body: Any = None, timeout: float = 15.0) -> Any:
        url = f"http://{self.address}{path}"
        payload = None if body is None else json.dumps(body).encode()
        signed, nonce = signed_headers(self._keys, method, url, payload)
        request = HTTPRequest(
            url,
            method=method,
            headers={**signed, "Content-Type": "application/json"},
            body=payload,
            allow_nonstandard_methods=True,
            connect_timeout=3.0,
            request_timeout=timeout,
        )
        try:
            response = await self._http.fetch(request)
        except HTTPClientError as e:
            if e.response is not None and e.code not in (401, 403):
                self._check_signed(nonce, e.response)
            raise agent_error(self.address, method, path, e) from None
        except OSError as e:
            raise AgentUnreachable(f"agent at {self.address} does not answer: {e}") from None
        self._check_signed(nonce, response)
        if response.headers.get("Content-Type", "").startswith("application/json"):
            return json.loads(response.body)
        return response.body.decode(errors="replace")

    def _check_signed(self, nonce: str, response: HTTPResponse) -> None:
        try:
            check_reply(self._keys, nonce, response.code, response.headers.get(REPLY_HEADER), response.body)
        except SignatureError as e:
            raise ImpostorError(
                f"whatever answers at {self.address} is not a GenMLX agent of this cluster: {e}"
            ) from None


def agent_error(address: str, method: str, path: str, e: HTTPClientError) -> Exception:
    if e.code == 599:
        return AgentUnreachable(f"agent at {address} does not answer: {e.message}")
    if e.code in (401, 403):
        why = error_message(e)
        return AuthError(f"agent at {address} refused our signature (HTTP {e.code}): {why}")
    message = error_message(e)
    if e.code >= 500:
        return AgentUnreachable(f"agent at {address} failed {method} {path}: {message}")
    rejection = REJECTIONS.get(e.code, AgentRequestError)
    return rejection(f"agent at {address} rejected {method} {path}: {message}")


def error_message(e: HTTPClientError) -> str:
    try:
        return json.loads(e.response.body)["error"]["message"]
    except (AttributeError, TypeError, ValueError, KeyError):
        return e.message or f"HTTP {e.code}"


def rank_path(model: str, rank: int) -> str:
    return f"/api/v1/ranks/{quote(model, safe='')}/{rank}"


async def check_endpoint(http: AsyncHTTPClient, host: str, port: int) -> EndpointHealth:
    """Ask rank 0's ``/health`` whether it serves (200), is loading (503) or is down."""
    url = f"http://{host}:{port}/v1"
    try:
        response = await http.fetch(
            f"http://{host}:{port}/health",
            connect_timeout=2.0,
            request_timeout=HEALTH_TIMEOUT_S,
            raise_error=False,
        )
    except OSError as e:
        return EndpointHealth(url, "down", f"rank 0 does not answer: {e}")
    if response.code == 200:
        return EndpointHealth(url, "ready")
    if response.code == 503:
        return EndpointHealth(url, "loading", "loading the model")
    return EndpointHealth(url, "down", f"rank 0 answers /health with HTTP {response.code}")
