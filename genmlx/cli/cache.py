"""``genmlx cache clear MODEL``: empty a model's prompt cache on the disks of its nodes, through the
master (which asks each node's agent); the cluster token is required."""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import quote

from genmlx.cli.master_client import call_master, print_document, table
from genmlx.cli.read_commands import reading_command, reading_master, with_output


def add_cache_commands(sub: argparse._SubParsersAction, master_help: str) -> None:
    p = sub.add_parser("cache", help="a model's prompt cache on its nodes' disks")
    actions = p.add_subparsers(required=True, metavar="ACTION")
    clear = reading_command(actions, "clear", cmd_cache_clear, "empty a model's prompt cache on every node")
    with_output(clear)
    clear.add_argument("model", help="the model's name in the manifest")
    clear.add_argument("--master", help=master_help)
    clear.add_argument("-f", "--file", type=Path, help="a manifest: read the master it names, with its token")


def cmd_cache_clear(args: argparse.Namespace) -> int:
    """Exit 1 when a node could not be asked."""
    url, token = reading_master(args)
    answer = call_master(url, token, "DELETE", f"/api/v1/models/{quote(args.model, safe='')}/prompt-cache")
    print_document(answer, args.output, lambda: format_cleared(answer))
    return 1 if any("error" in node for node in answer["nodes"]) else 0


def format_cleared(answer: dict) -> str:
    rows = [
        (node["node"], node["error"])
        if "error" in node
        else (node["node"], f"freed {node['bytes']} bytes in {node['blocks']} blocks")
        for node in answer["nodes"]
    ]
    return "\n".join([f"prompt cache of {answer['model']}:", *table(("NODE", "RESULT"), rows)])
