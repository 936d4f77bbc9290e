"""Stop strings matched on generated text, not tokens, as text arrives in arbitrary pieces."""

from __future__ import annotations


class StopStringMatcher:
    """Splits streamed text into what may be sent now and what must wait.

    Text that could still turn out to be the start of a stop string is held back; everything before
    the first complete stop string is released and the rest (the stop string included) is dropped.
    """

    def __init__(self, stop: tuple[str, ...]):
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """Add generated text; return the part that is safe to send. Sets ``stopped`` on a match."""
        if not self._stop:
            return text
        pending = self._held + text
        match = self._first_match(pending)
        if match is not None:
            cut, self.matched = match
            self.stopped = True
            self._held = ""
            return pending[:cut]
        keep = self._longest_partial_match(pending)
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """Release held text when generation ends without a stop string."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        found = [(i, s) for s in self._stop if (i := text.find(s)) >= 0]
        return min(found, key=lambda f: f[0]) if found else None

    def _longest_partial_match(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        for length in range(min(len(text), max(map(len, self._stop)) - 1), 0, -1):
            suffix = text[-length:]
            if any(s.startswith(suffix) for s in self._stop):
                return length
        return 0
