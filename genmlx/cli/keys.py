"""``genmlx key create`` and ``genmlx key list``: client keys, kept in git by their hash.

A key is made here and printed once, with the manifest entry to commit (name, SHA-256, scope,
expiry, rate); the cluster takes it at the next apply, and removing the entry revokes it. ``list``
asks the running master, which knows the applied keys and what each did.
"""

from __future__ import annotations

import argparse
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from genmlx.cli.master_client import call_master, print_document, table
from genmlx.cli.read_commands import reading_command, reading_master, with_output
from genmlx.core.errors import GenMLXError
from genmlx.core.home import client_key_digest, new_client_key
from genmlx.manifest.build import parse_expiry
from genmlx.manifest.types import NAME

DURATION = re.compile(r"^(\d+)([hdw])$")
DURATION_SECONDS = {"h": 3600, "d": 86400, "w": 7 * 86400}


class KeyUsageError(GenMLXError):
    """A ``genmlx key`` command line that cannot make a valid key."""


def add_key_commands(sub: argparse._SubParsersAction, master_help: str) -> None:
    p = sub.add_parser("key", help="client API keys: make one, list them with their use")
    actions = p.add_subparsers(required=True, metavar="ACTION")
    create = actions.add_parser("create", help="make a key: print it once, with the manifest entry to commit")
    create.set_defaults(run=cmd_key_create)
    create.add_argument("name", help="what the key is for (a person, a laptop, an app)")
    create.add_argument("--models", help="comma-separated models it reaches (default: every model)")
    create.add_argument("--expires", metavar="WHEN", help="30d, 12h, 2w, a date (2027-01-31) or a date-time")
    create.add_argument("--requests-per-minute", type=int, metavar="N", help="answer 429 past N a minute")
    create.add_argument(
        "--metrics",
        action="store_true",
        help="it may also read the master's /metrics (a Prometheus server's key; with --models '' no model)",
    )
    create.add_argument(
        "-f", "--file", type=Path, help="a manifest: check the name is free and the models exist"
    )
    listing = reading_command(actions, "list", cmd_key_list, "the applied keys: scope, expiry and last use")
    with_output(listing)
    listing.add_argument("--master", help=master_help)
    listing.add_argument(
        "-f", "--file", type=Path, help="a manifest: read the master it names, with its token"
    )


def cmd_key_create(args: argparse.Namespace) -> int:
    entry = key_entry(args)
    if args.file is not None:
        check_against_manifest(entry, args.file)
    key = new_client_key()
    entry = {"name": entry["name"], "sha256": client_key_digest(key), **entry}
    print(f"API key {args.name} (shown once: give it to the client, never commit it):\n\n  {key}\n")
    print("Add this entry under spec.auth.apiKeys in cluster.yaml, commit, and `genmlx apply`:\n")
    print(indented(yaml.safe_dump([entry], sort_keys=False, default_flow_style=None), "    "))
    return 0


def key_entry(args: argparse.Namespace) -> dict:
    """The manifest entry of the key the arguments describe, less its digest."""
    if not NAME.match(args.name):
        raise KeyUsageError(f"{args.name!r}: a key's name is lowercase letters, digits, '-', '.', '_'")
    entry: dict = {"name": args.name}
    if args.models is not None and (args.models or args.metrics):  # '' with --metrics: no model
        entry["models"] = [model.strip() for model in args.models.split(",") if model.strip()]
    if args.expires:
        entry["expires"] = expiry_text(args.expires, time.time())
    if args.requests_per_minute is not None:
        if args.requests_per_minute < 1:
            raise KeyUsageError("--requests-per-minute must be at least 1")
        entry["requestsPerMinute"] = args.requests_per_minute
    if args.metrics:
        entry["metrics"] = True
    return entry


def expiry_text(when: str, now: float) -> str:
    """``30d`` (and ``h``, ``w``) from now, or a date or date-time as given, as the manifest says it."""
    duration = DURATION.match(when)
    if duration:
        moment = now + int(duration[1]) * DURATION_SECONDS[duration[2]]
        return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    try:
        parse_expiry(when)
    except ValueError:
        raise KeyUsageError(
            f"--expires {when!r}: give 30d, 12h, 2w, a date or an RFC 3339 date-time"
        ) from None
    return when


def check_against_manifest(entry: dict, path: Path) -> None:
    from genmlx.manifest import load_manifest

    manifest = load_manifest(path)
    if any(key.name == entry["name"] for key in manifest.auth.api_keys):
        raise KeyUsageError(f"{path} already has a key named {entry['name']!r}: pick another name")
    declared = [model.name for model in manifest.models]
    unknown = [model for model in entry.get("models", []) if model not in declared]
    if unknown:
        raise KeyUsageError(f"{', '.join(unknown)}: not a model of {path} (models: {', '.join(declared)})")


def indented(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.rstrip().splitlines())


def cmd_key_list(args: argparse.Namespace) -> int:
    url, token = reading_master(args)
    keys = call_master(url, token, "GET", "/api/v1/keys")["keys"]
    print_document(keys, args.output, lambda: format_keys(keys))
    return 0


def format_keys(keys: list[dict]) -> str:
    if not keys:
        return "no client keys in the applied manifest (`genmlx key create NAME` makes one)"
    rows = [
        (
            key["name"],
            ",".join(key["models"]) if key["models"] is not None else "*",
            key["expires"] or "never",
            str(key["requestsPerMinute"] or "-"),
            "yes" if key.get("metrics") else "-",
            key["lastUsed"] or "never",
            str(key["requests"]),
            f"{key['promptTokens']}/{key['completionTokens']}",
        )
        for key in keys
    ]
    header = ("NAME", "MODELS", "EXPIRES", "PER MINUTE", "METRICS", "LAST USED", "REQUESTS", "TOKENS IN/OUT")
    return "\n".join(table(header, rows))
