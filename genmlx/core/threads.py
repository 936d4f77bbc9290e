"""A blocking function run in a thread of its own, awaited from the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def run_in_worker_thread(name: str, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run ``fn(*args)`` in a new daemon thread and return a future for its result on the running
    loop. Daemon, unlike an executor's threads: a download stuck in a read (which only its own
    timeout ends) must not keep a stopping agent alive; its partial files are resumed later."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the awaiting task, which reports it
            error = e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            log.info("%s finished after the agent's event loop closed", name)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future
