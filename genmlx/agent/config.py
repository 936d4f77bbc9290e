"""How an agent is configured: built once by its caller (the CLI or ``python -m genmlx.agent``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from genmlx.home import genmlx_home

DEFAULT_AGENT_PORT = 6790


def default_log_dir() -> Path:
    """Where rank logs go unless told otherwise: ``GENMLX_HOME/agent/logs``."""
    return genmlx_home() / "agent" / "logs"


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything an agent needs to run. ``token`` is the cluster's bearer secret: never log it."""

    name: str
    storage: tuple[str, ...]  # as the user wrote them; ``~`` is expanded by the agent
    token: str = field(repr=False)
    port: int = DEFAULT_AGENT_PORT
    host: str = "0.0.0.0"  # the dispatchers it starts bind the same host
    log_dir: Path = field(default_factory=default_log_dir)
    stop_grace_s: float = 10.0
    discovery: bool = True  # announce with zeroconf (GENMLX_DISCOVERY=off overrides it)

    @property
    def storage_paths(self) -> tuple[Path, ...]:
        """The storage paths, expanded and absolute (symlinks kept, as the user named them)."""
        return tuple(Path(os.path.abspath(Path(p).expanduser())) for p in self.storage)
