"""What every agent endpoint shares: requests signed with the cluster token's key only (the master
and other agents sign theirs; nothing ever sends an agent the token), errors in GenMLX's own shape
``{"error": {"message", "type"}}`` (``genmlx.core.http.GENMLX_ERRORS``), and no ``Server``
header."""

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
        return AuthError(
            "this agent answers only requests signed with the cluster token's key "
            "(GenMLX's master and agents sign theirs; the token itself is never accepted)"
        )

    def signature_refused(self, why: str) -> GenMLXError:
        return AuthError(f"the request's signature is refused: {why}")
