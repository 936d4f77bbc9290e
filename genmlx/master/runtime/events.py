"""The event history: what happened to the cluster, kept on disk (SQLite in ``GENMLX_HOME``) so
it survives a restarted master. An event that repeats the latest one of its object (same reason
and message) is counted, not stored again, as Kubernetes does."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from genmlx.master.planning.status import iso_time
from genmlx.wire.status import EventObject, EventReport

EventType = Literal["Normal", "Warning"]
KEEP = 5000  # newest events kept; older ones are pruned as new ones come

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    count INTEGER NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
)
"""


@dataclass(frozen=True)
class Event:
    kind: str  # "Cluster", "Node", "Model"
    name: str
    type: EventType
    reason: str
    message: str
    count: int = 1
    first_seen: float = 0.0
    last_seen: float = 0.0

    def report(self) -> EventReport:
        """As ``GET /api/v1/events`` and the status stream carry it."""
        return EventReport(
            EventObject(self.kind, self.name),
            self.type,
            self.reason,
            self.message,
            self.count,
            iso_time(self.first_seen),
            iso_time(self.last_seen),
        )


class EventLog:
    """Append-mostly event storage with listeners (the status stream subscribes)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute(SCHEMA)
        self._listeners: list[Callable[[Event], None]] = []

    def record(self, kind: str, name: str, type_: EventType, reason: str, message: str) -> Event:
        """Store an event, or count it against the latest one of its object when it repeats it."""
        now = time.time()
        latest = self._db.execute(
            "SELECT id, reason, message, count, first_seen FROM events WHERE kind = ? AND name = ? "
            "ORDER BY id DESC LIMIT 1",
            (kind, name),
        ).fetchone()
        if latest is not None and (latest[1], latest[2]) == (reason, message):
            update = "UPDATE events SET count = count + 1, last_seen = ? WHERE id = ?"
            self._db.execute(update, (now, latest[0]))
            event = Event(kind, name, type_, reason, message, latest[3] + 1, latest[4], now)
        else:
            self._db.execute(
                "INSERT INTO events (kind, name, type, reason, message, count, first_seen, last_seen) "
                "VALUES (?, ?, ?, ?, ?, 1, ?, ?)",
                (kind, name, type_, reason, message, now, now),
            )
            self._db.execute("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (KEEP,))
            event = Event(kind, name, type_, reason, message, 1, now, now)
        for listener in list(self._listeners):
            listener(event)
        return event

    def recent(self, limit: int = 100, kind: str | None = None, name: str | None = None) -> list[Event]:
        """The latest events, newest first, optionally of one object."""
        query, args = "SELECT kind, name, type, reason, message, count, first_seen, last_seen FROM events", []
        if kind is not None and name is not None:
            query += " WHERE kind = ? AND name = ?"
            args = [kind, name]
        query += " ORDER BY last_seen DESC, id DESC LIMIT ?"
        rows = self._db.execute(query, (*args, limit)).fetchall()
        return [Event(*row) for row in rows]

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener`` for every event recorded from now on; returns the unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def close(self) -> None:
        self._db.close()
