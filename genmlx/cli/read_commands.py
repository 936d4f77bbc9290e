"""The commands that read the running master: status, get, describe, ui.

Each finds the master from ``--master``, else ``$GENMLX_MASTER``, else the manifest given with
``-f`` (its master node's address and ``spec.master.port``, and the token of its ``auth.tokenFile``),
else this machine's default port; when that default was only a guess and nothing answers there, the
error says how to name the master.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from genmlx.cli.master_client import (
    MasterError,
    MasterUnreachable,
    fetch_events,
    fetch_status,
    format_described,
    format_items,
    format_status,
    manifest_token,
    master_url,
    print_document,
    ui_login_url,
)
from genmlx.core.home import read_token

NAME_THE_MASTER = "name the master with --master URL, GENMLX_MASTER=URL, or -f cluster.yaml"
Command = Callable[[argparse.Namespace], int]


def add_read_commands(sub: argparse._SubParsersAction, master_help: str) -> None:
    """status, get, describe and ui, each with ``--master`` and ``-f``."""
    status = reading_command(sub, "status", cmd_status, "print the cluster's status from the running master")
    with_output(status)
    get = reading_command(sub, "get", cmd_get, "list nodes or models with their Ready condition")
    get.add_argument("what", choices=("nodes", "models"))
    with_output(get)
    describe = reading_command(
        sub, "describe", cmd_describe, "everything about one node or model, with its recent events"
    )
    describe.add_argument("what", choices=("node", "model"))
    describe.add_argument("name")
    with_output(describe)
    ui = reading_command(sub, "ui", cmd_ui, "open the read-only status page in a browser (signs it in)")
    ui.add_argument("--no-open", action="store_true", help="print the sign-in link instead of opening it")
    for name in ("status", "get", "describe", "ui"):
        sub.choices[name].add_argument("--master", help=master_help)
        sub.choices[name].add_argument(
            "-f", "--file", type=Path, help="a manifest: read the master it names, with its token"
        )


def reading_command(
    sub: argparse._SubParsersAction, name: str, run: Command, help: str
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.set_defaults(run=partial(with_master_hint, run))
    return p


def with_output(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text")
    return p


def with_master_hint(run: Command, args: argparse.Namespace) -> int:
    """``run(args)``; when no master was named and none answers at the default, say how to name one."""
    try:
        return run(args)
    except MasterUnreachable as e:
        if args.master or args.file or os.environ.get("GENMLX_MASTER"):
            raise
        raise MasterUnreachable(f"{e}\n  {NAME_THE_MASTER}") from None


def reading_master(args: argparse.Namespace) -> tuple[str, str]:
    """The master's URL and the token to send it."""
    if args.file is None:
        return master_url(args.master), read_token()
    from genmlx.manifest import load_manifest

    manifest = load_manifest(args.file)
    return master_url(args.master, manifest), manifest_token(manifest)


def cmd_status(args: argparse.Namespace) -> int:
    status = fetch_status(*reading_master(args))
    print_document(status.to_json(), args.output, lambda: format_status(status))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    items = getattr(fetch_status(*reading_master(args)), args.what)
    print_document([i.to_json() for i in items], args.output, lambda: format_items(args.what, items))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    url, token = reading_master(args)
    status = fetch_status(url, token)
    item = status.node(args.name) if args.what == "node" else status.model(args.name)
    if item is None:
        raise MasterError(f"no {args.what} named {args.name!r} in the applied manifest")
    events = fetch_events(url, token, args.what.capitalize(), args.name)
    described = {**item.to_json(), "events": [e.to_json() for e in events]}
    print_document(described, args.output, lambda: format_described(item, events))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import webbrowser

    url, token = reading_master(args)
    link, expires_in = ui_login_url(url, token)
    if not args.no_open and webbrowser.open(link):
        print(f"opened the status page of {url} in a browser", file=sys.stderr)
        return 0
    print(f"open this link in a browser within {expires_in} s (it works once):", file=sys.stderr)
    print(link)
    return 0
