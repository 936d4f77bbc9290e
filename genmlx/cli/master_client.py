"""The CLI's side of the master's API: apply a manifest, read status, and print it for people.

Plain ``urllib``: these are one-shot calls from a terminal, so blocking is fine. Every request is
signed with the cluster token's key and every answer must carry the master's signature, so the
token never crosses the network and a reply from anything but the master is refused.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import yaml

from genmlx.core.errors import AuthError, GenMLXError
from genmlx.core.home import CLIENT_KEY_PREFIX, default_token_path, ensure_token, read_token
from genmlx.core.signing import REPLY_HEADER, Keys, SignatureError, check_reply, signed_headers
from genmlx.core.tokens import TokenSource
from genmlx.manifest.types import DEFAULT_MASTER_PORT, Manifest
from genmlx.wire.status import (
    AnnouncedAgent,
    ClusterStatus,
    ConditionReport,
    EventReport,
    LinkStatus,
    ModelStatus,
    NodeStatus,
)


class MasterError(GenMLXError):
    """The master refused a request or could not be reached."""

    def __init__(self, message: str, document: dict[str, Any] | None = None):
        super().__init__(message)
        self.document = document or {}


class MasterUnreachable(MasterError):
    """Nothing answered at the master's URL."""


DEFAULT_MASTER_URL = f"http://127.0.0.1:{DEFAULT_MASTER_PORT}"


# The certificate file of a master that serves HTTPS with its own (self-signed) certificate, by its
# URL: what the manifest names, where that file is on this machine (the master's own node).
TRUSTED_CERTIFICATES: dict[str, Path] = {}


def master_url(explicit: str | None, manifest: Manifest | None = None) -> str:
    """``--master``, else ``$GENMLX_MASTER``, else the manifest's master node (``https`` where it
    has ``tls``), else this machine."""
    url = explicit or os.environ.get("GENMLX_MASTER")
    if url:
        return url if "://" in url else f"http://{url}"
    if manifest is None:
        return DEFAULT_MASTER_URL
    address = manifest.node(manifest.master.node).address
    host = address.rsplit(":", 1)[0] if address else "127.0.0.1"
    url = f"{manifest.master.scheme}://{host}:{manifest.master.port}"
    tls = manifest.master.tls
    if tls is not None and Path(tls.cert_file).expanduser().is_file():
        TRUSTED_CERTIFICATES[url] = Path(tls.cert_file).expanduser()
    return url


def ssl_context(url: str) -> ssl.SSLContext | None:
    """How to check an HTTPS master: the system's trust store (and ``SSL_CERT_FILE``), and the
    master's own certificate where the manifest names one this machine has."""
    if not url.startswith("https://"):
        return None
    context = ssl.create_default_context()
    trusted = TRUSTED_CERTIFICATES.get(url.rstrip("/"))
    if trusted is not None:
        context.load_verify_locations(cafile=trusted)
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the certificate itself is the anchor
    return context


def call_master(url: str, token: str, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
    """One request to the master, signed with ``token``'s key; a client key (``gmx_…``) instead is
    sent as a client sends it, as a bearer token."""
    data = None if body is None else json.dumps(body).encode()
    target = f"{url.rstrip('/')}{path}"
    keys = None if token.startswith(CLIENT_KEY_PREFIX) else Keys.of(token)
    headers, nonce = (
        signed_headers(keys, method, target, data) if keys else ({"Authorization": f"Bearer {token}"}, "")
    )
    request = urllib.request.Request(target, data=data, method=method, headers=headers)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=ssl_context(url)) as response:
            reply = response.read()
            check_master_reply(keys, nonce, response.status, response.headers, reply, url)
            return json.loads(reply)
    except urllib.error.HTTPError as e:
        reply = e.read()
        document = parse_error(reply)
        if e.code == 401:
            why = document.get("message", "")
            raise AuthError(f"the master at {url} refused our signature: {why}") from None
        check_master_reply(keys, nonce, e.code, e.headers, reply, url)
        raise MasterError(document.get("message") or f"HTTP {e.code}", document) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        problem = f"no master answers at {url} ({reason}): is `genmlx master` running?"
        raise MasterUnreachable(problem) from None


def check_master_reply(
    keys: Keys | None, nonce: str, status: int, headers: Any, body: bytes, url: str
) -> None:
    """An ``AuthError`` unless the reply carries the master's signature (a reply to a client key's
    request carries none)."""
    if keys is None:
        return
    try:
        check_reply(keys, nonce, status, headers.get(REPLY_HEADER), body)
    except SignatureError as e:
        raise AuthError(f"what answers at {url} is not this cluster's master: {e}") from None


def ensured_token() -> str:
    """The cluster token in ``$GENMLX_HOME/token``, created if absent."""
    path, created = ensure_token()
    if created:
        logging.getLogger("genmlx").info("created a new cluster token at %s; copy it to every node", path)
    return read_token(path)


def manifest_token(manifest: Manifest) -> str:
    """The token the manifest's ``auth.tokenFile`` names, else ``$GENMLX_HOME/token``."""
    return read_token(token_path(manifest))


def token_path(manifest: Manifest | None) -> Path:
    """The token file the manifest's ``auth.tokenFile`` names, else ``$GENMLX_HOME/token``
    (created if absent)."""
    if manifest is None or manifest.auth.token_file is None:
        ensured_token()
        return default_token_path()
    return Path(manifest.auth.token_file).expanduser()


def token_source(manifest: Manifest | None) -> TokenSource:
    """The token file a long-running process follows (through rotations), checked readable now."""
    path = token_path(manifest)
    read_token(path)
    return TokenSource(path)


def ui_login_url(url: str, token: str) -> tuple[str, int]:
    """A one-time sign-in link to the status page (the browser never gets the token) and how
    many seconds it is good for."""
    reply = call_master(url, token, "POST", "/api/v1/ui/login", {})
    return f"{url.rstrip('/')}{reply['url']}", int(reply.get("expiresIn", 60))


def parse_error(body: bytes) -> dict[str, Any]:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return {"message": body.decode(errors="replace")[:500]}


def apply_manifest(
    url: str, token: str, path: Path, text: str, revision: dict | None, dry_run: bool = False
) -> dict[str, Any]:
    """Send a manifest to the master; with ``dry_run`` it only answers what it would do."""
    body = {"manifest": text, "filename": str(path), "revision": revision, "dryRun": dry_run}
    return call_master(url, token, "POST", "/api/v1/manifest", body)


def fetch_status(url: str, token: str, timeout: float = 60) -> ClusterStatus:
    """The master's status document, typed."""
    return ClusterStatus.from_json(call_master(url, token, "GET", "/api/v1/status", timeout=timeout))


def fetch_events(url: str, token: str, kind: str, name: str, limit: int = 20) -> tuple[EventReport, ...]:
    """The newest events about one node or model."""
    query = urlencode({"kind": kind, "name": name, "limit": limit})
    events = call_master(url, token, "GET", f"/api/v1/events?{query}")["events"]
    return tuple(EventReport.from_json(e) for e in events)


def print_document(document: Any, output: str, as_text: Callable[[], str]) -> None:
    """``document`` as JSON or YAML, or ``as_text()`` for people (``-o text``)."""
    if output == "json":
        print(json.dumps(document, indent=2))
    elif output == "yaml":
        print(yaml.safe_dump(document, sort_keys=False), end="")
    else:
        print(as_text())


def format_status(status: ClusterStatus) -> str:
    """A terminal view of the status document: the cluster line, then nodes, then models."""
    cluster = status.conditions[0]
    revision = status.last_applied_revision
    rev = f"  revision {revision}" if revision else ""
    lines = [
        f"cluster {status.name or '-'}: Ready={cluster.status} ({cluster.reason})",
        f"  {cluster.message}",
        f"generation {status.generation}, observed {status.observed_generation}{rev}",
    ]
    if status.nodes:
        rows = [(n.name, *condition_cells(n.conditions, n.address)) for n in status.nodes]
        lines += ["", *table(("NODE", "READY", "REASON", "ADDRESS", "MESSAGE"), rows)]
    if status.models:
        rows = [(m.name, *condition_cells(m.conditions, m.endpoint)) for m in status.models]
        lines += ["", *table(("MODEL", "READY", "REASON", "ENDPOINT", "MESSAGE"), rows)]
    if status.links:
        rows = [link_row(link) for link in status.links]
        lines += ["", *table(("LINK", "STATE", "ENDS", "RTT", "GBIT/S", "WARNING"), rows)]
    if status.unmanaged_agents:
        rows = [(a.name, a.address, a.version) for a in status.unmanaged_agents]
        lines += ["", "unmanaged agents (announced, not in the manifest; never used):"]
        lines += ["  " + line for line in table(("NAME", "ADDRESS", "VERSION"), rows)]
        joined = [a for a in status.unmanaged_agents if a.storage]
        if joined:
            lines += ["  to use the nodes that joined, add under spec.nodes in cluster.yaml and apply:"]
            lines += ["    " + line for a in joined for line in node_entry_lines(a)]
    rotation = status.token_rotation
    if rotation is not None:
        behind = ", ".join(rotation.nodes_on_previous_token) or "none"
        how = "copy the token file to them" if rotation.manual else "the master pushes it"
        lines += [
            "",
            f"token rotation: the old token counts until {rotation.previous_until}; "
            f"nodes still on it: {behind} ({how})",
        ]
    if status.impostors:
        rows = [(i.name, i.address, i.message) for i in status.impostors]
        lines += ["", "impostors (announce a node's name, cannot prove they hold the token; never used):"]
        lines += ["  " + line for line in table(("NAME", "ADDRESS", "MESSAGE"), rows)]
    if status.pending_actions:
        lines += ["", "pending:", *(f"  {a}" for a in status.pending_actions)]
    return "\n".join(lines)


def node_entry_lines(agent: AnnouncedAgent) -> list[str]:
    """A joined node's entry under ``spec.nodes``, as YAML lines (its address commented out:
    discovery finds it by name)."""
    entry = {"name": agent.name, "storage": [{"path": path} for path in agent.storage]}
    first, *rest = yaml.safe_dump([entry], sort_keys=False).splitlines()  # quoted where it must be
    return [first, f"  # address: {agent.address}   # where zeroconf does not reach it", *rest]


def link_row(link: LinkStatus) -> tuple[str, ...]:
    """A Thunderbolt link as one row: its ends, and each end's last round trip and bandwidth."""
    checks = [end.last_check for end in link.ends]
    ends = " <-> ".join(f"{end.node} {end.interface or '?'}" for end in link.ends)
    rtt = " / ".join(f"{c.rtt_ms:g} ms" if c and c.rtt_ms is not None else "-" for c in checks)
    speed = " / ".join(f"{c.gbit_s:g}" if c and c.gbit_s is not None else "-" for c in checks)
    down = "; ".join(
        f"{end.node}: {end.last_check.detail}"
        for end in link.ends
        if end.last_check and not end.last_check.up
    )
    return (link.subnet, link.state, ends, rtt, speed, down or link.warning or "-")


def format_items(what: str, items: tuple[NodeStatus, ...] | tuple[ModelStatus, ...]) -> str:
    """`genmlx get nodes|models`: one row each."""
    where = "address" if what == "nodes" else "endpoint"
    rows = [(i.name, *condition_cells(i.conditions, getattr(i, where))) for i in items]
    return "\n".join(table((what[:-1].upper(), "READY", "REASON", where.upper(), "MESSAGE"), rows))


def format_described(item: NodeStatus | ModelStatus, events: tuple[EventReport, ...]) -> str:
    """`genmlx describe node|model NAME`: its fields, conditions and recent events."""
    what = "Node" if isinstance(item, NodeStatus) else "Model"
    fields = item.to_json()
    skip = {
        "name",
        "conditions",
        "facts",
        "storage",
        "ranks",
        "copies",
        "transfers",
        "promptCache",
        "promptCaches",
        "batching",
    }
    lines = [f"{what}: {item.name}"]
    shown = {key: value for key, value in fields.items() if key not in skip and value not in (None, [])}
    lines += [f"  {key}: {value}" for key, value in shown.items()]
    lines += ["Conditions:"] + [
        f"  {c.type}={c.status} {c.reason}: {c.message} (since {c.last_transition_time})"
        for c in item.conditions
    ]
    for key in ("ranks", "copies", "transfers"):
        for entry in fields.get(key) or []:
            lines.append(f"  {key[:-1]}: {json.dumps(entry)}")
    if isinstance(item, ModelStatus) and item.batching:
        lines.append(f"Batching: {item.batching.reason}")
    if isinstance(item, ModelStatus):
        lines += prompt_cache_lines(item)
    lines.append("Events:")
    for e in events:
        times = f" (x{e.count}, last {e.last_timestamp})" if e.count > 1 else ""
        lines.append(f"  {e.first_timestamp} {e.type} {e.reason}: {e.message}{times}")
    if not events:
        lines.append("  none")
    return "\n".join(lines)


def prompt_cache_lines(model: ModelStatus) -> list[str]:
    """The model's prompt cache, tier by tier as rank 0 counts it, then its disk tier per node."""
    lines = []
    for tier in model.prompt_cache:
        name = f"{tier.tier} ({tier.kind})" if tier.kind else tier.tier
        rate = f"{tier.hit_rate:.0%}" if tier.hit_rate is not None else "-"
        lines.append(
            f"  {name}: {tier.entries} entries, {megabytes(tier.bytes)}, hit rate {rate} "
            f"({tier.hits} of {tier.lookups} prompts, {tier.hit_tokens} tokens)"
        )
    for cache in model.prompt_caches:
        lines.append(f"  disk on {cache.node}: {megabytes(cache.bytes)} in {cache.blocks} files")
    return ["Prompt cache:", *lines] if lines else []


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def condition_cells(conditions: tuple[ConditionReport, ...], where: str | None) -> tuple[str, str, str, str]:
    ready = conditions[0]
    return ready.status, ready.reason, where or "-", ready.message


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
