"""``POST /v1/responses``: OpenAI's Responses API on the same engine, so clients that speak only it
(Codex CLI among them) can use a served model.

The handler is the OpenAI generation handler with the Responses parts swapped in: request parsing
(``responses_request``), the response object and its typed, named stream events
(``responses_format``), and an ``error`` event when a stream fails. Responses are stored by the
master, not here (``previous_response_id``, ``GET``/``DELETE /v1/responses/{id}``).
"""

from __future__ import annotations

from genmlx.core.errors import ApiError
from genmlx.dispatcher.api.handlers import SSE_JSON, GenerationHandler
from genmlx.dispatcher.api.prompts import chat_prompt_tokens
from genmlx.dispatcher.api.reply_parsing import reply_parser
from genmlx.dispatcher.api.responses_format import ResponsesFormat
from genmlx.dispatcher.api.responses_request import ResponsesRequest, parse_responses_request
from genmlx.dispatcher.engine.runner import LoadedModel
from genmlx.wire.responses import EXPANDED_INPUT_HEADER


class ResponsesHandler(GenerationHandler):
    """``POST /v1/responses``, streamed (``"stream": true``) or not."""

    prompt_field = "input"
    sse_done = None  # a Responses stream ends with its response.completed event
    format: ResponsesFormat | None = None  # set once the request is parsed

    def parse(self, body: bytes) -> ResponsesRequest:
        expanded = self.request.headers.get(EXPANDED_INPUT_HEADER) == "1"
        return parse_responses_request(body, expanded=expanded)

    def prompt_tokens(self, loaded: LoadedModel, parsed: ResponsesRequest) -> tuple[int, ...]:
        return chat_prompt_tokens(loaded.tokenizer, parsed.messages, parsed.tools)

    def response_format(
        self, loaded: LoadedModel, parsed: ResponsesRequest, prompt: tuple[int, ...]
    ) -> ResponsesFormat:
        parser = reply_parser(loaded, parsed.tools, prompt)
        self.format = ResponsesFormat(self.model_id, parser, parsed)
        return self.format

    def error_payload(self, error: ApiError) -> dict:
        """A stream's ``error`` event, numbered in the stream's sequence."""
        fields = {"code": error.code, "message": error.message, "param": error.param}
        return self.format.event("error", **fields)

    def sse_frame(self, payload: dict) -> str:
        return f"event: {payload['type']}\ndata: {SSE_JSON.encode(payload)}\n\n"
