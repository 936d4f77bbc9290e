"""How far a transfer has come, shared between the worker thread that moves the bytes and the event
loop that reports them; how a transfer is told to stop."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from genmlx.core.errors import GenMLXError

log = logging.getLogger(__name__)

T = TypeVar("T")


class TransferCancelled(GenMLXError):
    """The agent is stopping: the transfer gives up where it is (the partial directory stays, so
    the next request resumes it). Neither temporary nor permanent, so no retry loop catches it."""


class TransferProgress:
    """Bytes done and bytes total (None until known). One worker thread writes; readers see each
    attribute change whole. Every update checks for cancellation, so a worker stops within a chunk;
    a worker blocked in a read registers how to interrupt it (``interruptible``)."""

    def __init__(self) -> None:
        self.done = 0
        self.total: int | None = None
        self._cancelled = threading.Event()
        self._interrupt: Callable[[], None] | None = None

    def cancel(self) -> None:
        self._cancelled.set()
        interrupt = self._interrupt
        if interrupt is not None:
            with contextlib.suppress(OSError):
                interrupt()

    def check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise TransferCancelled("the agent is stopping")

    def set_done(self, done: int) -> None:
        self.check_cancelled()
        self.done = done

    def report(self, done: int, total: int | None) -> None:
        """The ``progress(bytes_done, bytes_total)`` callback a download calls."""
        self.set_done(done)
        self.total = total

    @contextlib.contextmanager
    def interruptible(self, interrupt: Callable[[], None]) -> Iterator[None]:
        """While inside, ``cancel()`` also calls ``interrupt`` (e.g. shuts a socket down) to wake a
        worker blocked in I/O; the worker then sees the cancellation."""
        self._interrupt = interrupt
        try:
            self.check_cancelled()
            yield
        except Exception:
            self.check_cancelled()  # a failure the interruption caused is a cancellation
            raise
        finally:
            self._interrupt = None
