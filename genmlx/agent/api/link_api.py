"""The agent's link endpoints: ``POST /api/v1/links/check`` verifies one end of a Thunderbolt link
(the master asks, on its schedule and when a user asks for it), and ``GET /api/v1/links/probe``
streams zeros to the agent at the other end, which times them."""

from __future__ import annotations

from tornado.iostream import StreamClosedError

from genmlx.agent.api.base import AgentHandler
from genmlx.agent.links.verify import LinkVerifier
from genmlx.core.errors import AgentRequestError
from genmlx.core.http import ClusterAuth
from genmlx.wire.codec import decode_json
from genmlx.wire.links import MAX_PROBE_BYTES, LinkCheckRequest

PROBE_CHUNK = 4 << 20
ZEROS = bytes(PROBE_CHUNK)  # written as it is: no copy per chunk


class InvalidLinkCheck(AgentRequestError):
    """A link check request was malformed; the message names the field (HTTP 400)."""


class LinkCheckHandler(AgentHandler):
    def initialize(self, auth: ClusterAuth, links: LinkVerifier) -> None:
        super().initialize(auth)
        self.links = links

    async def post(self) -> None:
        request = decode_json(LinkCheckRequest, self.request.body, error=InvalidLinkCheck)
        result = await self.links.check(request)
        self.write(result.to_json())


class LinkProbeHandler(AgentHandler):
    async def get(self) -> None:
        try:
            total = int(self.get_query_argument("bytes", "0"))
        except ValueError:
            raise InvalidLinkCheck("bytes must be a whole number") from None
        if not 0 <= total <= MAX_PROBE_BYTES:
            raise InvalidLinkCheck(f"bytes must be 0 to {MAX_PROBE_BYTES}")
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Content-Length", str(total))
        sent = 0
        while sent < total:
            size = min(PROBE_CHUNK, total - sent)
            self.write(ZEROS if size == PROBE_CHUNK else ZEROS[:size])
            try:
                await self.flush()
            except StreamClosedError:
                return  # the checker has measured enough
            sent += size
        self.finish()
