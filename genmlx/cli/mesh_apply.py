"""`genmlx mesh apply`: give this Mac's Thunderbolt ports the addresses `mesh plan` plans for them,
through networksetup, so they last across restarts.

GenMLX has no SSH, so each Mac runs this for itself. Its node is ``--node``, else the declared node
whose agent reports this machine's host name to the master, else the one named like this machine.
Its link ends come from the mesh planner (``plan_links``) over the master's node facts, exactly as
`mesh plan` prints them; what to change is ``networksetup.plan_port_setup``'s to say. The commands
are shown first and asked about on a terminal (``--yes`` skips the question, ``--dry-run`` stops
there), run one by one (behind ``sudo`` where not root), stopped at the first failure, and the
services are read again afterwards to confirm nothing is left to do.
"""

from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from genmlx.agent.facts.platform import CommandRunner, PlatformCommandFailed
from genmlx.cli.master_client import master_url
from genmlx.cli.mesh_report import master_status, mesh_nodes
from genmlx.cli.networksetup import (
    STATE_LABELS,
    Change,
    PortPlan,
    SetupPlan,
    ends_of,
    networksetup_executable,
    non_thunderbolt_targets,
    plan_port_setup,
    read_mac_network,
    run_networksetup,
)
from genmlx.core.errors import PermanentError
from genmlx.manifest import load_manifest
from genmlx.manifest.types import Manifest
from genmlx.master.planning.mesh import MeshPlanError, plan_links
from genmlx.wire.status import ClusterStatus


class MeshApplyRefused(PermanentError):
    """`mesh apply` cannot go on as asked: not macOS, no node to configure, or no one to ask."""


@dataclass(frozen=True)
class MeshApplyRequest:
    """The command line of `genmlx mesh apply`."""

    manifest_file: Path
    node: str | None = None
    yes: bool = False
    dry_run: bool = False
    master: str | None = None


# ----------------------------------------------------------------------------------------------
# Which node this Mac is


def choose_node(manifest: Manifest, status: ClusterStatus | None, wanted: str | None, hostname: str) -> str:
    """``wanted``, else the declared node whose agent reports ``hostname`` in its facts, else the
    one named like it (``studio-a`` on ``studio-a.local``). An agent is whatever node its ``--name``
    says, so the host name it reports is what ties a node to a machine."""
    names = [n.name for n in manifest.nodes]
    if wanted is not None:
        if wanted not in names:
            raise MeshApplyRefused(
                f"--node {wanted}: the manifest declares no such node ({', '.join(names)})"
            )
        return wanted
    short = short_host(hostname)
    seen = status.nodes if status else ()
    reporting = [
        n.name for n in seen if n.name in names and n.facts and short_host(n.facts.hostname) == short
    ]
    candidates = reporting or [name for name in names if name.lower() == short]
    if len(candidates) == 1:
        return candidates[0]
    why = (
        f"nodes {', '.join(candidates)} all report this machine's host name {hostname!r}"
        if candidates
        else f"no declared node reports this machine's host name {hostname!r} or is named {short!r}"
    )
    raise MeshApplyRefused(f"{why}: pass --node NAME ({', '.join(names)})")


def short_host(hostname: str) -> str:
    return hostname.split(".")[0].lower()


# ----------------------------------------------------------------------------------------------
# Showing


def change_argv(change: Change, executable: str, as_root: bool) -> list[str]:
    """The command line of ``change``: behind sudo where not root, as the README's commands are."""
    return [executable, *change.args] if as_root else ["sudo", executable, *change.args]


def format_setup(plan: SetupPlan, facts_detail: str, executable: str, as_root: bool) -> str:
    """Each link end of the node and what becomes of it, then the commands, each with its reason."""
    lines = [f"{plan.node}: Thunderbolt addresses (node facts: {facts_detail})"]
    lines += [f"  {o.end.describe()}: {STATE_LABELS[o.state]}: {o.detail}" for o in plan.ends]
    if not plan.ends:
        lines.append(f"  no Thunderbolt links are planned for {plan.node}")
    if plan.changes:
        lines += ["", f"{len(plan.changes)} changes (networksetup{'' if as_root else ', with sudo'}):"]
        lines += [f"  {shlex.join(change_argv(c, executable, as_root))}   # {c.why}" for c in plan.changes]
    elif not plan.left_alone:
        lines += ["", f"nothing needs changing: {plan.node}'s Thunderbolt ports have their planned addresses"]
    return "\n".join(lines)


def left_alone_note(plan: SetupPlan) -> str:
    count = len(plan.left_alone)
    return f"{count} of {plan.node}'s {len(plan.ends)} Thunderbolt links left unconfigured: see above"


# ----------------------------------------------------------------------------------------------
# Running


def run_mesh_apply(request: MeshApplyRequest) -> int:
    """The command: 0 when every link end of this node has (or, dry, would get) its address, 1
    when one is left alone, a command fails, the question is declined or cannot be asked."""
    try:
        return mesh_apply(request)
    except MeshApplyRefused as e:
        print(f"genmlx mesh apply: {e}", file=sys.stderr)
        return 1


def mesh_apply(request: MeshApplyRequest) -> int:
    executable = networksetup_executable()
    if executable is None:
        raise MeshApplyRefused(
            "mesh apply configures macOS Thunderbolt services (networksetup); "
            f"this machine is {platform.system()}"
        )
    manifest = load_manifest(request.manifest_file)
    status, source = master_status(master_url(request.master, manifest), manifest)
    node = choose_node(manifest, status, request.node, socket.gethostname())
    ends = planned_ends(manifest, status, node)
    network = read_mac_network(run_networksetup, executable)
    plan, as_root = plan_port_setup(node, ends, network), os.geteuid() == 0
    print(format_setup(plan, source.detail, executable, as_root), flush=True)
    stray = non_thunderbolt_targets(plan.changes, network)
    if stray:
        raise MeshApplyRefused(
            f"nothing was changed: the plan names services that are not Thunderbolt: {stray}"
        )
    if plan.changes and request.dry_run:
        print("--dry-run: nothing was changed")
    elif plan.changes:
        if not confirmed(len(plan.changes), request.yes):
            print("nothing was changed")
            return 1
        if not apply_changes(plan.changes, executable, as_root, run_networksetup):
            return 1
        if not confirm_applied(node, ends, executable):
            return 1
    if plan.left_alone:
        print(left_alone_note(plan), file=sys.stderr)
    return 1 if plan.left_alone else 0


def planned_ends(manifest: Manifest, status: ClusterStatus | None, node: str) -> tuple[PortPlan, ...]:
    """``node``'s link ends, planned as `mesh plan` plans them."""
    nodes = mesh_nodes(manifest, status)
    try:
        plan = plan_links([nodes[n.name] for n in manifest.nodes], manifest.mesh.topology)
    except MeshPlanError as e:
        raise MeshApplyRefused(str(e)) from None
    return ends_of(plan, node)


def confirmed(count: int, yes: bool) -> bool:
    """``--yes``, or the answer on a terminal; without one there is no one to ask."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise MeshApplyRefused(
            f"no terminal to ask on: pass --yes to make these {count} changes (--dry-run only shows them)"
        )
    try:
        answer = input(f"Apply these {count} changes? [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def apply_changes(changes: Sequence[Change], executable: str, as_root: bool, run: CommandRunner) -> bool:
    """Run ``changes`` in order; at the first failure, say what it said, what was done and what
    was not, and stop: a later command may depend on it (a service created, then addressed)."""
    # One password prompt up front, on the terminal; each command then reuses the credential.
    if not as_root and subprocess.run(["sudo", "-v"], check=False).returncode != 0:
        raise MeshApplyRefused("sudo refused: nothing was changed")
    for done, change in enumerate(changes):
        try:
            run(change_argv(change, executable, as_root))
        except PlatformCommandFailed as e:
            not_run = [shlex.join(change_argv(c, executable, as_root)) for c in changes[done + 1 :]]
            report = [f"failed: {e}", f"{done} of the {len(changes)} changes made before it; not run:"]
            print(*report, *(f"  {line}" for line in not_run or ["nothing"]), sep="\n", file=sys.stderr)
            return False
        print(f"done: {shlex.join(change_argv(change, executable, as_root))}", flush=True)
    return True


def confirm_applied(node: str, ends: Sequence[PortPlan], executable: str) -> bool:
    """Read the services again: networksetup may accept a command and change nothing."""
    again = plan_port_setup(node, ends, read_mac_network(run_networksetup, executable))
    if again.changes:
        unmet = "\n  ".join(f"{' '.join(c.args)}   # {c.why}" for c in again.changes)
        print(f"every command succeeded, but these are still not as planned:\n  {unmet}", file=sys.stderr)
        return False
    print(f"{node}: every change is in place (read back from networksetup)")
    return True
