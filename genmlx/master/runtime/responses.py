"""Stored Responses API responses, kept by the master so ``previous_response_id`` can continue one.

Each stored response keeps the response object the client got and the conversation it ended: the
input items it was asked with (the stored conversation it continued, then its own input) followed
by its output items. A continuation sends that conversation, then the new input, to the model, so
every turn is the whole conversation and the dispatcher's prefix cache reuses the earlier turns.

SQLite under the master's state directory, bounded to the ``keep`` most recent; a response asked
with ``store: false`` is never written. A response that is gone (pruned, deleted, or another
master's) is a clear 404 for whoever asks to continue it, never a continuation without its past.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEEP = 1000
SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    stored_at REAL NOT NULL,
    conversation TEXT NOT NULL,
    response TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class StoredResponse:
    id: str
    model: str
    conversation: list[dict[str, Any]]  # input items, then the response's output items
    response: dict[str, Any]  # the response object as the client got it


class ResponseStore:
    """The most recent stored responses, by id."""

    def __init__(self, path: Path, keep: int = KEEP):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute(SCHEMA)
        self._keep = keep

    def put(self, model: str, conversation: list[dict[str, Any]], response: dict[str, Any]) -> None:
        """Store ``response``, which ended ``conversation``; the oldest beyond ``keep`` go."""
        self._db.execute(
            "INSERT OR REPLACE INTO responses (id, model, stored_at, conversation, response) "
            "VALUES (?, ?, ?, ?, ?)",
            (response["id"], model, time.time(), json.dumps(conversation), json.dumps(response)),
        )
        self._db.execute(
            "DELETE FROM responses WHERE id NOT IN "
            "(SELECT id FROM responses ORDER BY stored_at DESC LIMIT ?)",
            (self._keep,),
        )

    def get(self, response_id: str) -> StoredResponse | None:
        row = self._db.execute(
            "SELECT id, model, conversation, response FROM responses WHERE id = ?", (response_id,)
        ).fetchone()
        if row is None:
            return None
        return StoredResponse(row[0], row[1], json.loads(row[2]), json.loads(row[3]))

    def delete(self, response_id: str) -> bool:
        """Whether there was such a response to delete."""
        return self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def close(self) -> None:
        self._db.close()


def input_items(value: Any) -> list[dict[str, Any]]:
    """A request's ``input`` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value) if isinstance(value, list) else []


def final_response(body: bytes, streamed: bool) -> dict[str, Any] | None:
    """The finished response object in a dispatcher's reply: the body itself, or the response of
    the stream's ``response.completed`` / ``response.incomplete`` event; None when there is none
    (an error, a stream cut short)."""
    try:
        if not streamed:
            document = json.loads(body)
            return document if document.get("object") == "response" else None
        for frame in body.decode().split("\n\n"):
            data = next((line[6:] for line in frame.split("\n") if line.startswith("data: ")), None)
            event = json.loads(data) if data else {}
            if event.get("type") in ("response.completed", "response.incomplete"):
                return event["response"]
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return None
