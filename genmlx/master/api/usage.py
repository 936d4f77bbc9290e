"""The tokens a reply from rank 0 reports, read as it passes through the master, so that each client
key's tokens can be counted without asking the dispatchers.

Every API reports usage in its own place: a chat or completion (``usage.prompt_tokens`` /
``completion_tokens``), a Responses reply (``usage.input_tokens`` / ``output_tokens``, under
``response`` in stream events), an Anthropic message (``usage.input_tokens`` / ``output_tokens``,
under ``message`` in ``message_start``; ``message_delta`` carries the output so far). A whole reply
is one JSON document; a stream is server-sent events, read line by line as chunks arrive, and the
largest figure of each kind wins (Anthropic's counts are running totals). A stream whose client
did not ask for usage (OpenAI's ``stream_options.include_usage``) reports none, and counts none.
"""

from __future__ import annotations

import json
from typing import Any

PROMPT_FIELDS = ("prompt_tokens", "input_tokens")
COMPLETION_FIELDS = ("completion_tokens", "output_tokens")
MAX_LINE_BYTES = 1 << 20  # a longer event line is content, not usage: not buffered further


class ReplyUsage:
    """Usage seen in one reply so far."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._partial = b""

    def whole(self, body: bytes) -> None:
        """A reply sent in one piece."""
        try:
            self._take(json.loads(body))
        except ValueError:
            return

    def streamed(self, chunk: bytes) -> None:
        """The next piece of a stream of server-sent events."""
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop() if len(lines[-1]) < MAX_LINE_BYTES else b""
        for line in lines:
            if line.startswith(b"data:") and b"_tokens" in line:
                try:
                    self._take(json.loads(line[len(b"data:") :]))
                except ValueError:
                    continue

    def _take(self, document: Any) -> None:
        if not isinstance(document, dict):
            return
        for usage in usages_in(document):
            self.prompt_tokens = max(self.prompt_tokens, count(usage, PROMPT_FIELDS))
            self.completion_tokens = max(self.completion_tokens, count(usage, COMPLETION_FIELDS))


def usages_in(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The usage objects of a reply or event: its own, its ``response``'s or its ``message``'s."""
    found = []
    for holder in (document, document.get("response"), document.get("message")):
        usage = holder.get("usage") if isinstance(holder, dict) else None
        if isinstance(usage, dict):
            found.append(usage)
    return found


def count(usage: dict[str, Any], names: tuple[str, ...]) -> int:
    for name in names:
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return 0
