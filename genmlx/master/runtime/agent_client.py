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
import email.utils
import errno
import json
import time
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
from genmlx.core.signing import (
    KEY_NOT_HELD,
    REPLY_HEADER,
    WINDOW_S,
    Keys,
    SignatureError,
    check_reply,
    signed_headers,
)
from genmlx.core.tokens import TokenSource
from genmlx.master.planning.observed import EndpointHealth
from genmlx.wire.agent_state import AgentState, FetchRequest, PromptCacheReport, RankInfo
from genmlx.wire.links import LinkCheck, LinkCheckRequest
from genmlx.wire.rank_launch import RankLaunch
from genmlx.wire.telemetry import TelemetryReport

STATE_TIMEOUT_S = 5.0
LINK_CHECK_MARGIN_S = 10.0  # beyond its probe: three connects that may time out, the reply
HEALTH_TIMEOUT_S = 3.0
# A connect that was refused or found no route: nothing was sent (a reset may come mid-request).
NOT_CONNECTED = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL})
CONNECT_TIMEOUT = "Timeout while connecting"  # how tornado's message starts when a connect timed out
# The error each 4xx an agent answers with becomes here; any other is an ``AgentRequestError``.
REJECTIONS: dict[int, type[AgentRequestError]] = {404: AgentNotFound, 409: AgentConflict}


class AgentClient:
    """Talks to one agent at ``address`` ("host:port"), signing with the cluster's token. During a
    rotation's grace it signs with whichever of the two tokens the agent took last (``key_id``),
    and tries the other when the agent does not hold that one.

    An agent announces every address it has (Ethernet, Wi-Fi, a Thunderbolt cable): where the one
    in use cannot be connected to (a cable pulled, an interface down), a request goes to the next
    of ``alternates`` (all of them) instead, and ``address`` becomes the one that answered. Only
    a failed connect moves on: nothing reached the agent, so nothing is done twice."""

    def __init__(
        self,
        address: str,
        tokens: TokenSource,
        http: AsyncHTTPClient,
        stop_timeout_s: float = 30.0,
        alternates: tuple[str, ...] = (),
    ):
        self.address = address
        self.alternates = alternates
        self._tokens = tokens
        self.key_id = ""  # the id of the key the agent took last
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

    async def check_link(self, request: LinkCheckRequest) -> LinkCheck:
        """Have the agent verify its end of a Thunderbolt link (its probe takes up to seconds)."""
        timeout = LINK_CHECK_MARGIN_S + request.probe_seconds
        return LinkCheck.from_json(
            await self._call("POST", "/api/v1/links/check", request.to_json(), timeout)
        )

    async def clear_prompt_cache(self, model: str) -> PromptCacheReport:
        """Empty the model's prompt cache on the agent's disk; what it held."""
        path = f"/api/v1/prompt-caches/{quote(model, safe='')}"
        return PromptCacheReport.from_json(await self._call("DELETE", path))

    async def telemetry(self, since: float) -> TelemetryReport:
        """The node's telemetry samples taken after unix time ``since``."""
        return TelemetryReport.from_json(
            await self._call("GET", f"/api/v1/telemetry?since={since!r}", timeout=STATE_TIMEOUT_S, attempts=1)
        )

    async def rank_log(self, model: str, rank: int, tail: int = 65536) -> str:
        return await self._call("GET", f"{rank_path(model, rank)}/log?tail={tail}")

    async def push_token(self, sealed: dict[str, str], until: float, signed_with: str) -> None:
        """Give the agent a rotated token, sealed for it, signed with the key it holds now."""
        self.key_id = signed_with
        await self._call("POST", "/api/v1/token", {**sealed, "until": until}, attempts=1)

    def keys(self) -> Keys:
        """The keys to sign with, the one the agent took last first."""
        return self._tokens.keys().preferring(self.key_id)

    async def _call(
        self, method: str, path: str, body: Any = None, timeout: float = 15.0, attempts: int = 2
    ) -> Any:
        payload = None if body is None else json.dumps(body).encode()
        choices = self.keys().each()[:attempts]
        for keys in choices:  # the last refusal is raised; any answer returns
            try:
                reply = await self._call_signed(keys, method, path, payload, timeout)
            except KeyNotHeld:
                if keys is choices[-1]:
                    raise
            else:
                self.key_id = keys.signing_id
                return reply

    async def _call_signed(
        self, keys: Keys, method: str, path: str, payload: bytes | None, timeout: float
    ) -> Any:
        """The call at ``address``, else at the first of the other addresses that connects."""
        failures = []
        for address in [self.address, *(a for a in self.alternates if a != self.address)]:
            try:
                reply = await self._call_at(address, keys, method, path, payload, timeout)
            except NotConnected as e:
                failures.append(str(e))
                continue
            self.address = address
            return reply
        raise AgentUnreachable("; ".join(failures))

    async def _call_at(
        self, address: str, keys: Keys, method: str, path: str, payload: bytes | None, timeout: float
    ) -> Any:
        url = f"http://{address}{path}"
        signed, nonce = signed_headers(keys, method, url, payload)
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
                check_signed(address, keys, nonce, e.response)
            if e.code == 599 and (e.message or "").startswith(CONNECT_TIMEOUT):
                raise NotConnected(f"agent at {address} does not answer: {e.message}") from None
            raise agent_error(address, method, path, e) from None
        except OSError as e:
            unreachable = NotConnected if e.errno in NOT_CONNECTED else AgentUnreachable
            raise unreachable(f"agent at {address} does not answer: {e}") from None
        check_signed(address, keys, nonce, response)
        if response.headers.get("Content-Type", "").startswith("application/json"):
            return json.loads(response.body)
        return response.body.decode(errors="replace")


class NotConnected(AgentUnreachable):
    """A connection to one of the agent's addresses could not be made: the request never left."""


class ClockSkew(AuthError):
    """The agent refused a signed request because its clock and the master's are more than the
    signature window apart."""


class KeyNotHeld(AuthError):
    """The agent does not hold the token this request was signed with (a rotation under way, or
    another cluster's agent)."""


def check_signed(address: str, keys: Keys, nonce: str, response: HTTPResponse) -> None:
    """Raise ``ImpostorError`` unless ``response`` carries the agent's signature over ``nonce``."""
    try:
        check_reply(keys, nonce, response.code, response.headers.get(REPLY_HEADER), response.body)
    except SignatureError as e:
        raise ImpostorError(
            f"whatever answers at {address} is not a GenMLX agent of this cluster: {e}"
        ) from None


def agent_error(address: str, method: str, path: str, e: HTTPClientError) -> Exception:
    if e.code == 599:
        return AgentUnreachable(f"agent at {address} does not answer: {e.message}")
    if e.code in (401, 403):
        why = error_message(e)
        skew = clock_skew(e.response)
        if skew is not None and abs(skew) > WINDOW_S:
            side = "ahead of" if skew > 0 else "behind"
            return ClockSkew(
                f"agent at {address} refused our signature: its clock is {abs(skew):.0f} s {side} this "
                f"master's, and a signed request may be at most {WINDOW_S} s off; set both clocks by NTP"
            )
        refusal = KeyNotHeld if KEY_NOT_HELD in why else AuthError
        return refusal(f"agent at {address} refused our signature (HTTP {e.code}): {why}")
    message = error_message(e)
    if e.code >= 500:
        return AgentUnreachable(f"agent at {address} failed {method} {path}: {message}")
    rejection = REJECTIONS.get(e.code, AgentRequestError)
    return rejection(f"agent at {address} rejected {method} {path}: {message}")


def clock_skew(response: HTTPResponse | None) -> float | None:
    """How far the answering machine's clock (its reply's ``Date``) is ahead of ours, in seconds;
    None without a readable date."""
    try:
        sent = email.utils.parsedate_to_datetime(response.headers["Date"]).timestamp()
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return sent - time.time()


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
    except HTTPClientError as e:  # tornado raises its timeouts (599) even with raise_error=False
        # A rank's API goes deaf while MLX joins its group (the join holds the interpreter).
        return EndpointHealth(
            url, "down", f"rank 0 did not answer /health within {HEALTH_TIMEOUT_S:g} s: {e}"
        )
    if response.code == 200:
        return EndpointHealth(url, "ready")
    if response.code == 503:
        return EndpointHealth(url, "loading", "loading the model")
    return EndpointHealth(url, "down", f"rank 0 answers /health with HTTP {response.code}")
