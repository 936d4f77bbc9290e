"""``genmlx join-command`` (on the master's machine) and ``genmlx join`` (on a new one).

join-command gets a one-time join code from the master and prints the one line a new machine
runs: make a virtual environment, install the genmlx the master runs (its wheel, from the
master, pinned to its SHA-256), then ``genmlx join``. That exchanges the code for the cluster
token (signed with the code's key, the token sealed under it: see
``genmlx.master.runtime.joining``), writes the token file and starts the agent as a service. The
token is never on a command line, in shell history or in a process list; the code in the line
is spent by then.
"""

from __future__ import annotations

import argparse
import ipaddress
import shlex
import socket
import sys
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from genmlx.cli.master_client import call_master, master_url
from genmlx.cli.read_commands import reading_master
from genmlx.cli.service.commands import cmd_service_install, host_node_name
from genmlx.cli.service.managers import ServiceError
from genmlx.core.errors import GenMLXError
from genmlx.core.files import write_whole
from genmlx.core.home import default_token_path, genmlx_home
from genmlx.core.signing import Keys
from genmlx.core.tokens import JOIN_CODE_LABEL, unseal_token

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
DEFAULT_AGENT_PORT = 6790
VENV = "~/.genmlx/venv"
# The newest Python the new machine has: a Mac's own python3 (3.9) is too old for genmlx, and pip
# says so, which is what the last fallback gives.
FIND_PYTHON = '"$(command -v python3.13 || command -v python3.12 || command -v python3.11 || echo python3)"'


class JoinError(GenMLXError):
    """A join that cannot go on; the message says what to do."""


def add_join_commands(sub: argparse._SubParsersAction, master_help: str) -> None:
    p = sub.add_parser("join-command", help="print the one line that joins a new machine to this cluster")
    p.set_defaults(run=cmd_join_command)
    p.add_argument("--name", help="the new node's name (default: its host name)")
    p.add_argument("--storage", action="append", metavar="PATH", help="its storage path, repeatable")
    p.add_argument("--port", type=int, help=f"its agent's port (default {DEFAULT_AGENT_PORT})")
    p.add_argument("--expires", default="15m", help="how long the code works: 90s, 15m, 2h (default 15m)")
    p.add_argument("--advertise", metavar="URL", help="the master's URL as the new machine reaches it")
    p.add_argument(
        "--python",
        help="the new machine's Python 3.11+ (default: the newest of python3.13 ... python3 it has)",
    )
    p.add_argument("--master", help=master_help)
    p.add_argument("-f", "--file", type=Path, help="a manifest: read the master it names, with its token")

    p = sub.add_parser("join", help="join this machine to a cluster with a code from `genmlx join-command`")
    p.set_defaults(run=cmd_join)
    p.add_argument("master", help="the master's URL, as join-command printed it")
    p.add_argument("--code", required=True, help="the one-time join code")
    p.add_argument("--name", help="this node's name (default: this host's name)")
    p.add_argument(
        "--storage", action="append", metavar="PATH", help="a storage path (default: ~/.genmlx/models)"
    )
    p.add_argument("--port", type=int, default=DEFAULT_AGENT_PORT, help="the agent's port")
    p.add_argument("--host", help="the agent's listen address (default 0.0.0.0)")
    p.add_argument("--no-discovery", action="store_true", help="do not announce the agent with zeroconf")
    p.add_argument(
        "--no-service", action="store_true", help="only put the token in place; start the agent yourself"
    )


# ----- on the master's machine -----


def cmd_join_command(args: argparse.Namespace) -> int:
    url, token = reading_master(args)
    advertised = (args.advertise or reachable_url(url)).rstrip("/")
    body = {"ttlSeconds": seconds(args.expires), **({"name": args.name} if args.name else {})}
    issued = call_master(url, token, "POST", "/api/v1/join-codes", body)
    try:
        code = unseal_token(issued["code"], Keys.of(token).signing, JOIN_CODE_LABEL)
    except (KeyError, TypeError, ValueError) as e:
        raise JoinError(f"the master's answer does not hold a join code sealed for this token: {e}") from None
    join = ["genmlx", "join", advertised, "--code", code]
    join += ["--name", args.name] if args.name else []
    join += [word for path in args.storage or [] for word in ("--storage", path)]
    join += ["--port", str(args.port)] if args.port else []
    package = issued["package"]
    if "sha256" in package:
        wheel = f"{advertised}{package['path']}#sha256={package['sha256']}"
        python = f"{VENV}/bin/python"
        interpreter = shlex.quote(args.python) if args.python else FIND_PYTHON
        line = (
            f"{interpreter} -m venv {VENV} && {python} -m pip install -q {shlex.quote(wheel)}"
            f" && {VENV}/bin/{shlex.join(join)}"
        )
    else:
        line = shlex.join(join)
    until = datetime.fromisoformat(issued["expires"].replace("Z", "+00:00")).astimezone()
    print(f"Run this on the new machine (the code works once, until {until:%H:%M}):\n\n  {line}\n")
    if "sha256" in package:
        print(f"It installs genmlx from this master ({package['file']}, checked against its SHA-256) into")
        print(f"{VENV}, trades the code for the cluster token and starts the agent as a service.")
    else:
        print(f"Install genmlx on the new machine first: {package['unavailable']}.")
    print("The node then shows as unmanaged in `genmlx status` and on the status page, with the")
    print("entry to add under spec.nodes in cluster.yaml.")
    return 0


def reachable_url(url: str) -> str:
    """``url``, or where it names this machine's loopback, the same port at this host's name as
    other machines on the LAN reach it (``.local``, by mDNS)."""
    parts = urlsplit(url)
    try:
        loopback = ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:
        loopback = parts.hostname == "localhost"
    if not loopback:
        return url
    host = socket.gethostname()
    host = host if "." in host else f"{host}.local"
    return f"{parts.scheme}://{host}:{parts.port or 6789}"


def seconds(text: str) -> int:
    unit = DURATION_UNITS.get(text[-1:])
    if unit is None or not text[:-1].isdigit():
        raise JoinError(f"--expires {text!r}: give a number of s, m or h (90s, 15m, 2h)")
    return int(text[:-1]) * unit


# ----- on the new machine -----


def cmd_join(args: argparse.Namespace) -> int:
    name = args.name or host_node_name()
    storage = [str(Path(p).expanduser().resolve()) for p in args.storage or [genmlx_home() / "models"]]
    options = agent_options(name, storage, args)
    if default_token_path().exists():  # checked before the code is spent
        raise JoinError(
            f"{default_token_path()} already holds a cluster token. If it is this cluster's, "
            f"`{here('service', 'install', '--agent', *options)}` starts the agent; if another's, move it "
            "away first."
        )
    url = master_url(args.master)
    for path in storage:
        Path(path).mkdir(parents=True, exist_ok=True)
    body = {"name": name, "storage": storage, "port": args.port}
    reply = call_master(url, args.code, "POST", "/api/v1/join", body)  # signed with the code's key
    try:
        token = unseal_token(reply["token"], Keys.of(args.code).signing, name)
    except (KeyError, TypeError, ValueError) as e:
        raise JoinError(f"the master's answer does not hold a token sealed for this code: {e}") from None
    put_token(token)
    print(f"joined the cluster at {url} as node {name}; the token is in {default_token_path()}")
    if args.no_service:
        print(f"start the agent yourself: {here('agent', *options)}")
    else:
        service = argparse.Namespace(
            role="agent",
            name=name,
            storage=storage,
            file=None,
            watch=False,
            port=args.port if args.port != DEFAULT_AGENT_PORT else None,
            host=args.host,
            no_discovery=args.no_discovery,
            dry_run=False,
        )
        try:
            cmd_service_install(service)
        except ServiceError as e:
            raise JoinError(
                f"joined, but the agent's service did not start: {e}\n  The token is in place: start it "
                f"with `{here('service', 'install', '--agent', *options)}` once that is mended, or run "
                f"`{here('agent', *options)}`."
            ) from None
    entry = {"name": name, "storage": [{"path": p} for p in storage]}
    print("\nDeclare it in cluster.yaml under spec.nodes, then `genmlx apply`:\n")
    print("\n".join("    " + line for line in yaml.safe_dump([entry], sort_keys=False).splitlines()))
    return 0


def agent_options(name: str, storage: list[str], args: argparse.Namespace) -> list[str]:
    """The agent's options as ``genmlx agent`` and ``genmlx service install`` take them."""
    options = ["--name", name, *(word for path in storage for word in ("--storage", path))]
    options += ["--port", str(args.port)] if args.port != DEFAULT_AGENT_PORT else []
    options += ["--host", args.host] if args.host else []
    return options + (["--no-discovery"] if args.no_discovery else [])


def here(*argv: str) -> str:
    """A genmlx command line that runs this genmlx (a fresh install's is not on PATH)."""
    return shlex.join([sys.executable, "-m", "genmlx", *argv])


def put_token(token: str) -> None:
    """The cluster token in this machine's token file, readable by its user only."""
    path = default_token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, token + "\n", mode=0o600)
