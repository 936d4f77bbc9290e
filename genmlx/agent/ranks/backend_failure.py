"""Telling a rank that could not join its jaccl group from one that crashed, by its exit and log.

A jaccl rank fails to join in a few known ways: MLX raises ("Cannot initialize jaccl distributed
backend.") and our dispatcher exits with ``BACKEND_JOIN_FAILED_EXIT``; libibverbs or MLX's RDMA code
prints an error ("Changing queue pair to RTR failed with errno 22", a failed ``ibv_reg_mr``) and
the process exits or dies on a signal (a segfault in ``ibv_reg_mr`` on a Mac without RDMA). All of
them happen before the rank logs ``JOINED_GROUP_MARK``; whatever ends a rank after that is not its
backend's doing, and is a plain crash to the master.
"""

from __future__ import annotations

import re
import signal

from genmlx.wire.rank_launch import BACKEND_JOIN_FAILED_EXIT, JOINED_GROUP_MARK, RankLaunch

# Lines of a rank's log that name an RDMA or jaccl failure: MLX's messages, libibverbs' calls and
# the errno strings MLX's jaccl code reports them with.
RDMA_ERROR_LINE = re.compile(
    r"jaccl|\bibv_\w+|queue pair|\bRDMA\b|MLX_IBV_DEVICES|MLX_JACCL_COORDINATOR",
    re.IGNORECASE,
)
MAX_REPORTED_CHARS = 300
# The time, level and logger our dispatcher's log lines begin with: dropped from a reported line.
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ [\w.]+: ")


def backend_failure(launch: RankLaunch, exit_code: int | None, log_tail: str) -> str | None:
    """Why ``launch`` (a rank that exited with ``exit_code``, its log ending in ``log_tail``) could
    not join its RDMA group; None where it is not a jaccl rank, ended well, or had joined."""
    if launch.backend == "ring" or not exit_code or JOINED_GROUP_MARK in log_tail:
        return None
    line = last_rdma_error(log_tail)
    if exit_code == BACKEND_JOIN_FAILED_EXIT:
        return line or "it could not join the jaccl group"
    if line is not None:
        return f"{line} (exit {describe_exit(exit_code)})"
    if exit_code < 0:  # killed by a signal before it joined: the RDMA calls are what runs then
        return f"it died on {describe_exit(exit_code)} before joining the {launch.backend} group"
    return None


def last_rdma_error(log_tail: str) -> str | None:
    """The last line of the log that names an RDMA or jaccl failure, trimmed for a status message."""
    lines = [
        LOG_PREFIX.sub("", line.strip()) for line in log_tail.splitlines() if RDMA_ERROR_LINE.search(line)
    ]
    lines = [line for line in lines if line and JOINED_GROUP_MARK not in line]
    return lines[-1][-MAX_REPORTED_CHARS:] if lines else None


def describe_exit(exit_code: int) -> str:
    """ "code 1", or "signal 11 (SIGSEGV)" for a process killed by a signal (negative code)."""
    if exit_code >= 0:
        return f"code {exit_code}"
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"
    return f"signal {-exit_code} ({name})"
