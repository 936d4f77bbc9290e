"""What ``genmlx service install`` writes: a launchd agent's plist on macOS, a systemd unit on
Linux, each running one ``genmlx master`` or ``genmlx agent`` command line.

Both carry ``MARKER``, so that install rewrites and uninstall removes only files it wrote. The
process runs with the ``GENMLX_HOME`` and the ``PATH`` of the shell that installed it (launchd
starts jobs with a bare PATH, which would hide Homebrew's ``macmon`` from the telemetry), logs to
``GENMLX_HOME/logs/ROLE.log`` rotated by size (``genmlx ... --log-file``), and is started again
whenever it exits.
"""

from __future__ import annotations

import plistlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Role = Literal["master", "agent"]

MARKER = "Written by `genmlx service install`; `genmlx service uninstall` removes it."
RESTART_AFTER_S = 5  # how long after an exit the service is started again
STOP_TIMEOUT_S = 30  # what a stop waits for the agent to stop its ranks before killing


@dataclass(frozen=True)
class ServiceSpec:
    """One service: its role, the command it runs, and the state and logs it keeps."""

    role: Role
    argv: tuple[str, ...]  # the whole command line, the interpreter first
    home: Path  # GENMLX_HOME
    path_variable: str  # the PATH it runs with
    description: str

    @property
    def log_file(self) -> Path:
        return log_file(self.home, self.role)

    @property
    def stderr_file(self) -> Path:
        """What the process writes outside its log (a crash before logging starts): launchd only."""
        return self.home / "logs" / f"{self.role}.stderr.log"


def log_file(home: Path, role: Role) -> Path:
    return home / "logs" / f"{role}.log"


def launchd_label(role: Role) -> str:
    return f"com.genmlx.{role}"


def systemd_unit_name(role: Role) -> str:
    return f"genmlx-{role}.service"


def is_ours(text: str) -> bool:
    return MARKER in text


# ----- launchd -----


def render_plist(spec: ServiceSpec) -> str:
    """A LaunchAgent: started at login (RunAtLoad) and again whenever it exits (KeepAlive),
    unthrottled (ProcessType Interactive: a model's ranks are the machine's work, not background)."""
    job = {
        "Label": launchd_label(spec.role),
        "ProgramArguments": list(spec.argv),
        "EnvironmentVariables": {"GENMLX_HOME": str(spec.home), "PATH": spec.path_variable},
        "WorkingDirectory": str(spec.home),
        "RunAtLoad": True,
        "KeepAlive": True,
        "ThrottleInterval": RESTART_AFTER_S,
        "ExitTimeOut": STOP_TIMEOUT_S,
        "ProcessType": "Interactive",
        "StandardOutPath": str(spec.stderr_file),
        "StandardErrorPath": str(spec.stderr_file),
    }
    text = plistlib.dumps(job, sort_keys=False).decode()
    header, body = text.split("<plist", 1)
    return f"{header}<!-- {spec.description}. {MARKER} -->\n<plist{body}"


# ----- systemd -----


def render_unit(spec: ServiceSpec, system: bool) -> str:
    """A systemd service: a user unit (started with the user's manager: at login, or at boot
    with lingering) or, as root, a system unit started at boot."""
    lines = [
        f"# {MARKER}",
        "[Unit]",
        f"Description={spec.description}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_line(spec.argv)}",
        f"Environment={quoted(no_specifiers(f'GENMLX_HOME={spec.home}'))}",
        f"Environment={quoted(no_specifiers(f'PATH={spec.path_variable}'))}",
        f"WorkingDirectory={no_specifiers(str(spec.home))}",
        "Restart=always",
        f"RestartSec={RESTART_AFTER_S}",
        # SIGTERM to the agent alone, which stops its ranks; whatever is left is killed after that.
        "KillMode=mixed",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if system else 'default.target'}",
    ]
    return "\n".join(lines) + "\n"


def exec_line(argv: Sequence[str]) -> str:
    """``argv`` as systemd reads a command line: each word quoted where it must be, ``%`` and
    ``$`` escaped so that systemd expands nothing."""
    words = (no_specifiers(word).replace("$", "$$") for word in argv)
    return " ".join(quoted(word) if needs_quotes(word) else word for word in words)


def needs_quotes(word: str) -> bool:
    return not word or any(c.isspace() or c in "\"'\\;" for c in word)


def quoted(word: str) -> str:
    """A double-quoted word, backslashes and quotes escaped as systemd's C-style quoting reads them."""
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def no_specifiers(text: str) -> str:
    """``text`` with its ``%`` escaped: systemd expands specifiers (%h, %u) in most settings."""
    return text.replace("%", "%%")
