"""How an agent is configured: built once by its caller (the CLI or ``python -m genmlx.agent``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from genmlx.core.home import genmlx_home
from genmlx.core.tokens import TokenSource

DEFAULT_AGENT_PORT = 6790
# The scrub re-hashes every stored model once after the agent starts, then this often (a day: a
# bad block is found long before most models are next reloaded), at most this fast (64 MiB/s, about
# 1% of an Apple SSD's read rate, so serving and peer syncs do not notice it).
DEFAULT_SCRUB_INTERVAL_S = 24 * 3600.0
DEFAULT_SCRUB_BYTES_PER_S = 64 * 1024 * 1024
SCRUB_INTERVAL_ENV = "GENMLX_SCRUB_INTERVAL_S"  # overrides the interval (tests set seconds)
TELEMETRY_INTERVAL_ENV = "GENMLX_TELEMETRY_INTERVAL_S"  # how often the node is sampled (default 1 s)


def default_scrub_interval_s() -> float:
    """``GENMLX_SCRUB_INTERVAL_S`` where it is set, else a day."""
    return float(os.environ.get(SCRUB_INTERVAL_ENV) or DEFAULT_SCRUB_INTERVAL_S)


def default_telemetry_interval_s() -> float:
    return float(os.environ.get(TELEMETRY_INTERVAL_ENV) or 1.0)


def default_log_dir() -> Path:
    """Where rank logs go unless told otherwise: ``GENMLX_HOME/agent/logs``."""
    return genmlx_home() / "agent" / "logs"


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything an agent needs to run. ``token`` is the cluster's secret, or the token file it
    follows through rotations: never log it."""

    name: str
    storage: tuple[str, ...]  # as the user wrote them; ``~`` is expanded by the agent
    token: str | TokenSource = field(repr=False)
    port: int = DEFAULT_AGENT_PORT
    host: str = "0.0.0.0"  # the dispatchers it starts bind the same host
    log_dir: Path = field(default_factory=default_log_dir)
    stop_grace_s: float = 10.0
    discovery: bool = True  # announce with zeroconf (GENMLX_DISCOVERY=off overrides it)
    scrub_interval_s: float = field(default_factory=default_scrub_interval_s)
    scrub_bytes_per_s: float = DEFAULT_SCRUB_BYTES_PER_S
    telemetry_interval_s: float = field(default_factory=default_telemetry_interval_s)

    @property
    def storage_paths(self) -> tuple[Path, ...]:
        """The storage paths, expanded and absolute (symlinks kept, as the user named them)."""
        return tuple(Path(os.path.abspath(Path(p).expanduser())) for p in self.storage)
