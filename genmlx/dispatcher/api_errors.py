"""Errors the OpenAI API answers with, as typed exceptions in GenMLX's tree (``genmlx.errors``).

Handlers raise them; the base handler's ``write_error`` renders each once, in OpenAI's shape::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

    ApiError                        (mixin: HTTP status, OpenAI type, param, code)
    ├── InvalidRequest   400        PermanentError
    │   └── ContextLengthExceeded
    ├── Unauthorized     401        AuthError
    ├── UnknownModel     404        ModelNotFound
    ├── UnknownRoute     404        PermanentError
    ├── QueueFull        429        TemporaryError
    └── NotReady         503        TemporaryError
"""

from __future__ import annotations

from genmlx.errors import AuthError, GenMLXError, ModelNotFound, PermanentError, TemporaryError


class ApiError(GenMLXError):
    """An error with a place in the OpenAI error format."""

    status = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def to_json(self) -> dict:
        """The response body OpenAI sends for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ApiError, PermanentError):
    """The request body is malformed or a field is out of range; ``param`` names the field."""

    status = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus completion would not fit the served context length."""

    default_code = "context_length_exceeded"


class Unauthorized(ApiError, AuthError):
    """The request lacks the bearer token this dispatcher was started with."""

    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class UnknownModel(ApiError, ModelNotFound):
    """The request names a model this dispatcher does not serve."""

    status = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class UnknownRoute(ApiError, PermanentError):
    """No endpoint at this path."""

    status = 404
    error_type = "invalid_request_error"
    default_code = "unknown_url"


class QueueFull(ApiError, TemporaryError):
    """Too many requests are waiting; the client should retry later."""

    status = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"


class NotReady(ApiError, TemporaryError):
    """The model is still loading (or the dispatcher is shutting down)."""

    status = 503
    error_type = "server_error"
    default_code = "model_loading"


def internal_error(message: str = "The server had an error while processing your request.") -> ApiError:
    """A 500 in OpenAI's shape, for failures that are ours and not the client's."""
    return ApiError(message)


def error_for_status(status: int, message: str) -> ApiError:
    """An ``ApiError`` for a status tornado itself produced (405, 413, ...)."""
    error = ApiError(message)
    error.status = status
    error.error_type = "invalid_request_error" if status < 500 else "server_error"
    return error
