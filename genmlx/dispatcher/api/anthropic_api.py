"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's Messages API on the same
engine, so Anthropic clients (Claude Code among them) can use a served model.

The messages handler is the OpenAI generation handler with Anthropic's parts swapped in: request
parsing (``anthropic_request``), body and event shapes (``anthropic_format``), named SSE events,
Anthropic's error shape and wording (its context-limit messages, which clients parse to retry), and
``x-api-key`` accepted beside ``Authorization: Bearer``. Any other path under ``/v1/messages`` is a
404 in Anthropic's shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from genmlx.core.errors import ApiError, ContextLengthExceeded
from genmlx.core.http import ANTHROPIC_ERRORS, ApiHandler, ClusterAuth, anthropic_error_json
from genmlx.dispatcher.api.anthropic_format import AnthropicMessageFormat
from genmlx.dispatcher.api.anthropic_request import (
    MessagesRequest,
    parse_count_tokens_request,
    parse_messages_request,
)
from genmlx.dispatcher.api.chat import ChatMessage, FunctionTool, fold_system_turns
from genmlx.dispatcher.api.handlers import SSE_JSON, GenerationHandler, UnknownRouteHandler, served_model
from genmlx.dispatcher.api.openai_format import ResponseFormat
from genmlx.dispatcher.api.prompts import chat_prompt_tokens, template_takes_system_anywhere
from genmlx.dispatcher.api.reply_parsing import reply_parser
from genmlx.dispatcher.engine.runner import Engine, LoadedModel

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper


def messages_prompt_tokens(
    tokenizer: TokenizerWrapper, messages: tuple[ChatMessage, ...], tools: tuple[FunctionTool, ...]
) -> tuple[int, ...]:
    """A messages request's prompt, its system turns placed where the chat template takes them."""
    anywhere = template_takes_system_anywhere(tokenizer)
    return chat_prompt_tokens(tokenizer, fold_system_turns(messages, anywhere=anywhere), tools)


def anthropic_budget(prompt_length: int, max_tokens: int, context_length: int | None) -> int:
    """``max_tokens`` if the prompt and it fit the context, else a 400 in Anthropic's own words,
    which clients (Claude Code) parse to shorten the prompt or lower ``max_tokens`` and retry."""
    if context_length is None:
        return max_tokens
    if prompt_length > context_length:
        raise ContextLengthExceeded(
            f"prompt is too long: {prompt_length} tokens > {context_length} maximum", param="messages"
        )
    if prompt_length + max_tokens > context_length:
        raise ContextLengthExceeded(
            f"input length and `max_tokens` exceed context limit: {prompt_length} + {max_tokens} > "
            f"{context_length}, decrease input length or `max_tokens` and try again",
            param="max_tokens",
        )
    return max_tokens


class MessagesHandler(GenerationHandler):
    """``POST /v1/messages``, streamed (``"stream": true``) or not."""

    prompt_field = "messages"
    sse_done = None  # Anthropic ends a stream with its message_stop event
    error_format = ANTHROPIC_ERRORS

    def parse(self, body: bytes) -> MessagesRequest:
        return parse_messages_request(body)

    def prompt_tokens(self, loaded: LoadedModel, parsed: MessagesRequest) -> tuple[int, ...]:
        return messages_prompt_tokens(loaded.tokenizer, parsed.messages, parsed.tools)

    def max_tokens(self, prompt_length: int, requested: int | None, loaded: LoadedModel) -> int:
        assert requested is not None  # required by Anthropic's API, so by the parser
        return anthropic_budget(prompt_length, requested, loaded.context_length)

    def response_format(
        self, loaded: LoadedModel, parsed: MessagesRequest, prompt: tuple[int, ...]
    ) -> ResponseFormat:
        parser = reply_parser(loaded, parsed.tools, prompt)
        return AnthropicMessageFormat(
            self.model_id, parser, prompt_tokens=len(prompt), thinking=parsed.thinking
        )

    def error_payload(self, error: ApiError) -> dict:
        return anthropic_error_json(error)

    def sse_frame(self, payload: dict) -> str:
        return f"event: {payload['type']}\ndata: {SSE_JSON.encode(payload)}\n\n"


class CountTokensHandler(ApiHandler):
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``, the prompt a messages request
    with this body would be, tokenized the same way."""

    error_format = ANTHROPIC_ERRORS

    def initialize(self, auth: ClusterAuth | None, model_id: str, engine: Engine) -> None:
        super().initialize(auth)
        self.model_id = model_id
        self.engine = engine

    def post(self) -> None:
        parsed = parse_count_tokens_request(self.request.body)
        loaded = served_model(self.engine, self.model_id, parsed.model)
        prompt = messages_prompt_tokens(loaded.tokenizer, parsed.messages, parsed.tools)
        self.finish({"input_tokens": len(prompt)})


class UnknownMessagesRouteHandler(UnknownRouteHandler):
    """Any other path under ``/v1/messages`` (batches, say): a 404 in Anthropic's shape."""

    error_format = ANTHROPIC_ERRORS
