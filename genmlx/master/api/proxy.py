"""The OpenAI router: ``/v1/*`` on the master goes to rank 0 of the model the request names.
Anthropic's ``/v1/messages`` and ``/v1/messages/count_tokens`` are routed the same way; what the
master itself refuses there, and any other path under ``/v1/messages``, it answers in Anthropic's
error shape.

Bodies pass through untouched and responses stream back chunk by chunk as rank 0 writes them,
so SSE works end to end. The request to rank 0 is signed with the cluster token's key (the token
itself never leaves the master), and rank 0's reply must carry its signature: a whole reply is
held until its signature over the body is checked (rank 0 wrote it in one piece anyway); a
streamed one is passed on once the signature over its status is.

A client that hangs up closes the upstream connection at once (``upstream``), which is how rank 0
learns to stop, even in the middle of reading a long prompt. A stream that rank 0 stops writing
midway (it died, or its group was restarted) ends with an error event in the stream's own terms,
since its status has long been sent: a client never takes a cut stream for a finished one.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlsplit

from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError

from genmlx.core.errors import ApiError, BadGateway, ModelNotNamed, NotReady, UnknownModel, UnknownRoute
from genmlx.core.http import ANTHROPIC_ERRORS, ApiHandler, ClientKey, ClusterAuth, anthropic_error_json
from genmlx.core.signing import REPLY_HEADER, SignatureError, check_reply, reply_covers_body, signed_headers
from genmlx.master.api.client_keys import ClientKeys
from genmlx.master.api.upstream import Upstream
from genmlx.master.api.usage import ReplyUsage
from genmlx.master.runtime.loop import Reconciler

PASSED_HEADERS = ("Content-Type", "Retry-After", "Cache-Control")


class ModelsHandler(ApiHandler):
    """``GET /v1/models``: the models that serve now, so a client offers none that would answer 503;
    ``GET /v1/models/{id}`` of a declared model that does not serve is a 404 that says why. A client
    key sees only the models it reaches."""

    accepts_client_keys = True

    def initialize(self, auth: ClusterAuth, reconciler: Reconciler) -> None:
        super().initialize(auth)
        self.reconciler = reconciler

    def get(self, model_id: str | None = None) -> None:
        applied = self.reconciler.applied
        created = int(applied.applied_at) if applied else int(time.time())
        served = visible(ready_models(self.reconciler), self.client_key)
        if model_id is None:
            data = [model_object(name, created) for name in served]
            return self.write_json(200, {"object": "list", "data": data})
        if model_id in served:
            return self.write_json(200, model_object(model_id, created))
        if model_id in visible(self.reconciler.model_names(), self.client_key):
            why = self.reconciler.why_not_serving(model_id)
            message = f"The model {model_id!r} is not ready: {why}"
            raise UnknownModel(message, param="model", code="model_not_ready")
        raise UnknownModel(f"The model {model_id!r} does not exist.", param="model")


def visible(models: tuple[str, ...], key: ClientKey | None) -> tuple[str, ...]:
    """The models a request may know of: every one, or those its client key reaches."""
    return models if key is None else tuple(model for model in models if key.reaches(model))


def ready_models(reconciler: Reconciler) -> tuple[str, ...]:
    """The declared models that serve now, in the manifest's order."""
    ready = reconciler.serving_endpoints()
    return tuple(name for name in reconciler.model_names() if name in ready)


def model_object(name: str, created: int) -> dict[str, Any]:
    """OpenAI's model object, exactly its four fields."""
    return {"id": name, "object": "model", "created": created, "owned_by": "genmlx"}


class ProxyHandler(ApiHandler):
    """``POST /v1/{path}``: the request, untouched, to rank 0 of the model it names. A client key
    reaches its own models only, and the tokens of its replies are counted (``keys``)."""

    accepts_client_keys = True

    def initialize(self, auth: ClusterAuth, reconciler: Reconciler, keys: ClientKeys) -> None:
        super().initialize(auth)
        self.reconciler = reconciler
        self.keys = keys
        self.usage = ReplyUsage()
        self.upstream = Upstream()
        self.status = 502
        self.nonce = ""
        self.signature: str | None = None  # rank 0's signature of its reply
        self.held: bytearray | None = None  # a whole reply, until its signature is checked
        self.unproven = ""  # why rank 0's reply was not accepted

    def on_connection_close(self) -> None:
        # At once, not at rank 0's next write: that may be a long prompt away.
        self.upstream.close()

    async def post(self, path: str) -> None:
        body = self.json_body()
        upstream = endpoint_for(self.reconciler, body.get("model"), self.client_key)
        await self.forward(f"{upstream}/{path}", self.request.body)

    async def forward(self, url: str, body: bytes, extra_headers: dict[str, str] | None = None) -> None:
        # Signed with the token rank 0's node holds (it may still hold the old one in a rotation).
        self.upstream_keys = self.reconciler.clients.keys_for_host(urlsplit(url).hostname or "")
        signed, self.nonce = signed_headers(self.upstream_keys, "POST", url, body)
        headers = {"Content-Type": "application/json", **signed, **(extra_headers or {})}
        try:
            await self.upstream.post(url, body, headers, self.start_response, self.relay)
        except StreamClosedError:
            if self.request.connection.stream.closed():  # our client left: nothing to answer
                return
            self.reconciler.wake()
            if self.unproven:
                message = f"What answers at {url} is not the model's rank 0: {self.unproven}."
            else:
                message = f"The model's rank 0 at {url} closed the connection mid-reply."
            if self.streaming():
                return self.finish(self.stream_error(BadGateway(message)))
            raise BadGateway(message) from None
        except (OSError, TimeoutError) as e:
            self.reconciler.wake()  # evidence that the cluster changed: look now, not at the next resync
            raise BadGateway(f"The model's rank 0 at {url} did not answer: {e}") from None
        if self.held is not None:
            self.pass_on_whole_reply(url)
        if self.client_key is not None:
            self.keys.count_tokens(self.client_key, self.usage.prompt_tokens, self.usage.completion_tokens)
        self.finish()

    def pass_on_whole_reply(self, url: str) -> None:
        try:
            check_reply(self.upstream_keys, self.nonce, self.status, self.signature, bytes(self.held))
        except SignatureError as e:
            self.reconciler.wake()
            raise BadGateway(f"What answers at {url} is not the model's rank 0: {e}.") from None
        self.received(self.status, bytes(self.held))
        if self.client_key is not None:  # only a client key's tokens are counted
            self.usage.whole(bytes(self.held))
        self.write(bytes(self.held))

    def relay(self, chunk: bytes) -> None:
        if self.held is not None:
            self.held += chunk
            return
        self.received(self.status, chunk)
        if self.client_key is not None:
            self.usage.streamed(chunk)
        self.write(chunk)
        self.flush()

    def received(self, status: int, chunk: bytes) -> None:
        """Each chunk of the upstream reply as it passes (a subclass may keep what it needs)."""

    def streaming(self) -> bool:
        """Whether a server-sent event stream has begun to pass to the client."""
        content_type = str(self._headers.get("Content-Type", ""))
        return self._headers_written and content_type.startswith("text/event-stream")

    def stream_error(self, error: ApiError) -> str:
        """The event that ends a cut stream: OpenAI's ``data: {"error": ...}``."""
        return f"data: {json.dumps(error.to_json())}\n\n"

    def start_response(self, code: int, headers: HTTPHeaders) -> None:
        self.status, self.signature = code, headers.get(REPLY_HEADER)
        if reply_covers_body(self.signature):
            self.held = bytearray()
        else:
            try:
                check_reply(self.upstream_keys, self.nonce, code, self.signature)
            except SignatureError as e:
                refused = "it refused the master's signature (does its node hold this cluster's token?)"
                self.unproven = refused if code == 401 else str(e)
                self.upstream.close()
                return
        self.set_status(code)
        for name in PASSED_HEADERS:
            if name in headers:
                self.set_header(name, headers[name])


class AnthropicProxyHandler(ProxyHandler):
    """``POST /v1/messages`` and ``/v1/messages/count_tokens``: routed by the body's model like any
    other, with the master's own errors (no model, not ready, no answer) in Anthropic's shape."""

    error_format = ANTHROPIC_ERRORS

    def stream_error(self, error: ApiError) -> str:
        return f"event: error\ndata: {json.dumps(anthropic_error_json(error))}\n\n"


class UnknownMessagesRouteHandler(ApiHandler):
    """Any other path under ``/v1/messages`` (batches, say): no rank serves it, so the master answers
    the 404 itself, in Anthropic's shape, whatever model the body names (batches name none)."""

    error_format = ANTHROPIC_ERRORS
    accepts_client_keys = True

    def prepare(self) -> None:
        super().prepare()
        raise UnknownRoute(f"Invalid URL ({self.request.method} {self.request.path}).")


def endpoint_for(reconciler: Reconciler, model: Any, key: ClientKey | None = None) -> str:
    """The base URL of ``model``'s rank 0, or the API error that says why there is none (a model
    the client ``key`` does not reach does not exist, as far as that key can tell)."""
    if not isinstance(model, str) or not model:
        raise ModelNotNamed()
    names = visible(reconciler.model_names(), key)
    if model not in names:
        served = ", ".join(names) or "none"
        raise UnknownModel(f"The model {model!r} does not exist (models: {served}).", param="model")
    endpoint = reconciler.serving_endpoints().get(model)
    if endpoint is None:
        why = reconciler.why_not_serving(model)
        raise NotReady(f"The model {model!r} is not ready: {why}", code="model_not_ready")
    return endpoint
