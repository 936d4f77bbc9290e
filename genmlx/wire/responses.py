"""What the master and a dispatcher agree on for the Responses API."""

from __future__ import annotations

# Set by the master on a request whose ``input`` it expanded with the stored conversation that the
# request's ``previous_response_id`` names; a dispatcher refuses a ``previous_response_id`` without it.
EXPANDED_INPUT_HEADER = "X-GenMLX-Expanded-Input"
