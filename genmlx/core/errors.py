"""Every exception GenMLX raises on purpose, each with the HTTP status it is answered with.

    GenMLXError                 500  ours, not the client's
    ├── InternalError           500  (API) ours, told in OpenAI's shape
    ├── ProtocolError           4xx  (API) a status tornado itself answered with (405, 413, ...)
    ├── ManifestError                the manifest is invalid; carries every problem found at once
    ├── AuthError               401  a peer refused our signature or token, or we have none
    │   ├── Unauthorized             (API) the request lacks the cluster's token or a signature
    │   ├── Forbidden           403  (API) a client key asked for what keys never reach
    │   └── ImpostorError            a peer answered without proving it holds the cluster token
    ├── TemporaryError          503  worth retrying as is: a peer is unreachable, busy or restarting
    │   ├── AgentUnreachable
    │   ├── QueueFull           429  (API) too many requests wait
    │   ├── RateLimited         429  (API) a client key used up its requests for this minute
    │   ├── BadGateway          502  (API) a model's rank 0 did not answer the master
    │   └── NotReady            503  (API) loading, starting, or shutting down
    └── PermanentError               retrying changes nothing until the input changes
        ├── ModelNotFound       400
        │   └── UnknownModel    404  (API) not served here
        ├── AgentRequestError   400  an agent rejected a request as invalid
        │   ├── AgentNotFound   404  what it names is not there
        │   └── AgentConflict   409  it clashes with what the agent is doing or holds
        ├── InvalidRequest      400  (API) a malformed body or a field out of range
        │   ├── BodyTooLarge    413  (API) a body over the server's limit, refused unread
        │   ├── HeadersTooLarge 431  (API) headers over the server's limit
        │   ├── ContextLengthExceeded
        │   ├── ModelNotNamed        (API) a completion request that names no model
        │   └── InvalidManifest 422
        ├── ResponseNotFound    404  (API) no stored response with that id
        ├── UnknownRoute        404  (API) no endpoint at this path
        └── WireError           400  a document does not match its type (``genmlx.wire.codec``)

Retry loops catch ``TemporaryError`` only; a ``PermanentError`` is reported with its reason.
A class says its status once, as ``status``; ``genmlx.core.http`` renders it in each API's shape.
The errors marked (API) are also ``ApiError``: they carry OpenAI's type, param and code.
"""

from __future__ import annotations

from dataclasses import dataclass


class GenMLXError(Exception):
    """Base of every GenMLX error."""

    status = 500


@dataclass(frozen=True)
class ManifestIssue:
    """One problem in a manifest, located by YAML path and source position (1-based)."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f" {self.path}:" if self.path else ""
        return f"{self.file}:{self.line}:{self.column}:{where} {self.message}"


class ManifestError(GenMLXError):
    """The manifest is invalid. ``issues`` holds every problem found, in file order."""

    def __init__(self, issues: list[ManifestIssue]):
        self.issues = sorted(issues, key=lambda i: (i.file, i.line, i.column, i.path))
        super().__init__("\n".join(str(i) for i in self.issues))


class AuthError(GenMLXError):
    """A request was refused for its signature or token, or no token is available."""

    status = 401


class ImpostorError(AuthError):
    """Whatever answered at a node's address did not sign its reply with the cluster token's key:
    it is not that node's agent (or rank), whatever it announces."""


class TemporaryError(GenMLXError):
    """A failure that may pass by itself: retry with backoff."""

    status = 503


class AgentUnreachable(TemporaryError):
    """An agent did not answer (connection refused, timeout, 5xx)."""


class PermanentError(GenMLXError):
    """A failure that retrying cannot fix until the input changes."""


class ModelNotFound(PermanentError):
    """A model or its files are not where the manifest says."""

    status = 400


class AgentRequestError(PermanentError):
    """An agent rejected a request as invalid. Subclasses that answer another 4xx say so in
    ``status``; the master's client raises the class of the status it was answered with."""

    status = 400


class AgentNotFound(AgentRequestError):
    """The rank, model or file a request names is not on the agent."""

    status = 404


class AgentConflict(AgentRequestError):
    """The request clashes with what the agent is doing or holds (a rank running, a transfer under
    way, a corrupt copy)."""

    status = 409


class ApiError(GenMLXError):
    """An error with a place in the OpenAI error format::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
    """

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


class BodyTooLarge(InvalidRequest):
    """The request body is over the server's limit (refused before it is read)."""

    status = 413
    default_code = "request_too_large"


class HeadersTooLarge(InvalidRequest):
    """The request's headers are over the server's limit (RFC 6585's 431)."""

    status = 431
    default_code = "request_headers_too_large"


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus completion would not fit the served context length."""

    default_code = "context_length_exceeded"


class ModelNotNamed(InvalidRequest):
    """A completion request without a string ``model``: the master routes by it and OpenAI requires
    it, so a rank refuses it the same way."""

    def __init__(self) -> None:
        super().__init__("The request names no model: set 'model' to one of GET /v1/models.", param="model")


class InvalidManifest(InvalidRequest):
    """An applied manifest failed validation; ``issues`` lists every problem."""

    status = 422
    default_code = "invalid_manifest"


class Unauthorized(ApiError, AuthError):
    """The request carries neither a valid signature nor the cluster's token."""

    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class UnknownModel(ApiError, ModelNotFound):
    """The request names a model that is not served here."""

    status = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class ResponseNotFound(ApiError, PermanentError):
    """No stored response with that id: never stored, deleted, or pruned as the oldest."""

    status = 404
    error_type = "invalid_request_error"
    default_code = "response_not_found"


class UnknownRoute(ApiError, PermanentError):
    """No endpoint at this path."""

    status = 404
    error_type = "invalid_request_error"
    default_code = "unknown_url"


class Forbidden(ApiError, AuthError):
    """A client key reaches the models only: never apply, status or the agents."""

    status = 403
    error_type = "invalid_request_error"
    default_code = "insufficient_permissions"


class RateLimited(ApiError, TemporaryError):
    """A client key made its ``requestsPerMinute`` already; ``Retry-After`` says when it may again."""

    status = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


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


class InternalError(ApiError):
    """A failure that is ours and not the client's."""

    status = 500

    def __init__(self, message: str = "The server had an error while processing your request."):
        super().__init__(message)


class ProtocolError(ApiError):
    """A status tornado itself answered with (405, 413, ...): the one error whose status is data,
    read from tornado's ``HTTPError``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.error_type = "invalid_request_error" if status < 500 else "server_error"
