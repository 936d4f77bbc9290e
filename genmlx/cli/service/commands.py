"""``genmlx service install|status|logs|uninstall``: the master or this node's agent as a service
that starts at login (launchd) or boot (systemd) and again whenever it exits.

Install shows the file it writes and every command it runs, does nothing more when the file is
already what it would write and the service is loaded, and never touches a file it did not write.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import re
import shlex
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from genmlx.cli.service.managers import Manager, ServiceError, manager_for_this_machine
from genmlx.cli.service.units import Role, ServiceSpec, is_ours, log_file
from genmlx.core.errors import GenMLXError
from genmlx.core.files import write_whole
from genmlx.core.home import default_token_path, genmlx_home
from genmlx.manifest.types import NAME

DEFAULT_PORTS: dict[Role, int] = {"master": 6789, "agent": 6790}
FOLLOW_POLL_S = 0.25


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("service", help="run the master or this node's agent as a service (launchd, systemd)")
    actions = p.add_subparsers(required=True, metavar="ACTION")

    install = actions.add_parser("install", help="write the service's file, load and start it (again)")
    install.set_defaults(run=cmd_service_install)
    role_options(install, required=True)
    install.add_argument("--name", help="agent: the node's name in cluster.yaml (default: this host's name)")
    install.add_argument(
        "--storage",
        action="append",
        metavar="PATH",
        help="agent: a storage path, repeatable (default: ~/.genmlx/models)",
    )
    install.add_argument("-f", "--file", type=Path, help="master: the manifest to apply at start")
    install.add_argument("--watch", action="store_true", help="master: re-apply the manifest when it changes")
    install.add_argument("--port", type=int, help="listen port (default: master 6789, agent 6790)")
    install.add_argument("--host", help="listen address (default 0.0.0.0)")
    install.add_argument("--no-discovery", action="store_true", help="no zeroconf (find agents by address)")
    install.add_argument("--dry-run", action="store_true", help="only show the file it would write")

    status = actions.add_parser("status", help="whether each service is installed and running")
    status.set_defaults(run=cmd_service_status)
    role_options(status, required=False)

    logs = actions.add_parser("logs", help="the service's log (GENMLX_HOME/logs)")
    logs.set_defaults(run=cmd_service_logs)
    role_options(logs, required=True)
    logs.add_argument("-n", "--lines", type=int, default=50, help="how many last lines (default 50)")
    logs.add_argument("--follow", action="store_true", help="keep printing lines as they come")

    uninstall = actions.add_parser("uninstall", help="stop the service and remove its file (logs stay)")
    uninstall.set_defaults(run=cmd_service_uninstall)
    role_options(uninstall, required=True)


def role_options(parser: argparse.ArgumentParser, required: bool) -> None:
    roles = parser.add_mutually_exclusive_group(required=required)
    roles.add_argument("--master", dest="role", action="store_const", const="master", help="the master")
    roles.add_argument("--agent", dest="role", action="store_const", const="agent", help="this node's agent")


def say(line: str) -> None:
    print(line, flush=True)


# ----- install -----


def cmd_service_install(args: argparse.Namespace, manager: Manager | None = None) -> int:
    spec = service_spec(args)
    manager = manager or manager_for_this_machine(say)
    path = manager.path(spec.role)
    text = manager.render(spec)
    existing = path.read_text() if path.exists() else None
    if existing is not None and not is_ours(existing):
        raise ServiceError(
            f"{path} exists and was not written by genmlx service install: it is left alone. "
            "Remove it yourself to install genmlx's."
        )
    changed = existing != text
    if not changed:
        say(f"{path} is already this ({manager.name}):")
    else:
        say(f"{'Replacing' if existing is not None else 'Writing'} {path} ({manager.name}):")
    say(indented(text))
    if args.dry_run:
        say("(dry run: nothing written, nothing started)")
        return 0
    if changed:
        write_file(path, text)
    spec.log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        manager.activate(spec.role, path, changed)
    except ServiceError:
        if changed:
            put_back(manager, spec.role, path, existing)
        raise
    state = manager.state(spec.role)
    say(f"genmlx {spec.role}: {state.detail}")
    say(f"logs: {spec.log_file} (`genmlx service logs --{spec.role}`)")
    if manager.name == "systemd (user)":
        say("a user unit runs while your user's systemd does; `loginctl enable-linger` starts it at boot")
    return 0


def put_back(manager: Manager, role: Role, path: Path, existing: str | None) -> None:
    """After a failed load, what was there before: the old file, loaded again, or nothing (best
    effort: each step says how it went)."""
    try:
        if existing is not None:
            write_file(path, existing)
            manager.activate(role, path, changed=True)
            say(f"{path} is back as it was, and loaded again")
        else:
            manager.deactivate(role, path)
            path.unlink()
            manager.forget(role)
            say(f"{path} removed again")
    except (ServiceError, OSError) as e:
        say(f"could not put {path} back as it was: {e}")


def write_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, text, mode=0o644)


def service_spec(args: argparse.Namespace) -> ServiceSpec:
    """The command line the service runs, from the install's arguments, checked."""
    role: Role = args.role
    home = genmlx_home().resolve()
    if role == "agent":
        if args.file is not None or args.watch:
            raise ServiceError("-f and --watch are the master's: give them with --master")
        name = args.name or host_node_name()
        if not NAME.match(name):
            raise ServiceError(f"--name {name!r}: a node's name is lowercase letters, digits, '.', '_', '-'")
        storage = [Path(p).expanduser().resolve() for p in args.storage or [home / "models"]]
        if not args.storage:
            storage[0].mkdir(parents=True, exist_ok=True)
        options = ["--name", name, *(word for p in storage for word in ("--storage", str(p)))]
        description = f"GenMLX agent (node {name})"
    else:
        if args.name or args.storage:
            raise ServiceError("--name and --storage are the agent's: give them with --agent")
        if args.watch and args.file is None:
            raise ServiceError("--watch needs -f FILE: the manifest file to watch")
        options = []
        if args.file is not None:
            manifest = args.file.expanduser().resolve()
            if not manifest.is_file():
                raise ServiceError(f"-f {args.file}: no such file")
            options = ["-f", str(manifest), *(["--watch"] if args.watch else [])]
        description = "GenMLX master"
    if not default_token_path().exists():
        raise ServiceError(
            f"no cluster token at {default_token_path()}: the service would not start. "
            + (
                "Run `genmlx token`."
                if role == "master"
                else "Copy the master's there, or join with `genmlx join`."
            )
        )
    options += ["--port", str(args.port)] if args.port else []
    options += ["--host", args.host] if args.host else []
    options += ["--no-discovery"] if args.no_discovery else []
    argv = (sys.executable, "-m", "genmlx", role, *options, "--log-file", str(log_file(home, role)))
    return ServiceSpec(role, argv, home, os.environ.get("PATH", "/usr/bin:/bin"), description)


def host_node_name() -> str:
    """This host's name as a node's name: its first label, lowercased ("Studio-A.local" -> "studio-a")."""
    return re.sub(r"[^a-z0-9._-]", "-", socket.gethostname().split(".")[0].lower()).strip("-._") or "node"


def indented(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.rstrip().splitlines())


# ----- status -----


def cmd_service_status(args: argparse.Namespace, manager: Manager | None = None) -> int:
    """Exit 0 when every service asked about (without --master or --agent: every one installed)
    runs, else 3, as ``systemctl status`` says "not running"."""
    manager = manager or manager_for_this_machine(say)
    installed, running = 0, True
    for role in [args.role] if args.role else ["master", "agent"]:
        path = manager.path(role)
        text = path.read_text() if path.exists() else None
        if text is None or not is_ours(text):
            why = "is absent" if text is None else "was not written by genmlx"
            say(f"genmlx {role}: not installed ({path} {why})")
            running = running and args.role is None
            continue
        installed += 1
        state = manager.state(role)
        argv = installed_argv(path, text)
        say(f"genmlx {role}: {state.detail} ({manager.name}, {path})")
        say(f"  runs: {shlex.join(argv)}")
        say(f"  {answer(role, argv)}")
        say(f"  log: {log_path_in(argv) or log_file(genmlx_home(), role)}")
        running = running and state.running
    return 0 if installed and running else 3


def installed_argv(path: Path, text: str) -> list[str]:
    """The command line an installed file runs."""
    if path.suffix == ".plist":
        return list(plistlib.loads(text.encode())["ProgramArguments"])
    line = next((line for line in text.splitlines() if line.startswith("ExecStart=")), "ExecStart=")
    return shlex.split(line.removeprefix("ExecStart=").replace("$$", "$").replace("%%", "%"))


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def log_path_in(argv: list[str]) -> str | None:
    return option(argv, "--log-file")


def answer(role: Role, argv: list[str]) -> str:
    """Whether the service answers HTTP where it listens: its --port and --host, or (a master)
    its manifest's port and scheme."""
    port, scheme = option(argv, "--port"), "http"
    manifest = option(argv, "-f")
    if role == "master" and manifest:
        from genmlx.manifest import load_manifest

        try:
            master = load_manifest(Path(manifest)).master
            port, scheme = port or str(master.port), master.scheme
        except GenMLXError:
            pass  # the service itself says what is wrong with it
    host = option(argv, "--host")
    host = "127.0.0.1" if host in (None, "0.0.0.0", "::") else host
    url = f"{scheme}://{host}:{port or DEFAULT_PORTS[role]}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            code = reply.status
    except urllib.error.HTTPError as e:
        code = e.code  # it answers (a 401 is an answer)
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLError):  # a self-signed certificate: still an answer
            return f"answers at {url} (TLS, its certificate not checked here)"
        return f"no answer at {url}: {reason}"
    return f"answers at {url} (HTTP {code})"


# ----- logs -----


def cmd_service_logs(args: argparse.Namespace, manager: Manager | None = None) -> int:
    manager = manager or manager_for_this_machine(say)
    path = manager.path(args.role)
    argv = installed_argv(path, path.read_text()) if path.exists() and is_ours(path.read_text()) else []
    log = Path(log_path_in(argv) or log_file(genmlx_home(), args.role))
    if not log.exists():
        raise ServiceError(f"no log at {log} yet: is the {args.role} installed (`genmlx service status`)?")
    print_tail(log, args.lines)
    if args.follow:
        follow(log, lambda text: print(text, end="", flush=True))
    return 0


def print_tail(path: Path, lines: int) -> None:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 256 * max(lines, 1)))  # enough for that many lines of this log
        tail = f.read().decode(errors="replace").splitlines()[-lines:] if lines > 0 else []
    for line in tail:
        print(line)


def follow(path: Path, emit: Callable[[str], None], stop: Callable[[], bool] = lambda: False) -> None:
    """Print what is added to ``path`` until ``stop``; a rotated log is followed into its new file."""
    f = path.open("rb")
    f.seek(0, os.SEEK_END)
    inode = os.fstat(f.fileno()).st_ino
    try:
        while not stop():
            chunk = f.read()
            if chunk:
                emit(chunk.decode(errors="replace"))
                continue
            try:
                rotated = path.stat().st_ino != inode
            except FileNotFoundError:
                rotated = False
            if rotated:  # what the old file got last, then the new one from its start
                if rest := f.read():
                    emit(rest.decode(errors="replace"))
                f.close()
                f = path.open("rb")
                inode = os.fstat(f.fileno()).st_ino
                continue
            time.sleep(FOLLOW_POLL_S)
    finally:
        f.close()


# ----- uninstall -----


def cmd_service_uninstall(args: argparse.Namespace, manager: Manager | None = None) -> int:
    manager = manager or manager_for_this_machine(say)
    path = manager.path(args.role)
    if not path.exists():
        say(f"genmlx {args.role} is not installed ({path} is absent): nothing to do")
        return 0
    if not is_ours(path.read_text()):
        raise ServiceError(f"{path} was not written by genmlx service install: it is left alone")
    manager.deactivate(args.role, path)
    path.unlink()
    say(f"removed {path}")
    manager.forget(args.role)
    say(f"the logs stay in {log_file(genmlx_home(), args.role).parent}")
    return 0
