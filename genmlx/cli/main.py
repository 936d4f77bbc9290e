"""The ``genmlx`` command: parses arguments and calls into the packages; nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from genmlx import __version__
from genmlx.core.errors import GenMLXError, ManifestError
from genmlx.core.home import ensure_token, read_token


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    try:
        return args.run(args) or 0
    except ManifestError as e:
        print(e, file=sys.stderr)
        return 1
    except GenMLXError as e:
        print(f"genmlx: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


class UsageError(GenMLXError):
    """A command line that asks for something impossible."""


MASTER_HELP = "master URL (default: $GENMLX_MASTER or http://127.0.0.1:6789)"
MANIFEST_MASTER_HELP = "master URL (default: from the manifest, or $GENMLX_MASTER)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genmlx", description="Declarative MLX serving for a desk full of Macs."
    )
    parser.add_argument("--version", action="version", version=f"genmlx {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    add_manifest_commands(sub)
    add_read_commands(sub)
    add_process_commands(sub)
    add_local_commands(sub)
    return parser


def command(sub: argparse._SubParsersAction, name: str, run, help: str) -> argparse.ArgumentParser:
    """A subcommand whose ``run`` gets the parsed arguments."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(run=run)
    return p


def with_output(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text")
    return p


def add_manifest_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that read a manifest file: validate, apply, diff, mesh plan."""
    p = command(sub, "validate", cmd_validate, "check a manifest and print every error")
    p.add_argument("-f", "--file", type=Path, required=True)

    p = command(sub, "apply", cmd_apply, "send a manifest to the running master")
    p.add_argument("-f", "--file", type=Path, required=True)
    p.add_argument("--master", help=MANIFEST_MASTER_HELP)
    p.add_argument("--wait", action="store_true", help="follow progress until every model is Ready")
    p.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up after S seconds")

    p = command(sub, "diff", cmd_diff, "show what the master would do for a manifest (exit 1 if anything)")
    p.add_argument("-f", "--file", type=Path, required=True)
    p.add_argument("--master", help=MANIFEST_MASTER_HELP)

    p = sub.add_parser("mesh", help="plan how the nodes and ranks are wired (Thunderbolt, ring, jaccl)")
    mesh = p.add_subparsers(required=True, metavar="ACTION")
    p = command(mesh, "plan", cmd_mesh_plan, "print the Thunderbolt address plan, backends and hostfiles")
    with_output(p).add_argument("-f", "--file", type=Path, required=True)
    p.add_argument("--master", help=f"{MANIFEST_MASTER_HELP}; node facts come from it")


def add_read_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that read the running master: status, get, describe, ui."""
    with_output(command(sub, "status", cmd_status, "print the cluster's status from the running master"))
    p = command(sub, "get", cmd_get, "list nodes or models with their Ready condition")
    p.add_argument("what", choices=("nodes", "models"))
    with_output(p)
    p = command(sub, "describe", cmd_describe, "everything about one node or model, with its recent events")
    p.add_argument("what", choices=("node", "model"))
    p.add_argument("name")
    with_output(p)
    p = command(sub, "ui", cmd_ui, "open the read-only status page in a browser (signs it in)")
    p.add_argument("--no-open", action="store_true", help="print the sign-in link instead of opening it")
    for name in ("status", "get", "describe", "ui"):
        sub.choices[name].add_argument("--master", help=MASTER_HELP)


def add_process_commands(sub: argparse._SubParsersAction) -> None:
    """The long-running processes: master and agent."""
    p = command(sub, "master", cmd_master, "run the master (reconcile loop, status API, OpenAI router)")
    p.add_argument("-f", "--file", type=Path, help="manifest to apply at start (default: the last applied)")
    p.add_argument("--watch", action="store_true", help="re-apply the manifest file whenever it changes")
    p.add_argument("--port", type=int, help="listen port (default: spec.master.port, 6789)")
    p.add_argument("--host", default="0.0.0.0", help="listen address (default: 0.0.0.0)")
    p.add_argument("--no-discovery", action="store_true", help="find agents only by nodes[].address")

    p = command(sub, "agent", cmd_agent, "run this node's agent")
    p.add_argument("--name", required=True, help="the node's name in cluster.yaml")
    p.add_argument(
        "--storage", action="append", required=True, metavar="PATH", help="a storage path (repeatable)"
    )
    p.add_argument("--port", type=int, default=6790)
    p.add_argument("--host", default="0.0.0.0", help="listen address, also used by its dispatchers")
    p.add_argument("--no-discovery", action="store_true", help="do not announce the agent with zeroconf")


def add_local_commands(sub: argparse._SubParsersAction) -> None:
    """One-machine conveniences: up, demo, demo-model, token."""
    p = command(sub, "up", cmd_up, "run the master and this node's agent for a one-node cluster")
    p.add_argument("-f", "--file", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1, this machine)")

    p = command(sub, "demo", cmd_demo, "write the demo model and serve it on a one-node cluster")
    p.add_argument("--port", type=int, default=6789, help="the master's port (default 6789)")
    p.add_argument("--agent-port", type=int, default=6790, help="the agent's port (default 6790)")

    p = command(sub, "demo-model", cmd_demo_model, "write a tiny random-weight model (its output is noise)")
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=0)

    p = command(sub, "token", cmd_token, "create the cluster token if absent and print where it is")
    p.add_argument("--show", action="store_true", help="print the token itself (to copy to a node or client)")


def cmd_validate(args: argparse.Namespace) -> int:
    from genmlx.manifest import load_manifest

    load_manifest(args.file)
    print("ok")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from genmlx.cli.master_client import MasterError, apply_manifest, master_url
    from genmlx.manifest import load_manifest
    from genmlx.manifest.revision import file_revision

    if args.timeout is not None and not args.wait:
        raise UsageError("--timeout goes with --wait: how long to follow the rollout")
    manifest = load_manifest(args.file)  # every error, and nothing sent, when it is invalid
    url, token = master_url(args.master, manifest), manifest_token(manifest)
    revision = file_revision(args.file)
    try:
        result = apply_manifest(
            url,
            token,
            args.file,
            args.file.read_text(),
            revision.to_json() if revision else None,
        )
    except MasterError as e:
        for issue in e.document.get("issues", []):
            print(issue, file=sys.stderr)
        raise
    state = "configured" if result["changed"] else "unchanged"
    at = f", {revision}" if revision else ""
    print(f"cluster {manifest.name} {state} (generation {result['generation']}{at})")
    print_plan(result)
    if args.wait:
        from genmlx.cli.apply_wait import wait_for_apply

        sys.stdout.flush()
        return wait_for_apply(url, token, result["generation"], args.timeout)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """kubectl's convention: 0 when nothing would change, 1 when something would, 2 on error."""
    from genmlx.cli.master_client import apply_manifest, master_url
    from genmlx.manifest import load_manifest

    try:
        manifest = load_manifest(args.file)
    except ManifestError as e:
        print(e, file=sys.stderr)
        return 2
    url = master_url(args.master, manifest)
    result = apply_manifest(
        url, manifest_token(manifest), args.file, args.file.read_text(), None, dry_run=True
    )
    if result["changed"] and result.get("plan") == []:
        print(f"~ manifest {manifest.name}: changes nothing the cluster runs")
    print_plan(result)
    return 1 if result["changed"] or result.get("plan") else 0


def print_plan(result: dict) -> None:
    plan = result.get("plan")
    for line in plan or []:
        print(f"  {line}")
    if plan == []:
        print("  nothing to do: the cluster matches the manifest")
    print(result.get("summary", ""))


def cmd_status(args: argparse.Namespace) -> int:
    from genmlx.cli.master_client import fetch_status, format_status, master_url

    status = fetch_status(master_url(args.master), read_token())
    print_document(status.to_json(), args.output, lambda: format_status(status))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import webbrowser

    from genmlx.cli.master_client import master_url, ui_login_url

    url = master_url(args.master)
    link, expires_in = ui_login_url(url, read_token())
    if not args.no_open and webbrowser.open(link):
        print(f"opened the status page of {url} in a browser", file=sys.stderr)
        return 0
    print(f"open this link in a browser within {expires_in} s (it works once):", file=sys.stderr)
    print(link)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from genmlx.cli.master_client import fetch_status, format_items, master_url

    items = getattr(fetch_status(master_url(args.master), read_token()), args.what)
    print_document([i.to_json() for i in items], args.output, lambda: format_items(args.what, items))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from genmlx.cli.master_client import MasterError, fetch_events, fetch_status, format_described, master_url

    url, token = master_url(args.master), read_token()
    status = fetch_status(url, token)
    item = status.node(args.name) if args.what == "node" else status.model(args.name)
    if item is None:
        raise MasterError(f"no {args.what} named {args.name!r} in the applied manifest")
    events = fetch_events(url, token, args.what.capitalize(), args.name)
    described = {**item.to_json(), "events": [e.to_json() for e in events]}
    print_document(described, args.output, lambda: format_described(item, events))
    return 0


def cmd_mesh_plan(args: argparse.Namespace) -> int:
    """Exit 1 when the manifest is invalid or the mesh cannot be planned as it asks."""
    from genmlx.cli.master_client import master_url
    from genmlx.cli.mesh_report import format_mesh_plan, has_errors, master_status, mesh_document, mesh_nodes
    from genmlx.manifest import load_manifest

    manifest = load_manifest(args.file)
    status, source = master_status(master_url(args.master, manifest), manifest)
    document = mesh_document(manifest, mesh_nodes(manifest, status), source, status)
    print_document(document, args.output, lambda: format_mesh_plan(document))
    return 1 if has_errors(document) else 0


def print_document(document, output: str, as_text) -> None:
    if output == "json":
        print(json.dumps(document, indent=2))
    elif output == "yaml":
        print(yaml.safe_dump(document, sort_keys=False), end="")
    else:
        print(as_text())


def cmd_master(args: argparse.Namespace) -> int:
    from genmlx.core.home import genmlx_home
    from genmlx.manifest import load_manifest
    from genmlx.master.run import MasterConfig, run_master

    if args.watch and args.file is None:
        raise UsageError("--watch needs -f FILE: the manifest file to watch")
    token = manifest_token(load_manifest(args.file)) if args.file else ensured_token()
    config = MasterConfig(
        token,
        genmlx_home() / "master",
        args.file,
        port=args.port,
        host=args.host,
        discovery=not args.no_discovery,
        watch=args.watch,
    )
    run_master(config)
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from genmlx.agent.run import AgentConfig, run_agent

    config = AgentConfig(
        name=args.name,
        storage=tuple(args.storage),
        port=args.port,
        host=args.host,
        token=ensured_token(),
        discovery=not args.no_discovery,
    )
    run_agent(config)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from genmlx.cli.local_cluster import run_up
    from genmlx.manifest import load_manifest

    run_up(args.file, manifest_token(load_manifest(args.file)), args.host)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from genmlx.cli.local_cluster import run_demo

    run_demo(ensured_token(), args.port, args.agent_port)
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from genmlx.demo.random_model import write_demo_model

    path = write_demo_model(args.dir, seed=args.seed)
    print(f"wrote a tiny random-weight llama to {path}")
    print("its weights are random: what it writes is noise, but every serving code path is real")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    path, created = ensure_token()
    print(f"{'created' if created else 'using'} the cluster token at {path}", file=sys.stderr)
    if args.show:
        print(read_token(path))
    return 0


def ensured_token() -> str:
    path, created = ensure_token()
    if created:
        logging.getLogger("genmlx").info("created a new cluster token at %s; copy it to every node", path)
    return read_token(path)


def manifest_token(manifest) -> str:
    """The token the manifest's ``auth.tokenFile`` names, else ``$GENMLX_HOME/token``."""
    if manifest.auth.token_file is None:
        return ensured_token()
    return read_token(Path(manifest.auth.token_file).expanduser())


if __name__ == "__main__":
    sys.exit(main())
