"""The service managers ``genmlx service`` drives: launchd (``launchctl``) on macOS, systemd
(``systemctl``) on Linux. Every command goes through a ``Runner``, the platform seam: tests give
one that answers from recorded output.

Each manager knows where its file goes, how to load it (or reload it once changed) so that it
runs, how to stop and unload it, and how to read its state back.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from genmlx.cli.service.units import (
    Role,
    ServiceSpec,
    launchd_label,
    render_plist,
    render_unit,
    systemd_unit_name,
)
from genmlx.core.errors import GenMLXError

COMMAND_TIMEOUT_S = 60.0
BOOTSTRAP_TRIES = 5  # launchctl bootstrap right after a bootout can fail while the job still exits


class ServiceError(GenMLXError):
    """A service cannot be installed, read or removed as asked."""


@dataclass(frozen=True)
class Completed:
    code: int
    out: str
    err: str


Runner = Callable[[Sequence[str]], Completed]


def run_command(argv: Sequence[str]) -> Completed:
    """Run ``argv`` without a shell; a missing command is exit code 127, as a shell says it."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        return Completed(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return Completed(124, "", f"{argv[0]}: no answer in {COMMAND_TIMEOUT_S:.0f} s")
    return Completed(done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class ServiceState:
    """What the manager says of a loaded service, in words and figures."""

    loaded: bool
    running: bool
    pid: int | None = None
    detail: str = ""  # "running since ...", "exited with code 1", "restarted 3 times"


class Manager(Protocol):
    name: str  # how ``genmlx service`` names it: "launchd", "systemd (user)", "systemd (system)"

    def path(self, role: Role) -> Path: ...

    def render(self, spec: ServiceSpec) -> str: ...

    def activate(self, role: Role, path: Path, changed: bool) -> None:
        """Load the file at ``path`` so that the service runs, reloading it where ``changed``."""

    def deactivate(self, role: Role, path: Path) -> None:
        """Stop the service and unload it (the file stays)."""

    def forget(self, role: Role) -> None:
        """What the manager needs once the file is gone."""

    def state(self, role: Role) -> ServiceState: ...


class Commands:
    """Runs a manager's commands, each shown as it runs (``say``), failing with its output."""

    def __init__(self, run: Runner, say: Callable[[str], None], hint: str = ""):
        self.run, self.say, self.hint = run, say, hint

    def __call__(self, *argv: str) -> Completed:
        self.say("$ " + " ".join(argv))
        done = self.run(argv)
        if done.code != 0:
            output = done.err.strip() or done.out.strip()
            raise ServiceError(f"{' '.join(argv)} failed (exit code {done.code}): {output}{self.hint}")
        return done


# ----- launchd -----


class Launchd:
    """A LaunchAgent in the user's GUI domain: loaded at login, kept alive by launchd."""

    name = "launchd"

    def __init__(self, run: Runner, say: Callable[[str], None], user_home: Path, uid: int, sleep=time.sleep):
        self.run, self.commands = run, Commands(run, say)
        self.user_home, self.domain, self.sleep = user_home, f"gui/{uid}", sleep

    def path(self, role: Role) -> Path:
        return self.user_home / "Library" / "LaunchAgents" / f"{launchd_label(role)}.plist"

    def render(self, spec: ServiceSpec) -> str:
        return render_plist(spec)

    def target(self, role: Role) -> str:
        return f"{self.domain}/{launchd_label(role)}"

    def loaded(self, role: Role) -> bool:
        return self.run(["launchctl", "print", self.target(role)]).code == 0

    def activate(self, role: Role, path: Path, changed: bool) -> None:
        loaded = self.loaded(role)
        if loaded and not changed:
            return
        if loaded:
            self.commands("launchctl", "bootout", self.target(role))
        self.commands("launchctl", "enable", self.target(role))  # undo an earlier `launchctl disable`
        for attempt in range(BOOTSTRAP_TRIES):
            try:
                self.commands("launchctl", "bootstrap", self.domain, str(path))
                return
            except ServiceError:
                if attempt == BOOTSTRAP_TRIES - 1:
                    raise
                self.sleep(1.0)  # the old job is still exiting

    def deactivate(self, role: Role, path: Path) -> None:
        if self.loaded(role):
            self.commands("launchctl", "bootout", self.target(role))

    def forget(self, role: Role) -> None:
        pass

    def state(self, role: Role) -> ServiceState:
        done = self.run(["launchctl", "print", self.target(role)])
        if done.code != 0:
            return ServiceState(False, False, detail="not loaded in launchd")
        return parse_launchctl_print(done.out)


def parse_launchctl_print(text: str) -> ServiceState:
    """``launchctl print``'s description of one job: its state, pid, runs and last exit."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"^\t(\w[\w ]*?) = (.*)$", line)  # the job's own fields, one tab in
        if match:
            fields.setdefault(match[1], match[2].strip())
    state = fields.get("state", "unknown")
    pid = int(fields["pid"]) if fields.get("pid", "").isdigit() else None
    parts = [state + (f" (pid {pid})" if pid else "")]
    if fields.get("runs", "").isdigit():
        parts.append(f"started {fields['runs']} time(s)")
    exit_code = fields.get("last exit code")
    if exit_code and exit_code != "(never exited)":
        parts.append(f"last exit: {exit_code}")
    return ServiceState(True, state == "running", pid, ", ".join(parts))


# ----- systemd -----


class Systemd:
    """A systemd service: the user's (``systemctl --user``) or, as root, the system's."""

    def __init__(self, run: Runner, say: Callable[[str], None], system: bool, user_config: Path):
        self.run, self.commands, self.system = run, Commands(run, say, user_bus_hint(system)), system
        self.directory = Path("/etc/systemd/system") if system else user_config / "systemd" / "user"
        self.name = "systemd (system)" if system else "systemd (user)"

    def systemctl(self, *argv: str) -> list[str]:
        return ["systemctl", *([] if self.system else ["--user"]), *argv]

    def path(self, role: Role) -> Path:
        return self.directory / systemd_unit_name(role)

    def render(self, spec: ServiceSpec) -> str:
        return render_unit(spec, self.system)

    def activate(self, role: Role, path: Path, changed: bool) -> None:
        unit = systemd_unit_name(role)
        if changed:
            self.commands(*self.systemctl("daemon-reload"))
        running = self.run(self.systemctl("is-active", "--quiet", unit)).code == 0
        self.commands(*self.systemctl("enable", "--now", unit))  # enabled at boot or login, started
        if changed and running:
            self.commands(*self.systemctl("restart", unit))  # the running one takes the new command

    def deactivate(self, role: Role, path: Path) -> None:
        self.commands(*self.systemctl("disable", "--now", systemd_unit_name(role)))

    def forget(self, role: Role) -> None:
        self.commands(*self.systemctl("daemon-reload"))

    def state(self, role: Role) -> ServiceState:
        properties = "LoadState,ActiveState,SubState,MainPID,NRestarts,ExecMainStatus,UnitFileState"
        done = self.run(self.systemctl("show", systemd_unit_name(role), f"--property={properties}"))
        if done.code != 0:
            raise ServiceError(f"systemctl cannot say: {done.err.strip()}{user_bus_hint(self.system)}")
        return parse_systemctl_show(done.out)


def parse_systemctl_show(text: str) -> ServiceState:
    """``systemctl show --property=...``: one ``Key=value`` a line."""
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if fields.get("LoadState") != "loaded":
        return ServiceState(
            False, False, detail=f"not loaded in systemd ({fields.get('LoadState', 'unknown')})"
        )
    pid = (
        int(fields["MainPID"]) if fields.get("MainPID", "0").isdigit() and fields["MainPID"] != "0" else None
    )
    active, sub = fields.get("ActiveState", "unknown"), fields.get("SubState", "unknown")
    parts = [
        f"{active} ({sub}{f', pid {pid}' if pid else ''})",
        f"{fields.get('UnitFileState', '?')} at boot",
    ]
    if fields.get("NRestarts", "0") not in ("", "0"):
        parts.append(f"restarted {fields['NRestarts']} time(s)")
    if fields.get("ExecMainStatus", "0") not in ("", "0"):
        parts.append(f"last exit code {fields['ExecMainStatus']}")
    return ServiceState(True, active == "active", pid, ", ".join(parts))


def user_bus_hint(system: bool) -> str:
    if system:
        return ""
    return (
        " (a user unit needs the user's systemd: log in to a session, or as root run "
        f"`loginctl enable-linger {os.environ.get('USER', 'USER')}` so it runs at boot without one)"
    )


def manager_for_this_machine(say: Callable[[str], None], run: Runner = run_command) -> Manager:
    """launchd on macOS, systemd on Linux (the system's as root, else the user's)."""
    import sys

    if sys.platform == "darwin":
        return Launchd(run, say, Path.home(), os.getuid())
    if sys.platform.startswith("linux"):
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        return Systemd(run, say, system=os.geteuid() == 0, user_config=config)
    raise ServiceError(f"genmlx service knows launchd (macOS) and systemd (Linux), not {sys.platform}")
