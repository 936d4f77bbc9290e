"""`genmlx integrations [CLIENT]`: the configuration that points a client (Claude Code, Codex CLI,
opencode, Cline, Open WebUI) at this cluster, with the master's URL, its Ready models and the key.

The key is a client key given with ``--key`` (``genmlx key create`` makes one, scoped to models),
or the cluster token printed with ``--show-key``; otherwise the snippets read the token with
``$(genmlx token --show)``, so a terminal's scrollback, or a file pasted into, holds no token.
The text is ``genmlx.wire.integrations``'s, the same the status page shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genmlx.cli.master_client import call_master, print_document
from genmlx.cli.read_commands import reading_command, reading_master, with_output
from genmlx.wire.integrations import (
    CLIENTS,
    Target,
    format_client_list,
    format_integration,
    render_integration,
)


def add_integrations_command(sub: argparse._SubParsersAction, master_help: str) -> None:
    p = reading_command(
        sub, "integrations", cmd_integrations, "print how to point Claude Code, Codex, opencode, ... here"
    )
    p.add_argument("client", nargs="?", choices=CLIENTS, help="the client (none: list them)")
    p.add_argument("--model", metavar="NAME", help="the model the snippets use (default: the first Ready)")
    p.add_argument("--key", metavar="KEY", help="write this client key (genmlx key create) into them")
    p.add_argument("--show-key", action="store_true", help="write the cluster token itself into them")
    with_output(p)
    p.add_argument("--master", help=master_help)
    p.add_argument("-f", "--file", type=Path, help="a manifest: the master it names, with its token")


def fetch_ready_models(url: str, credential: str) -> tuple[str, ...]:
    """The models the master serves now to ``credential`` (``GET /v1/models`` lists only Ready ones,
    and to a client key only those it reaches)."""
    return tuple(m["id"] for m in call_master(url, credential, "GET", "/v1/models")["data"])


def cmd_integrations(args: argparse.Namespace) -> int:
    if args.client is None:
        print(format_client_list())
        return 0
    url, token = reading_master(args)
    key = args.key or (token if args.show_key else None)
    target = Target(url, fetch_ready_models(url, args.key or token), args.model, key)
    integration = render_integration(args.client, target)
    if not target.ready_models:
        print(f"genmlx: no model of {url} is Ready yet", file=sys.stderr)
    print_document(integration.to_json(), args.output, lambda: format_integration(integration))
    return 0
