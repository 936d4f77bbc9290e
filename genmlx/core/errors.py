"""Every exception GenMLX raises on purpose.

    GenMLXError
    ├── ManifestError          the manifest is invalid; carries every problem found at once
    ├── AuthError              a peer refused our bearer token, or we have none
    ├── TemporaryError         worth retrying as is: a peer is unreachable, busy or restarting
    │   └── AgentUnreachable
    └── PermanentError         retrying changes nothing until the input changes
        ├── ModelNotFound
        └── AgentRequestError  an agent rejected a request as invalid

Retry loops catch ``TemporaryError`` only; a ``PermanentError`` is reported with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass


class GenMLXError(Exception):
    """Base of every GenMLX error."""


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
    """A request was refused for its bearer token, or no token is available."""


class TemporaryError(GenMLXError):
    """A failure that may pass by itself: retry with backoff."""


class AgentUnreachable(TemporaryError):
    """An agent did not answer (connection refused, timeout, 5xx)."""


class PermanentError(GenMLXError):
    """A failure that retrying cannot fix until the input changes."""


class ModelNotFound(PermanentError):
    """A model or its files are not where the manifest says."""


class AgentRequestError(PermanentError):
    """An agent rejected a request as invalid (4xx other than 401); ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
