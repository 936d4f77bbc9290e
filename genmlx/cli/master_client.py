"""The CLI's side of the master's API: apply a manifest, read status, and print it for people.

Plain ``urllib``: these are one-shot calls from a terminal, so blocking is fine.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from genmlx.core.errors import AuthError, GenMLXError
from genmlx.manifest.types import DEFAULT_MASTER_PORT, Manifest


class MasterError(GenMLXError):
    """The master refused a request or could not be reached."""

    def __init__(self, message: str, document: dict[str, Any] | None = None):
        super().__init__(message)
        self.document = document or {}


def master_url(explicit: str | None, manifest: Manifest | None = None) -> str:
    """``--master``, else ``$GENMLX_MASTER``, else the manifest's master node, else this machine."""
    url = explicit or os.environ.get("GENMLX_MASTER")
    if url:
        return url if "://" in url else f"http://{url}"
    if manifest is None:
        return f"http://127.0.0.1:{DEFAULT_MASTER_PORT}"
    address = manifest.node(manifest.master.node).address
    host = address.rsplit(":", 1)[0] if address else "127.0.0.1"
    return f"http://{host}:{manifest.master.port}"


def call_master(url: str, token: str, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}{path}", data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        document = parse_error(e.read())
        if e.code == 401:
            raise AuthError(f"the master at {url} refused the token: {document.get('message', '')}") from None
        raise MasterError(document.get("message") or f"HTTP {e.code}", document) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MasterError(f"no master answers at {url} ({reason}): is `genmlx master` running?") from None


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


def format_status(document: dict[str, Any]) -> str:
    """A terminal view of the status document: the cluster line, then nodes, then models."""
    cluster = document["conditions"][0]
    revision = document.get("lastAppliedRevision")
    rev = f"  revision {revision['commit'][:12]}{'-dirty' if revision['dirty'] else ''}" if revision else ""
    lines = [
        f"cluster {document.get('name', '-')}: Ready={cluster['status']} ({cluster['reason']})",
        f"  {cluster['message']}",
        f"generation {document.get('generation', 0)}, observed {document.get('observedGeneration', 0)}{rev}",
    ]
    if document["nodes"]:
        rows = [(n["name"], *condition_cells(n, n.get("address"))) for n in document["nodes"]]
        lines += ["", *table(("NODE", "READY", "REASON", "ADDRESS", "MESSAGE"), rows)]
    if document["models"]:
        rows = [(m["name"], *condition_cells(m, m.get("endpoint"))) for m in document["models"]]
        lines += ["", *table(("MODEL", "READY", "REASON", "ENDPOINT", "MESSAGE"), rows)]
    unmanaged = document.get("unmanagedAgents") or []
    if unmanaged:
        rows = [(a["name"], a["address"], a.get("version", "")) for a in unmanaged]
        lines += ["", "unmanaged agents (announced, not in the manifest; never used):"]
        lines += ["  " + line for line in table(("NAME", "ADDRESS", "VERSION"), rows)]
    pending = document.get("pendingActions") or []
    if pending:
        lines += ["", "pending:", *(f"  {a}" for a in pending)]
    return "\n".join(lines)


def format_items(what: str, items: list[dict[str, Any]]) -> str:
    """`genmlx get nodes|models`: one row each."""
    where = "address" if what == "nodes" else "endpoint"
    rows = [(i["name"], *condition_cells(i, i.get(where))) for i in items]
    return "\n".join(table((what[:-1].upper(), "READY", "REASON", where.upper(), "MESSAGE"), rows))


def format_described(what: str, item: dict[str, Any]) -> str:
    """`genmlx describe node|model NAME`: its fields, conditions and recent events."""
    skip = {"name", "conditions", "events", "facts", "storage", "ranks", "copies", "transfers"}
    lines = [f"{what.capitalize()}: {item['name']}"]
    lines += [
        f"  {key}: {value}" for key, value in item.items() if key not in skip and value not in (None, [])
    ]
    lines += ["Conditions:"] + [
        f"  {c['type']}={c['status']} {c['reason']}: {c['message']} (since {c['lastTransitionTime']})"
        for c in item["conditions"]
    ]
    for key in ("ranks", "copies", "transfers"):
        for entry in item.get(key) or []:
            lines.append(f"  {key[:-1]}: {json.dumps(entry)}")
    lines.append("Events:")
    for e in item["events"] or []:
        times = f" (x{e['count']}, last {e['lastTimestamp']})" if e["count"] > 1 else ""
        lines.append(f"  {e['firstTimestamp']} {e['type']} {e['reason']}: {e['message']}{times}")
    if not item["events"]:
        lines.append("  none")
    return "\n".join(lines)


def condition_cells(item: dict[str, Any], where: str | None) -> tuple[str, str, str, str]:
    ready = item["conditions"][0]
    return ready["status"], ready["reason"], where or "-", ready["message"]


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
