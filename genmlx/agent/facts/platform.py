"""The platform seam of node facts: what an OS-specific probe answers, and the one function through
which probes run commands, so tests can feed them recorded output instead.

``platform_linux`` reads /proc and /sys; ``platform_macos`` runs ``sw_vers``, ``sysctl``,
``networksetup`` and ``system_profiler``. Both answer the ``PlatformProbe`` protocol, and a probe
never raises for a fact it cannot read: it logs what was lost and answers "" or ``None``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from genmlx.core.errors import TemporaryError
from genmlx.wire.agent_state import InterfaceKind

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 20.0  # system_profiler takes a second or two on a busy Mac

# argv -> stdout. The real one is ``run_command``; tests pass one that answers from recordings.
CommandRunner = Callable[[Sequence[str]], str]

# Prints the GPU backend MLX can use. Run in a child process: importing MLX in the agent would
# claim a Metal device there for nothing, and a broken driver must not take the agent down.
GPU_PROBE = """
import mlx.core as mx
cuda = getattr(mx, "cuda", None)
print("Metal" if mx.metal.is_available() else "CUDA" if cuda is not None and cuda.is_available() else "")
"""
KNOWN_GPUS = ("Metal", "CUDA", "")


class PlatformCommandFailed(TemporaryError):
    """A command that reads a node fact is missing, failed or timed out."""


@dataclass(frozen=True)
class InterfacePort:
    """What the OS says about one network interface besides its addresses."""

    kind: InterfaceKind
    linked: bool | None = None  # see ``NetworkInterface.linked``
    domain: str | None = None  # the Thunderbolt fields of ``NetworkInterface``: macOS only
    peer_domain: str | None = None
    rdma_device: str | None = None
    link_gbps: float | None = None


class PlatformProbe(Protocol):
    """Reads the facts whose source differs between operating systems."""

    def os_version(self) -> str:
        """A person's name for the OS and its version: "macOS 15.1", "Debian GNU/Linux 12 (bookworm)"."""
        ...

    def chip(self) -> str:
        """The processor's marketing name: "Apple M2 Ultra", "AMD EPYC 7B13"."""
        ...

    def interface_ports(self) -> Mapping[str, InterfacePort]:
        """Kind and link of the interfaces the OS can tell about, by interface name."""
        ...


def run_command(argv: Sequence[str]) -> str:
    """Run ``argv`` without a shell and return its stdout; raise ``PlatformCommandFailed`` if it is
    missing, exits non-zero or takes longer than ``COMMAND_TIMEOUT_S``."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PlatformCommandFailed(f"{argv[0]}: {e}") from e
    if done.returncode != 0:
        stderr = done.stderr.strip()[-300:]
        raise PlatformCommandFailed(f"{argv[0]} exited with code {done.returncode}: {stderr}")
    return done.stdout


def probe_gpu(run: CommandRunner = run_command) -> str:
    """ "Metal" (or "CUDA") where MLX can use a GPU here, "" where it runs on the CPU or is absent."""
    try:
        answer = run([sys.executable, "-c", GPU_PROBE]).strip()
    except PlatformCommandFailed as e:
        log.warning("cannot tell whether MLX can use a GPU here, reporting none: %s", e)
        return ""
    if answer not in KNOWN_GPUS:
        log.warning("the GPU probe answered %r; reporting no GPU", answer[:100])
        return ""
    return answer
