"""Rank 0's tornado application: every route of the OpenAI and Anthropic APIs, and the access log;
the other ranks' ``/health`` alone, with the same log."""

from __future__ import annotations

import logging

from tornado.web import Application, RequestHandler

from genmlx.core.http import ClusterAuth
from genmlx.core.tokens import TokenSource
from genmlx.dispatcher.api.anthropic_api import (
    CountTokensHandler,
    MessagesHandler,
    UnknownMessagesRouteHandler,
)
from genmlx.dispatcher.api.handlers import (
    ChatCompletionsHandler,
    CompletionsHandler,
    HealthHandler,
    MetricsHandler,
    ModelHandler,
    ModelsHandler,
    UnknownRouteHandler,
)
from genmlx.dispatcher.api.metrics import DispatcherMetrics
from genmlx.dispatcher.api.prompt_cache import PromptCacheHandler, PromptCacheView
from genmlx.dispatcher.api.responses_api import ResponsesHandler
from genmlx.dispatcher.engine.events import Usage
from genmlx.dispatcher.engine.runner import Engine

access_log = logging.getLogger("genmlx.dispatcher.access")


def make_app(
    *,
    model_id: str,
    engine: Engine,
    started_at: int,
    metrics: DispatcherMetrics,
    prompt_cache: PromptCacheView,
    token: str | TokenSource | None,
) -> Application:
    """The tornado application serving ``/health``, ``/metrics``, the OpenAI APIs (chat, completions,
    responses) and Anthropic's; a ``token`` of None leaves the API open."""
    auth = {"auth": ClusterAuth(token) if token else None}
    listing = {**auth, "model_id": model_id, "started_at": started_at}
    serving = {**auth, "model_id": model_id, "engine": engine}
    generation = {**serving, "metrics": metrics}
    routes = [
        (r"/health", HealthHandler, serving),
        (r"/metrics", MetricsHandler, {**auth, "metrics": metrics}),
        (r"/api/v1/prompt-cache", PromptCacheHandler, {**auth, "prompt_cache": prompt_cache}),
        (r"/v1/models", ModelsHandler, listing),
        (r"/v1/models/(.+)", ModelHandler, listing),
        (r"/v1/chat/completions", ChatCompletionsHandler, generation),
        (r"/v1/completions", CompletionsHandler, generation),
        (r"/v1/messages", MessagesHandler, generation),
        (r"/v1/messages/count_tokens", CountTokensHandler, serving),
        (r"/v1/messages/.*", UnknownMessagesRouteHandler, auth),
        (r"/v1/responses", ResponsesHandler, generation),
    ]
    return Application(
        routes, default_handler_class=UnknownRouteHandler, default_handler_args=auth, log_function=log_request
    )


def make_health_app(*, model_id: str, engine: Engine, token: str | TokenSource | None) -> Application:
    """``/health`` alone, for the ranks of a group other than rank 0."""
    auth = {"auth": ClusterAuth(token) if token else None}
    return Application(
        [(r"/health", HealthHandler, {**auth, "model_id": model_id, "engine": engine})],
        default_handler_class=UnknownRouteHandler,
        default_handler_args=auth,
        log_function=log_request,
    )


def log_request(handler: RequestHandler) -> None:
    """One access-log line per request, but for a ``/health`` that answered 200 (the agent and the
    master poll it every few seconds): never headers, bodies or prompt text."""
    request = handler.request
    if request.path == "/health" and handler.get_status() == 200:
        return
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
