"""``POST /v1/messages``: Anthropic's Messages API on the same engine, so Anthropic clients (Claude
Code among them) can use a served model.

The handler is the OpenAI generation handler with Anthropic's parts swapped in: request parsing
(``anthropic_request``), body and event shapes (``anthropic_format``), named SSE events, Anthropic's
error shape, and ``x-api-key`` accepted beside ``Authorization: Bearer``.
"""

from __future__ import annotations

from genmlx.core.errors import ApiError
from genmlx.dispatcher.api.anthropic_format import (
    ANTHROPIC_ERRORS,
    AnthropicMessageFormat,
    anthropic_error_json,
)
from genmlx.dispatcher.api.anthropic_request import MessagesRequest, parse_messages_request
from genmlx.dispatcher.api.handlers import SSE_JSON, GenerationHandler
from genmlx.dispatcher.api.openai_format import ResponseFormat
from genmlx.dispatcher.api.prompts import chat_prompt_tokens
from genmlx.dispatcher.api.reply_parsing import ReplyParser, prompt_opens_reasoning, reply_markers
from genmlx.dispatcher.engine.runner import LoadedModel


class MessagesHandler(GenerationHandler):
    """``POST /v1/messages``, streamed (``"stream": true``) or not."""

    prompt_field = "messages"
    sse_done = None  # Anthropic ends a stream with its message_stop event
    error_format = ANTHROPIC_ERRORS

    def parse(self, body: bytes) -> MessagesRequest:
        return parse_messages_request(body)

    def prompt_tokens(self, loaded: LoadedModel, parsed: MessagesRequest) -> tuple[int, ...]:
        return chat_prompt_tokens(loaded.tokenizer, parsed.messages, parsed.tools)

    def response_format(
        self, loaded: LoadedModel, parsed: MessagesRequest, prompt: tuple[int, ...]
    ) -> ResponseFormat:
        opens_reasoning = prompt_opens_reasoning(loaded.tokenizer, prompt)
        parser = ReplyParser(
            reply_markers(loaded.tokenizer, parsed.tools), starts_in_reasoning=opens_reasoning
        )
        return AnthropicMessageFormat(
            self.model_id, parser, prompt_tokens=len(prompt), thinking=parsed.thinking
        )

    def error_payload(self, error: ApiError) -> dict:
        return anthropic_error_json(error)

    def sse_frame(self, payload: dict) -> str:
        return f"event: {payload['type']}\ndata: {SSE_JSON.encode(payload)}\n\n"
