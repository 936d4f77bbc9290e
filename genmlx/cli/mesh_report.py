"""`genmlx mesh plan`: the mesh planner's answer for a manifest, as a document and as text.

Node facts come from the master's status document when a master answers; otherwise the plan is
made from the manifest alone (agent addresses where declared, ``<node>.local`` where not) and says
so. Ports are the master's own: ``groups.assign_rank_ports`` over what the status shows (running
ranks keep theirs), or over no agents at all when no master answers (the ports a fresh cluster
would get). Planning itself is
``genmlx.master.planning.mesh``; this module only gathers its inputs and prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genmlx.cli.master_client import MasterError, call_master, fetch_status
from genmlx.core.errors import AuthError
from genmlx.core.home import default_token_path, read_token
from genmlx.manifest.types import Manifest, ModelSpec, Node
from genmlx.master.planning.backends import (
    UNAVAILABLE_REASONS,
    LinksDown,
    ModelMesh,
    plan_model_mesh,
)
from genmlx.master.planning.groups import RankPorts, assign_rank_ports
from genmlx.master.planning.link_status import links_down
from genmlx.master.planning.mesh import LINK_PREFIX, MESH_BLOCK, Link, MeshNode, MeshPlanError, plan_links
from genmlx.master.planning.observed import Observed, ObservedNode
from genmlx.wire.agent_state import AgentState
from genmlx.wire.status import ClusterStatus, LinkStatus, NodeStatus

VERIFY_TIMEOUT_S = 120.0  # every link's check runs at once; each is bounded by its probe


@dataclass(frozen=True)
class FactsSource:
    """Where the node facts of a plan came from, in words for the reader."""

    from_master: bool
    detail: str  # "the master at http://...", or why no master could be asked


def master_status(
    url: str, manifest: Manifest, verify: bool = False
) -> tuple[ClusterStatus | None, FactsSource]:
    """The status document of the master at ``url``, or None and why: the plan works without it.
    Reads the token the manifest names without creating one."""
    token_file = manifest.auth.token_file
    token_path = Path(token_file).expanduser() if token_file else default_token_path()
    try:
        token = read_token(token_path)
        if verify:  # the master checks every cabled link from both ends, then answers
            call_master(url, token, "POST", "/api/v1/links/verify", timeout=VERIFY_TIMEOUT_S)
        status = fetch_status(url, token, timeout=10)
    except (MasterError, AuthError) as e:
        return None, FactsSource(False, f"unavailable: {e}")
    return status, FactsSource(True, f"from the master at {url}")


def observed_from_status(manifest: Manifest, status: ClusterStatus | None) -> Observed:
    """What the master observed of each declared node, rebuilt from its status document (None: no
    master answered, so no agent is known)."""
    seen = {n.name: n for n in status.nodes} if status else {}
    return Observed(now=0.0, nodes={n.name: observed_node(n, seen.get(n.name)) for n in manifest.nodes})


def observed_node(node: Node, seen: NodeStatus | None) -> ObservedNode:
    """A node as the master's status shows it (its ``node_document``): ready with the state its
    agent reported, else unreachable, at the address the master used or the declared one."""
    address = (seen.address if seen else None) or node.address or ""
    if seen is None or seen.facts is None:
        why = "the master did not reach its agent" if seen else "not in the master's status"
        return ObservedNode(node.name, address, "unreachable", why)
    # The version is not in the status document, and nothing here reads it.
    state = AgentState(node.name, "", seen.facts, storage=seen.storage, ranks=seen.ranks)
    return ObservedNode(node.name, address, "ready", "", state)


def mesh_nodes(manifest: Manifest, status: ClusterStatus | None) -> dict[str, MeshNode]:
    """Every declared node as the planner sees it: the address and facts the master observed, else
    the declared address (or the zeroconf name ``<node>.local``) and no facts."""
    return {
        name: MeshNode(
            name, node.host if node.address else f"{name}.local", node.state.facts if node.state else None
        )
        for name, node in observed_from_status(manifest, status).nodes.items()
    }


def mesh_document(
    manifest: Manifest, nodes: dict[str, MeshNode], source: FactsSource, status: ClusterStatus | None = None
) -> dict[str, Any]:
    """The whole plan as plain JSON: the Thunderbolt links, then each multi-node model's mesh (with
    the hostfile its running ranks were started with, where the master's ``status`` shows one)."""
    ports = assign_rank_ports(manifest, observed_from_status(manifest, status))
    down = links_down(status.links if status else ())  # as the master's planner reads them
    return {
        "cluster": manifest.name,
        "topology": manifest.mesh.topology,
        "backend": manifest.mesh.backend,
        "facts": {"fromMaster": source.from_master, "detail": source.detail},
        "factsMissing": [n.name for n in nodes.values() if n.facts is None],
        "addressesGuessed": [n.name for n in nodes.values() if n.agent_host == f"{n.name}.local"],
        "ports": ports_source(source),
        "thunderbolt": links_document(manifest, nodes, status),
        "models": [
            {
                **model_document(manifest, spec, nodes, ports[spec.name], down),
                "runningHostfile": running_hostfile(status, spec.name),
                "runningBackend": running_backend(status, spec.name),
                "fallback": backend_fallback(status, spec.name),
            }
            for spec in manifest.models
            if len(spec.nodes) > 1
        ],
    }


def ports_source(source: FactsSource) -> str:
    if source.from_master:
        return "as the master assigns them: running ranks keep theirs, new ones take the first free"
    return "as a fresh cluster would get them: no master answered, so no running ranks are known"


def links_document(
    manifest: Manifest, nodes: dict[str, MeshNode], status: ClusterStatus | None = None
) -> dict[str, Any]:
    document: dict[str, Any] = {"block": str(MESH_BLOCK), "prefixLength": LINK_PREFIX}
    try:
        plan = plan_links([nodes[n.name] for n in manifest.nodes], manifest.mesh.topology)
    except MeshPlanError as e:
        return {**document, "links": [], "error": str(e)}
    verified = {link.subnet: link for link in status.links} if status else {}
    return {
        **document,
        "links": [link_document(link, verified.get(link.subnet)) for link in plan.links],
        "error": None,
    }


def link_document(link: Link, verified: LinkStatus | None = None) -> dict[str, Any]:
    """A planned link, and what the master's last checks of it found where it shows them."""
    return {
        "subnet": link.subnet,
        "netmask": link.netmask,
        "cabled": link.cabled,
        "ends": [{"node": e.node, "address": e.address, "interface": e.interface} for e in link.ends],
        "verified": verified.to_json() if verified else None,
    }


def model_document(
    manifest: Manifest,
    spec: ModelSpec,
    nodes: dict[str, MeshNode],
    ports: RankPorts,
    down: LinksDown | None = None,
) -> dict[str, Any]:
    """One multi-node model's mesh; ``ports`` are its ranks' HTTP and ring ports, ``down`` the
    cables the master's last checks found down."""
    document: dict[str, Any] = {
        "name": spec.name,
        "nodes": list(spec.nodes),
        "httpPorts": list(ports.http),
        "ringPorts": list(ports.ring),
    }
    try:
        ranks = [nodes[n] for n in spec.nodes]
        mesh = plan_model_mesh(spec.name, manifest.mesh.backend, ranks, ports.ring, links_down=down)
    except MeshPlanError as e:
        unplanned = {"backend": None, "reason": None, "hostfile": None, "jaccl": None, "nccl": None}
        return {**document, **unplanned, "error": str(e)}
    return {**document, **mesh_fields(mesh)}


def mesh_fields(mesh: ModelMesh) -> dict[str, Any]:
    config = mesh.jaccl.config
    nccl = mesh.nccl
    return {
        "backend": mesh.choice.backend,
        "reason": mesh.choice.reason,
        # MLX_HOSTFILE's contents, as the agent writes it: one list of "ip:port" per rank.
        "hostfile": [[entry] for entry in mesh.hostfile],
        # jaccl as it is (or would be) wired: started where the backend above is jaccl or jaccl-ring.
        "jaccl": {
            "possible": mesh.jaccl.possible,
            "reason": mesh.jaccl.reason,
            "devices": json.loads(config.devices_json()) if config else None,
            "coordinator": config.coordinator if config else None,
        },
        "nccl": {"possible": nccl.possible, "reason": nccl.reason, "coordinator": nccl.coordinator},
        # mesh.backend: jaccl where the links do not allow it: the master holds the model back.
        "error": mesh.choice.reason if mesh.choice.backend is None else None,
    }


def running_backend(status: ClusterStatus | None, model: str) -> str | None:
    """The backend rank 0 of ``model`` was started on, where the master's status shows it."""
    found = status.model(model) if status else None
    rank0 = next((r for r in found.ranks if r.launch.rank == 0), None) if found else None
    return rank0.launch.backend if rank0 else None


def backend_fallback(status: ClusterStatus | None, model: str) -> str | None:
    """Why the master runs ``model`` on ring, or holds it back, after a failed start on a faster
    backend: its Degraded (or Stalled) condition where that is the reason."""
    found = status.model(model) if status else None
    for condition in found.conditions if found else ():
        if condition.status == "True" and condition.reason in UNAVAILABLE_REASONS.values():
            return f"{condition.type} ({condition.reason}): {condition.message}"
    return None


def running_hostfile(status: ClusterStatus | None, model: str) -> list[list[str]] | None:
    """The ring hostfile rank 0 of ``model`` runs with, as the master's status shows it; None
    where it runs no multi-rank group."""
    found = status.model(model) if status else None
    rank0 = next((r for r in found.ranks if r.launch.rank == 0), None) if found else None
    hostfile = rank0.launch.hostfile if rank0 else ()
    return [[entry] for entry in hostfile] if hostfile else None


def has_errors(document: dict[str, Any]) -> bool:
    return bool(document["thunderbolt"]["error"] or any(m["error"] for m in document["models"]))


# ----------------------------------------------------------------------------------------------
# Text


def format_mesh_plan(document: dict[str, Any]) -> str:
    """The plan for a terminal: where facts came from, the links, each model's mesh."""
    lines = [
        f"cluster {document['cluster']}: topology {document['topology']}, backend {document['backend']}",
        f"node facts: {document['facts']['detail']}",
    ]
    if document["factsMissing"]:
        lines.append(f"  no facts for {', '.join(document['factsMissing'])}: planned from the manifest alone")
    if document["addressesGuessed"]:
        guessed = ", ".join(f"{name}.local" for name in document["addressesGuessed"])
        lines.append(f"  no address known for some nodes; using their zeroconf names: {guessed}")
    lines.append(f"ports: {document['ports']}")
    lines += ["", *format_links(document["thunderbolt"]), "", *format_models(document["models"])]
    return "\n".join(lines)


def format_links(thunderbolt: dict[str, Any]) -> list[str]:
    lines = [f"Thunderbolt links (a /{thunderbolt['prefixLength']} each from {thunderbolt['block']}):"]
    if thunderbolt["error"]:
        return [*lines, f"  error: {thunderbolt['error']}"]
    for link in thunderbolt["links"]:
        a, b = (f"{e['node']} {e['address']} on {e['interface'] or 'port ?'}" for e in link["ends"])
        cabled = {True: "cabled", False: "NOT CABLED", None: "cabling unknown"}[link["cabled"]]
        lines.append(f"  {link['subnet']:<18} {a}  <->  {b}  ({cabled})")
        lines += format_verified(link["verified"])
    if not thunderbolt["links"]:
        lines.append("  none: fewer than two nodes")
    return lines + setup_commands(thunderbolt["links"])


def format_verified(verified: dict[str, Any] | None) -> list[str]:
    """A link's last checks, one line per end: up or down, round trip, bandwidth; its warning."""
    if verified is None:
        return []
    lines = [f"    {verified['state']}" + (f": {verified['warning']}" if verified["warning"] else "")]
    for end in verified["ends"]:
        check = end.get("lastCheck")
        if check is None:
            lines.append(f"      from {end['node']}: not checked yet")
        elif not check["up"]:
            word = "down" if check.get("addressed", True) else "not addressed"
            lines.append(f"      from {end['node']}: {word}: {check['detail']}")
        else:
            speed = (
                f"{check['gbitS']:g} Gbit/s" if check.get("gbitS") is not None else "bandwidth not measured"
            )
            lines.append(f"      from {end['node']}: up, {check['rttMs']:g} ms, {speed}")
    return lines


def setup_commands(links: list[dict[str, Any]]) -> list[str]:
    """Per node, the commands that give its Thunderbolt ports their addresses until the next
    reboot; ``genmlx mesh apply`` makes them last (README, "Mesh")."""
    by_node: dict[str, list[str]] = {}
    for link in links:
        for end, peer in zip(link["ends"], reversed(link["ends"]), strict=True):
            port = end["interface"] or f"<the Thunderbolt port cabled to {peer['node']}>"
            command = f"sudo ifconfig {port} inet {end['address']} netmask {link['netmask']}"
            by_node.setdefault(end["node"], []).append(command)
    header = "to apply on each Mac until it restarts (out of Thunderbolt Bridge first; mesh apply lasts):"
    lines = ["", header] if by_node else []
    for node, commands in by_node.items():
        lines += [f"  {node}:", *(f"    {c}" for c in commands)]
    return lines


def format_models(models: list[dict[str, Any]]) -> list[str]:
    lines = ["Multi-node models:"]
    for model in models:
        lines += format_model(model)
    if not models:
        lines.append("  none: every model runs on one node")
    return lines


def format_model(model: dict[str, Any]) -> list[str]:
    lines = [f"  {model['name']} on {', '.join(model['nodes'])}:"]
    ports = ", ".join(str(port) for port in model["httpPorts"])
    if model["error"]:
        lines.append(f"    error: {model['error']}")
    else:
        lines.append(f"    backend {model['backend']}: {model['reason']}")
        lines.append(f"    HTTP ports (rank order): {ports}")
        lines.append(f"    ring hostfile: {json.dumps(model['hostfile'])}")
    if model["runningBackend"]:
        lines.append(f"    running on {model['runningBackend']}")
    if model["runningHostfile"]:
        lines.append(f"    running with: {json.dumps(model['runningHostfile'])}")
    if model["fallback"]:
        lines.append(f"    {model['fallback']}")
    jaccl = model["jaccl"]
    if jaccl and jaccl["devices"]:
        started = model["backend"] in ("jaccl", "jaccl-ring")
        lines.append(f"    jaccl ({'the ranks start on it' if started else 'planned, not started'}):")
        lines.append(f"      devices (MLX_IBV_DEVICES): {json.dumps(jaccl['devices'])}")
        lines.append(f"      coordinator (MLX_JACCL_COORDINATOR): {jaccl['coordinator']}")
    elif jaccl and model["backend"] is None:
        lines.append(f"    jaccl would not be possible either: {jaccl['reason']}")
    return lines
