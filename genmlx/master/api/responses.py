"""The Responses API through the master: ``POST /v1/responses`` to rank 0 of the model it names,
with ``previous_response_id`` resolved here (``genmlx.master.runtime.responses``), and
``GET`` / ``DELETE /v1/responses/{id}`` of stored responses.

A continued request is sent to the model with the stored conversation, then its own input, as its
``input`` (and ``EXPANDED_INPUT_HEADER`` to say so); its reply passes through untouched while the
finished response is kept, unless the request asked ``store: false``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from genmlx.core.errors import ApiError, ResponseNotFound
from genmlx.core.http import ApiHandler, ClientKey, ClusterAuth
from genmlx.master.api.client_keys import ClientKeys
from genmlx.master.api.proxy import ProxyHandler, endpoint_for
from genmlx.master.runtime.loop import Reconciler
from genmlx.master.runtime.responses import ResponseStore, StoredResponse, final_response, input_items
from genmlx.wire.responses import EXPANDED_INPUT_HEADER

log = logging.getLogger(__name__)

MAX_KEPT_REPLY_BYTES = 16 << 20  # a reply larger than this passes through without being stored


def stored_or_404(
    responses: ResponseStore, response_id: str, key: ClientKey | None, param: str | None = None
) -> StoredResponse:
    """The stored response, or a 404; to a client key, one of a model it does not reach is not there."""
    stored = responses.get(response_id)
    if stored is None or (key is not None and not key.reaches(stored.model)):
        raise ResponseNotFound(
            f"No stored response with id {response_id!r}: it was stored with 'store': false, deleted, or is "
            "older than the responses this master keeps.",
            param=param,
        )
    return stored


class ResponsesProxyHandler(ProxyHandler):
    """``POST /v1/responses``."""

    def initialize(
        self, auth: ClusterAuth, reconciler: Reconciler, keys: ClientKeys, responses: ResponseStore
    ) -> None:
        super().initialize(auth, reconciler, keys)
        self.responses = responses
        self._reply = bytearray()
        self._keeping = False
        self._events = 0  # streamed events passed on so far

    async def post(self, path: str = "responses") -> None:
        body = self.json_body()
        conversation, headers = input_items(body.get("input")), {}
        if isinstance(body.get("previous_response_id"), str):
            previous = body["previous_response_id"]
            stored = stored_or_404(self.responses, previous, self.client_key, "previous_response_id")
            conversation = stored.conversation + conversation
            body, headers = {**body, "input": conversation}, {EXPANDED_INPUT_HEADER: "1"}
        upstream = endpoint_for(self.reconciler, body.get("model"), self.client_key)
        self._keeping = body.get("store") is not False
        await self.forward(f"{upstream}/responses", json.dumps(body).encode(), headers)
        if self._keeping:
            self.keep(body, conversation)

    def stream_error(self, error: ApiError) -> str:
        """Responses' ``error`` event, numbered after the last event rank 0 sent."""
        event = {"type": "error", "code": error.code, "message": error.message, "param": None}
        return f"event: error\ndata: {json.dumps({**event, 'sequence_number': self._events})}\n\n"

    def received(self, status: int, chunk: bytes) -> None:
        self._events += chunk.count(b"event: ")
        if not self._keeping:
            return
        if status != 200 or len(self._reply) + len(chunk) > MAX_KEPT_REPLY_BYTES:
            self._keeping = False  # an error is not stored; an outsized reply passes through
            self._reply.clear()
            return
        self._reply += chunk

    def keep(self, body: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        response = final_response(bytes(self._reply), streamed=body.get("stream") is True)
        if response is None:
            log.info("a response to %s was not stored: it did not finish", body.get("model"))
            return
        self.responses.put(body["model"], conversation + response.get("output", []), response)


class StoredResponseHandler(ApiHandler):
    """``GET`` / ``DELETE /v1/responses/{id}``."""

    accepts_client_keys = True

    def initialize(self, auth: ClusterAuth, responses: ResponseStore) -> None:
        super().initialize(auth)
        self.responses = responses

    def get(self, response_id: str) -> None:
        self.write_json(200, stored_or_404(self.responses, response_id, self.client_key).response)

    def delete(self, response_id: str) -> None:
        stored_or_404(self.responses, response_id, self.client_key)
        self.responses.delete(response_id)
        self.write_json(200, {"id": response_id, "object": "response", "deleted": True})
