"""What every agent endpoint shares: the cluster token as a bearer token only, errors in GenMLX's
own shape ``{"error": {"message", "type"}}`` (``genmlx.core.http.GENMLX_ERRORS``), and no
``Server`` header."""

from __future__ import annotations

import logging

from genmlx.core.errors import AuthError, GenMLXError
from genmlx.core.http import GENMLX_ERRORS, ApiHandler


class AgentHandler(ApiHandler):
    """An agent endpoint; subclasses declare the collaborators they take in ``initialize``."""

    accepts_api_key = False
    error_format = GENMLX_ERRORS
    refusal_log_level = logging.INFO  # only the master talks to agents: its mistakes are worth a line

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # the unauthenticated need not learn what we run

    def token_refused(self) -> GenMLXError:
        return AuthError("this agent needs the cluster's bearer token: send Authorization: Bearer <token>")
