"""Errors the master's and the dispatchers' HTTP APIs answer with, as typed exceptions in
GenMLX's tree (``genmlx.core.errors``).

Handlers raise them; ``genmlx.core.http.JsonHandler.write_error`` renders each once, in OpenAI's
shape, so one client-side parser reads every error::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

    ApiError                        (mixin: HTTP status, OpenAI type, param, code)
    ├── InvalidRequest   400        PermanentError
    │   ├── ContextLengthExceeded
    │   └── InvalidManifest 422     (carries every issue)
    ├── Unauthorized     401        AuthError
    ├── UnknownModel     404        ModelNotFound
    ├── UnknownRoute     404        PermanentError
    ├── QueueFull        429        TemporaryError
    ├── BadGateway       502        TemporaryError
    └── NotReady         503        TemporaryError
"""

from __future__ import annotations

from genmlx.core.errors import AuthError, GenMLXError, ModelNotFound, PermanentError, TemporaryError


class ApiError(GenMLXError):
    """An error with a place in the OpenAI error format."""

    status = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, **details: object):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.details = details  # extra fields beside OpenAI's four, e.g. a manifest's issues

    def to_json(self) -> dict:
        """The response body OpenAI sends for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
                **self.details,
            }
        }


class InvalidRequest(ApiError, PermanentError):
    """The request body is malformed or a field is out of range; ``param`` names the field."""

    status = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus completion would not fit the served context length."""

    default_code = "context_length_exceeded"


class InvalidManifest(InvalidRequest):
    """An applied manifest failed validation; ``issues`` lists every problem."""

    status = 422
    default_code = "invalid_manifest"


class Unauthorized(ApiError, AuthError):
    """The request lacks the cluster's bearer token."""

    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class UnknownModel(ApiError, ModelNotFound):
    """The request names a model that is not served here."""

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


class BadGateway(ApiError, TemporaryError):
    """A model's rank 0 did not answer the master's proxy."""

    status = 502
    error_type = "server_error"
    default_code = "upstream_unavailable"


class NotReady(ApiError, TemporaryError):
    """The model is not ready: loading, starting, or the server is shutting down."""

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
