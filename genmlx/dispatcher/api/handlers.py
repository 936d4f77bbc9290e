"""The OpenAI-compatible HTTP API of rank 0: thin tornado handlers over the engine.

Handlers parse (``request_parsing``), tokenize (``prompts``), submit to the engine and format its
events (``openai_format``). Each takes the collaborators it uses as ``initialize`` keywords (the
route table in ``app`` hands them out) and a ``token`` of None when the API is open. Errors are
raised as ``ApiError`` and rendered once, in OpenAI's shape, by ``genmlx.core.http.ApiHandler``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from tornado.iostream import StreamClosedError

from genmlx.core.errors import ApiError, InternalError, NotReady, UnknownModel, UnknownRoute
from genmlx.core.http import ApiHandler, ClusterAuth
from genmlx.dispatcher.api.metrics import DispatcherMetrics
from genmlx.dispatcher.api.openai_format import (
    ChatCompletionFormat,
    RawJson,
    ResponseFormat,
    TextCompletionFormat,
    model_json,
    models_list,
)
from genmlx.dispatcher.api.prompts import (
    chat_prompt_tokens,
    completion_budget,
    completion_prompt_tokens,
    system_prompt_boundary,
)
from genmlx.dispatcher.api.reply_parsing import reply_parser
from genmlx.dispatcher.api.request_parsing import (
    ChatCompletionRequest,
    CompletionRequest,
    parse_chat_request,
    parse_completion_request,
)
from genmlx.dispatcher.engine.events import (
    EngineEvent,
    Failed,
    Finished,
    GenerationRequest,
    Job,
    TextDelta,
    Usage,
)
from genmlx.dispatcher.engine.runner import Engine, LoadedModel

# One encoder for every streamed chunk: json.dumps with options builds a new one per call.
SSE_JSON = json.JSONEncoder(ensure_ascii=False)
CLIENT_CLOSED = 499  # nginx's convention, so the access log tells a vanished client from a served one
CANCEL_CONFIRM_SECONDS = 2.0


class HealthHandler(ApiHandler):
    """``GET /health``: 503 while the model loads, 200 when it serves. No token needed."""

    requires_token = False

    def initialize(self, auth: ClusterAuth | None, model_id: str, engine: Engine) -> None:
        super().initialize(auth)
        self.model_id = model_id
        self.engine = engine

    def get(self) -> None:
        if self.engine.loaded is None:
            self.set_status(503)
            self.finish({"status": "loading"})
        else:
            self.finish({"status": "ok", "model": self.model_id})


class MetricsHandler(ApiHandler):
    """``GET /metrics``: Prometheus text format; Prometheus scrapes it with the bearer token."""

    def initialize(self, auth: ClusterAuth | None, metrics: DispatcherMetrics) -> None:
        super().initialize(auth)
        self.metrics = metrics

    def get(self) -> None:
        body, content_type = self.metrics.exposition()
        self.set_header("Content-Type", content_type)
        self.finish(body)


class ModelListing(ApiHandler):
    """An endpoint that describes the one model served here."""

    def initialize(self, auth: ClusterAuth | None, model_id: str, started_at: int) -> None:
        super().initialize(auth)
        self.model_id = model_id
        self.started_at = started_at


class ModelsHandler(ModelListing):
    """``GET /v1/models``."""

    def get(self) -> None:
        self.finish(models_list(self.model_id, self.started_at))


class ModelHandler(ModelListing):
    """``GET /v1/models/{id}``."""

    def get(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise UnknownModel(f"The model '{model_id}' does not exist.", param="model")
        self.finish(model_json(self.model_id, self.started_at))


class UnknownRouteHandler(ApiHandler):
    """Any other path: a 404 in OpenAI's shape."""

    def prepare(self) -> None:
        super().prepare()
        raise UnknownRoute(f"Invalid URL ({self.request.method} {self.request.path}).")


def served_model(engine: Engine, model_id: str, requested: str | None) -> LoadedModel:
    """The loaded model a request for ``requested`` (None: whichever is served) is answered with."""
    if requested is not None and requested != model_id:
        raise UnknownModel(
            f"The model '{requested}' does not exist; this server serves '{model_id}'.", param="model"
        )
    loaded = engine.loaded
    if loaded is None:
        raise NotReady("The model is still loading; retry shortly.")
    return loaded


class GenerationHandler(ApiHandler):
    """Drives one completion: submit, then answer as one JSON body or as server-sent events."""

    prompt_field = "prompt"
    sse_done: str | None = "[DONE]"  # the data line that ends a stream

    def initialize(
        self, auth: ClusterAuth | None, model_id: str, engine: Engine, metrics: DispatcherMetrics
    ) -> None:
        super().initialize(auth)
        self.model_id = model_id
        self.engine = engine
        self.metrics = metrics
        self.usage: Usage | None = None  # for the access log, once the reply has ended
        self.finish_reason: str | None = None
        self._job: Job | None = None
        self._client_gone = False
        self._ended: asyncio.Future[Finished | Failed] | None = None
        self._deltas: list[TextDelta] = []  # a whole response's text, until it ends
        self._streaming: ResponseFormat | None = None  # set while deltas are written as they come

    def parse(self, body: bytes) -> ChatCompletionRequest | CompletionRequest:
        raise NotImplementedError

    def error_payload(self, error: ApiError) -> dict:
        """An error as this API writes it into a stream."""
        return error.to_json()

    def prompt_tokens(self, loaded: LoadedModel, parsed: Any) -> tuple[int, ...]:
        raise NotImplementedError

    def response_format(self, loaded: LoadedModel, parsed: Any, prompt: tuple[int, ...]) -> ResponseFormat:
        raise NotImplementedError

    async def post(self) -> None:
        arrived = time.monotonic()
        parsed = self.parse(self.request.body)
        options = parsed.options
        loaded = self._served_model(options.model)
        request = self._generation_request(loaded, parsed)
        response = self.response_format(loaded, parsed, request.prompt_tokens)
        self._ended = asyncio.get_running_loop().create_future()
        measured = self.metrics.request_arrived(arrived)
        self._job = self.engine.submit(request, measured.observing(self._on_event))
        measured.submitted()
        try:
            if options.stream:
                await self._stream(response, options.include_usage)
            else:
                await self._respond(response)
        finally:
            self._job.cancel()  # a no-op once finished; stops generation if we leave early
            self._ended.cancel()  # a no-op once ended; later events find nobody to write to
            measured.leave()

    def on_connection_close(self) -> None:
        self._client_gone = True
        if self._job is not None:
            self._job.cancel()

    def _on_event(self, event: EngineEvent) -> None:
        """Each event of the job, called on the event loop as the engine delivers a step's events.

        A streamed delta is written and flushed right here, without a round trip through this
        handler's coroutine; the end of the reply resolves ``_ended`` for the coroutine to finish.
        The flush is not awaited: the engine does not wait for slow clients either, and a write to a
        closed connection fails quietly (``on_connection_close`` cancels the job)."""
        if self._ended.done():
            return
        if isinstance(event, Finished | Failed):
            self._ended.set_result(event)
        elif self._streaming is None:
            self._deltas.append(event)
        elif not self._client_gone:
            try:
                for chunk in self._streaming.stream_delta(event):
                    self.write(self.sse_frame(chunk))
                self.flush()
            except Exception as e:  # raised in the handler, never into the engine's delivery
                self._ended.set_exception(e)

    def _generation_request(
        self, loaded: LoadedModel, parsed: ChatCompletionRequest | CompletionRequest
    ) -> GenerationRequest:
        options = parsed.options
        prompt = self.prompt_tokens(loaded, parsed)
        max_tokens = self.max_tokens(len(prompt), options.max_tokens, loaded)
        constraint = options.constraint
        if options.forced_tools is not None:
            constraint = options.forced_tools.constraint(loaded.tokenizer, getattr(parsed, "tools", ()))
        if constraint is not None:
            constraint.check(loaded.tokenizer)
        return GenerationRequest(
            request_id=secrets.token_hex(8),
            prompt_tokens=prompt,
            max_tokens=max_tokens,
            sampling=options.sampling,
            stop=options.stop,
            top_logprobs=options.top_logprobs,
            grammar=constraint.grammar if constraint is not None else None,
            boundaries=self.shared_boundaries(loaded, parsed, prompt),
        )

    def shared_boundaries(self, loaded: LoadedModel, parsed: Any, prompt: tuple[int, ...]) -> tuple[int, ...]:
        """Positions of ``prompt`` other conversations share (``GenerationRequest.boundaries``)."""
        return ()

    def max_tokens(self, prompt_length: int, requested: int | None, loaded: LoadedModel) -> int:
        """How many tokens to generate at most, or the error this API refuses a request with."""
        return completion_budget(
            prompt_length,
            requested,
            loaded.context_length,
            prompt_field=self.prompt_field,
            context_length_set=loaded.context_length_set,
        )

    def _served_model(self, requested: str | None) -> LoadedModel:
        return served_model(self.engine, self.model_id, requested)

    async def _respond(self, response: ResponseFormat) -> None:
        ended = await self._ended
        if isinstance(ended, Failed):
            raise InternalError(ended.message)
        self._record(ended)
        if ended.reason == "cancelled":
            return self._end_cancelled()
        self.finish(response.full(self._deltas, ended))

    async def _stream(self, response: ResponseFormat, include_usage: bool) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        try:
            for start in response.stream_start():
                self.write(self.sse_frame(start))
            self._streaming = response  # from here on, _on_event writes each delta as it comes
            await self.flush()
            await self._stream_end(await self._ended, response, include_usage)
        except StreamClosedError:
            self._client_gone = True
            self.set_status(CLIENT_CLOSED, "Client Closed Request")
            await self._await_cancellation()

    async def _await_cancellation(self) -> None:
        """Cancel and wait (briefly) for the engine to confirm, so the access log shows the tokens
        spent; a job still queued behind another is confirmed only when dequeued, hence the bound."""
        if self._job is not None:
            self._job.cancel()
        try:
            async with asyncio.timeout(CANCEL_CONFIRM_SECONDS):
                ended = await self._ended
        except TimeoutError:
            return
        if isinstance(ended, Finished):
            self._record(ended)

    async def _stream_end(
        self, ended: Finished | Failed, response: ResponseFormat, include_usage: bool
    ) -> None:
        """The end of a stream whose deltas ``_on_event`` wrote."""
        if isinstance(ended, Failed):
            await self._send_event(self.error_payload(InternalError(ended.message)))
            return
        self._record(ended)
        if ended.reason == "cancelled":
            return self._end_cancelled()
        for chunk in response.stream_finish(ended):
            await self._send_event(chunk)
        if include_usage:
            await self._send_event(response.stream_usage(ended.usage))
        if self.sse_done is not None:
            await self._send_data(self.sse_done)

    async def _send_event(self, payload: dict) -> None:
        self.write(self.sse_frame(payload))
        await self.flush()

    def sse_frame(self, payload: dict | RawJson) -> str:
        """One server-sent event carrying ``payload`` (Anthropic's API also names the event)."""
        body = payload if isinstance(payload, RawJson) else SSE_JSON.encode(payload)
        return f"data: {body}\n\n"

    async def _send_data(self, data: str) -> None:
        self.write(f"data: {data}\n\n")
        await self.flush()

    def _record(self, finished: Finished) -> None:
        self.usage = finished.usage
        self.finish_reason = finished.reason

    def _end_cancelled(self) -> None:
        """A job ends cancelled when its client left (nothing to say) or the server is stopping."""
        if self._client_gone:
            self.set_status(CLIENT_CLOSED, "Client Closed Request")
            return
        error = NotReady("The server is shutting down.", code="shutting_down")
        if self._headers_written:
            self.write(self.sse_frame(self.error_payload(error)))
            return
        raise error


class ChatCompletionsHandler(GenerationHandler):
    """``POST /v1/chat/completions``."""

    prompt_field = "messages"

    def parse(self, body: bytes) -> ChatCompletionRequest:
        return parse_chat_request(body)

    def prompt_tokens(self, loaded: LoadedModel, parsed: ChatCompletionRequest) -> tuple[int, ...]:
        return chat_prompt_tokens(loaded.tokenizer, parsed.messages, parsed.tools)

    def shared_boundaries(
        self, loaded: LoadedModel, parsed: ChatCompletionRequest, prompt: tuple[int, ...]
    ) -> tuple[int, ...]:
        boundary = system_prompt_boundary(loaded.tokenizer, parsed.messages, parsed.tools, prompt)
        return (boundary,) if boundary else ()

    def response_format(
        self, loaded: LoadedModel, parsed: ChatCompletionRequest, prompt: tuple[int, ...]
    ) -> ResponseFormat:
        parser = reply_parser(loaded, parsed.tools, prompt)
        options = parsed.options
        return ChatCompletionFormat(
            self.model_id,
            parser,
            include_usage=options.include_usage,
            logprobs=options.top_logprobs is not None,
            parallel_tool_calls=parsed.parallel_tool_calls,
        )


class CompletionsHandler(GenerationHandler):
    """``POST /v1/completions``."""

    def parse(self, body: bytes) -> CompletionRequest:
        return parse_completion_request(body)

    def prompt_tokens(self, loaded: LoadedModel, parsed: CompletionRequest) -> tuple[int, ...]:
        return completion_prompt_tokens(loaded.tokenizer, parsed.prompt)

    def response_format(
        self, loaded: LoadedModel, parsed: CompletionRequest, prompt: tuple[int, ...]
    ) -> ResponseFormat:
        options = parsed.options
        return TextCompletionFormat(
            self.model_id, include_usage=options.include_usage, logprobs=options.top_logprobs is not None
        )
