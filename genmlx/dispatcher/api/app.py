"""Rank 0's tornado application: every route of the OpenAI and Anthropic APIs, and the access log."""

from __future__ import annotations

import logging

from tornado.web import Application, RequestHandler

from genmlx.dispatcher.api.anthropic_api import MessagesHandler
from genmlx.dispatcher.api.handlers import (
    ChatCompletionsHandler,
    CompletionsHandler,
    DispatcherDeps,
    HealthHandler,
    MetricsHandler,
    ModelHandler,
    ModelsHandler,
    UnknownRouteHandler,
)
from genmlx.dispatcher.engine.events import Usage

access_log = logging.getLogger("genmlx.dispatcher.access")


def make_app(deps: DispatcherDeps) -> Application:
    """The tornado application serving ``/health`` and the OpenAI API."""
    args = {"deps": deps}
    routes = [
        (r"/health", HealthHandler, args),
        (r"/metrics", MetricsHandler, args),
        (r"/v1/models", ModelsHandler, args),
        (r"/v1/models/(.+)", ModelHandler, args),
        (r"/v1/chat/completions", ChatCompletionsHandler, args),
        (r"/v1/completions", CompletionsHandler, args),
        (r"/v1/messages", MessagesHandler, args),
    ]
    return Application(
        routes, default_handler_class=UnknownRouteHandler, default_handler_args=args, log_function=log_request
    )


def log_request(handler: RequestHandler) -> None:
    """One access-log line per request: never headers, bodies or prompt text."""
    request = handler.request
    usage: Usage | None = getattr(handler, "usage", None)
    tokens = ""
    if usage is not None:
        tokens = f" prompt_tokens={usage.prompt_tokens} cached_tokens={usage.cached_tokens}"
        tokens += f" completion_tokens={usage.completion_tokens}"
    finish = getattr(handler, "finish_reason", None)
    finish_text = f" finish={finish}" if finish else ""
    access_log.info(
        "%s %s %d%s%s %.3fs",
        request.method,
        request.path,
        handler.get_status(),
        tokens,
        finish_text,
        request.request_time(),
    )
