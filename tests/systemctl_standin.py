"""A stand-in for ``systemctl`` where systemd cannot run (no systemd as PID 1 on the test machine):
the calls ``genmlx service`` makes, carried out for system units the way systemd would at its
simplest. ``enable --now`` starts the unit's ``ExecStart`` with its ``Environment`` and
``WorkingDirectory`` (read back from the unit file as systemd reads them) in a session of its own,
with its output in ``STATE/UNIT.out``; ``show`` and ``is-active`` report it; ``disable --now``
stops it with SIGTERM. Run as ``python systemctl_standin.py STATE_DIR ARGS...`` by a wrapper named
``systemctl``.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

UNITS = Path("/etc/systemd/system")


def unit_settings(unit: Path) -> tuple[list[str], dict[str, str], str]:
    """ExecStart's words, the Environment, the WorkingDirectory of a unit file."""
    argv: list[str] = []
    env: dict[str, str] = {}
    cwd = "/"
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "ExecStart":
            argv = shlex.split(value.replace("$$", "$").replace("%%", "%"))
        elif key == "Environment":
            name, _, setting = shlex.split(value.replace("%%", "%"))[0].partition("=")
            env[name] = setting
        elif key == "WorkingDirectory":
            cwd = value.replace("%%", "%")
    return argv, env, cwd


def running(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def main(state: Path, args: list[str]) -> int:
    words = [a for a in args if not a.startswith("--")]
    if not words:
        return 1
    verb, units = words[0], words[1:]
    if verb == "daemon-reload":
        return 0
    (unit,) = units
    pid_file = state / f"{unit}.pid"
    if verb == "is-active":
        return 0 if running(pid_file) else 3
    if verb in ("enable", "restart"):
        if verb == "restart" and (pid := running(pid_file)):
            os.kill(pid, signal.SIGTERM)
        if verb == "restart" or "--now" in args and not running(pid_file):
            argv, env, cwd = unit_settings(UNITS / unit)
            with (state / f"{unit}.out").open("ab") as out:
                child = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            pid_file.write_text(str(child.pid))
        return 0
    if verb == "disable":
        if "--now" in args and (pid := running(pid_file)):
            os.kill(pid, signal.SIGTERM)
        return 0
    if verb == "show":
        pid = running(pid_file)
        loaded = (UNITS / unit).exists()
        print(f"MainPID={pid or 0}\nNRestarts=0\nExecMainStatus=0")
        print(f"LoadState={'loaded' if loaded else 'not-found'}")
        print(f"ActiveState={'active' if pid else 'inactive'}\nSubState={'running' if pid else 'dead'}")
        print(f"UnitFileState={'enabled' if loaded else ''}")
        return 0
    print(f"systemctl stand-in: {verb} is not something genmlx service asks", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
