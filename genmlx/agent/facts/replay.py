"""Node facts from recorded command output: a ``CommandRunner`` that answers the macOS probe's
commands from files, one per command, named as ``RECORDING_FILES`` says.

It is how tests run real agents with the facts of a Mac (Thunderbolt cables, RDMA devices) on a
machine that has none, and how a user's facts can be read back from what their Mac printed: set
``GENMLX_FACTS_REPLAY`` to the directory before starting an agent. Interface addresses are still
read from the machine itself; a command without a file fails as if it were not installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from genmlx.agent.facts.macos import CHIP_SYSCTL, HARDWARE_PORTS, RDMA_DEVICES, SW_VERS, THUNDERBOLT_PROFILE
from genmlx.agent.facts.platform import PlatformCommandFailed

FACTS_REPLAY_ENV = "GENMLX_FACTS_REPLAY"

# Each command the macOS probe runs, and the file in a recording directory that holds its output.
RECORDING_FILES = {
    SW_VERS: "sw_vers-productVersion.txt",
    CHIP_SYSCTL: "sysctl-machdep.cpu.brand_string.txt",
    HARDWARE_PORTS: "networksetup-listallhardwareports.txt",
    THUNDERBOLT_PROFILE: "system_profiler-SPThunderboltDataType.json",
    RDMA_DEVICES: "ibv_devinfo.txt",
}


@dataclass(frozen=True)
class RecordedCommands:
    """Answers each known command with its recording in ``directory``."""

    directory: Path

    def __call__(self, argv: Sequence[str]) -> str:
        name = RECORDING_FILES.get(tuple(argv))
        if name is None or not (self.directory / name).is_file():
            raise PlatformCommandFailed(f"{argv[0]}: no recording of it in {self.directory}")
        return (self.directory / name).read_text()
