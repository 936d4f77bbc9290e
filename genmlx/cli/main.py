"""The ``genmlx`` command: parses arguments and calls into the packages; nothing else."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from genmlx import __version__
from genmlx.cli.cache import add_cache_commands
from genmlx.cli.integrations import add_integrations_command
from genmlx.cli.join import add_join_commands
from genmlx.cli.keys import add_key_commands
from genmlx.cli.master_client import manifest_token, print_document, token_source
from genmlx.cli.read_commands import add_read_commands, with_output
from genmlx.cli.service.commands import add_service_commands
from genmlx.cli.tls import add_tls_commands
from genmlx.core.errors import GenMLXError, ManifestError
from genmlx.core.home import ensure_token, read_token

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
LOG_FILE_BYTES = 10 * 1000 * 1000  # a log file is rotated at this size ...
LOG_FILES_KEPT = 5  # ... and this many rotated ones are kept (agent.log.1 ... agent.log.5)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_to(getattr(args, "log_file", None))
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


def log_to(path: Path | None) -> None:
    """Log to stderr, or (a service's master or agent) to ``path``, rotated by size."""
    if path is None:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        return
    from logging.handlers import RotatingFileHandler

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = RotatingFileHandler(path, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILES_KEPT)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


class UsageError(GenMLXError):
    """A command line that asks for something impossible."""


LOG_FILE_HELP = "log to PATH instead of stderr, rotated at 10 MB, 5 old files kept (what a service does)"
MASTER_HELP = "master URL (default: $GENMLX_MASTER, else the manifest's with -f, else http://127.0.0.1:6789)"
MANIFEST_MASTER_HELP = "master URL (default: from the manifest, or $GENMLX_MASTER)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genmlx", description="Declarative MLX serving for a desk full of Macs."
    )
    parser.add_argument("--version", action="version", version=f"genmlx {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    add_manifest_commands(sub)
    add_read_commands(sub, MASTER_HELP)
    add_integrations_command(sub, MASTER_HELP)
    add_key_commands(sub, MASTER_HELP)
    add_cache_commands(sub, MASTER_HELP)
    add_tls_commands(sub)
    add_process_commands(sub)
    add_service_commands(sub)
    add_join_commands(sub, MASTER_HELP)
    add_local_commands(sub)
    return parser


def command(sub: argparse._SubParsersAction, name: str, run, help: str) -> argparse.ArgumentParser:
    """A subcommand whose ``run`` gets the parsed arguments."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(run=run)
    return p


def add_manifest_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that read a manifest file: validate, apply, diff, mesh plan, mesh apply."""
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

    p = sub.add_parser("mesh", help="how the nodes and ranks are wired (Thunderbolt, ring, jaccl); set it up")
    mesh = p.add_subparsers(required=True, metavar="ACTION")
    p = command(mesh, "plan", cmd_mesh_plan, "print the Thunderbolt address plan, backends and hostfiles")
    with_output(p).add_argument("-f", "--file", type=Path, required=True)
    p.add_argument("--master", help=f"{MANIFEST_MASTER_HELP}; node facts come from it")
    p.add_argument("--verify", action="store_true", help="have the master check every cabled link first")

    p = command(mesh, "apply", cmd_mesh_apply, "give this Mac's Thunderbolt ports their planned addresses")
    p.add_argument("-f", "--file", type=Path, required=True)
    p.add_argument("--node", help="the node this Mac is (default: the one whose agent reports its host name)")
    p.add_argument("--yes", action="store_true", help="make the changes without asking")
    p.add_argument("--dry-run", action="store_true", help="only show the networksetup commands")
    p.add_argument("--master", help=f"{MANIFEST_MASTER_HELP}; node facts come from it")


def add_process_commands(sub: argparse._SubParsersAction) -> None:
    """The long-running processes: master and agent."""
    p = command(sub, "master", cmd_master, "run the master (reconcile loop, status API, OpenAI router)")
    p.add_argument("-f", "--file", type=Path, help="manifest to apply at start (default: the last applied)")
    p.add_argument("--watch", action="store_true", help="re-apply the manifest file whenever it changes")
    p.add_argument("--port", type=int, help="listen port (default: spec.master.port, 6789)")
    p.add_argument("--host", default="0.0.0.0", help="listen address (default: 0.0.0.0)")
    p.add_argument("--no-discovery", action="store_true", help="find agents only by nodes[].address")
    p.add_argument("--log-file", type=Path, metavar="PATH", help=LOG_FILE_HELP)

    p = command(sub, "agent", cmd_agent, "run this node's agent")
    p.add_argument("--name", required=True, help="the node's name in cluster.yaml")
    p.add_argument(
        "--storage", action="append", required=True, metavar="PATH", help="a storage path (repeatable)"
    )
    p.add_argument("--port", type=int, default=6790)
    p.add_argument("--host", default="0.0.0.0", help="listen address, also used by its dispatchers")
    p.add_argument("--no-discovery", action="store_true", help="do not announce the agent with zeroconf")
    p.add_argument("--log-file", type=Path, metavar="PATH", help=LOG_FILE_HELP)


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
    p.add_argument(
        "--scripted",
        metavar="TEXT",
        help="instead, a model that answers any prompt with TEXT at temperature 0 (tool calls, thinking)",
    )
    p.add_argument(
        "--after-tool",
        metavar="TEXT",
        help="with --scripted: answer with this TEXT instead once the conversation holds a tool result",
    )

    p = command(
        sub, "token", cmd_token, "create the cluster token if absent and print where it is; or rotate it"
    )
    p.add_argument(
        "action", nargs="?", choices=("rotate",), help="rotate: replace it, the old one kept for --grace"
    )
    p.add_argument("--show", action="store_true", help="print the token itself (to copy to a node or client)")
    p.add_argument(
        "--grace", default="1h", metavar="TIME", help="rotate: how long the old token still counts"
    )
    p.add_argument(
        "--manual", action="store_true", help="rotate: you copy the file to the nodes; nothing is pushed"
    )
    p.add_argument("-f", "--file", type=Path, help="a manifest: the token file its auth.tokenFile names")


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


def cmd_mesh_plan(args: argparse.Namespace) -> int:
    """Exit 1 when the manifest is invalid or the mesh cannot be planned as it asks."""
    from genmlx.cli.master_client import master_url
    from genmlx.cli.mesh_report import format_mesh_plan, has_errors, master_status, mesh_document, mesh_nodes
    from genmlx.manifest import load_manifest

    manifest = load_manifest(args.file)
    status, source = master_status(master_url(args.master, manifest), manifest, args.verify)
    document = mesh_document(manifest, mesh_nodes(manifest, status), source, status)
    print_document(document, args.output, lambda: format_mesh_plan(document))
    return 1 if has_errors(document) else 0


def cmd_mesh_apply(args: argparse.Namespace) -> int:
    """Exit 1 when a link end of this Mac is left unconfigured or a command fails (README, "Mesh")."""
    from genmlx.cli.mesh_apply import MeshApplyRequest, run_mesh_apply

    return run_mesh_apply(MeshApplyRequest(args.file, args.node, args.yes, args.dry_run, args.master))


def cmd_master(args: argparse.Namespace) -> int:
    from genmlx.core.home import genmlx_home
    from genmlx.manifest import load_manifest
    from genmlx.master.run import MasterConfig, run_master

    if args.watch and args.file is None:
        raise UsageError("--watch needs -f FILE: the manifest file to watch")
    config = MasterConfig(
        token_source(load_manifest(args.file) if args.file else None),
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
        token=token_source(None),
        discovery=not args.no_discovery,
    )
    run_agent(config)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from genmlx.cli.local_cluster import run_up
    from genmlx.manifest import load_manifest

    run_up(args.file, token_source(load_manifest(args.file)), args.host)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from genmlx.cli.local_cluster import run_demo

    run_demo(token_source(None), args.port, args.agent_port)
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    if args.after_tool is not None and args.scripted is None:
        raise UsageError("--after-tool needs --scripted")
    if args.scripted is not None:
        return write_scripted_demo_model(args.dir, args.scripted, args.seed, args.after_tool)
    from genmlx.demo.random_model import write_demo_model

    path = write_demo_model(args.dir, seed=args.seed)
    print(f"wrote a tiny random-weight llama to {path}")
    print("its weights are random: what it writes is noise, but every serving code path is real")
    return 0


def write_scripted_demo_model(path: Path, text: str, seed: int, after_tool: str | None = None) -> int:
    from genmlx.demo.scripted_model import write_scripted_model

    try:
        written = write_scripted_model(path, text, after_tool=after_tool, seed=seed)
    except ValueError as e:  # a text the model cannot write: nothing was written
        raise UsageError(f"--scripted: cannot write a model for this text: {e}") from None
    print(f"wrote a tiny scripted llama to {written}")
    print("at temperature 0 it answers any prompt with the text given")
    if after_tool is not None:
        print("and, once the conversation holds a tool result, with the --after-tool text")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from genmlx.cli.master_client import token_path
    from genmlx.manifest import load_manifest

    if args.action == "rotate":
        from genmlx.cli.rotate import rotate_token

        return rotate_token(
            token_path(load_manifest(args.file) if args.file else None), args.grace, args.manual
        )
    path, created = ensure_token()
    print(f"{'created' if created else 'using'} the cluster token at {path}", file=sys.stderr)
    if args.show:
        print(read_token(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
