"""Ends the dispatcher when the agent that started it is gone, so ranks never outlive their agent.

Polls ``os.getppid()``: when the parent dies the process is re-parented (to init, launchd or a
subreaper), which works the same on Linux and macOS without platform-specific hooks.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
GRACE_SECONDS = 10.0


def start_parent_watchdog(parent_pid: int) -> threading.Thread:
    """Start a daemon thread that stops this process once ``parent_pid`` is no longer its parent:
    first with SIGTERM (a clean shutdown), then, if that has not ended it, with ``os._exit``."""
    thread = threading.Thread(target=_watch, args=(parent_pid,), name="genmlx-parent-watchdog", daemon=True)
    thread.start()
    return thread


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_SECONDS)
    log.warning("parent process %d is gone; shutting down", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    log.error("clean shutdown took over %.0fs; exiting now", GRACE_SECONDS)
    logging.shutdown()
    os._exit(1)
