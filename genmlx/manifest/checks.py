"""Rules the schema cannot state: names that must be unique or declared, and ports that would collide.

These run even when the schema has failed, so every accessor here tolerates any shape of data and
simply skips what is not the shape it needs; the schema has already reported that part.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from genmlx.core.errors import ManifestIssue
from genmlx.manifest.build import parse_expiry
from genmlx.manifest.positions import Positions, YamlPath, format_path
from genmlx.manifest.types import DEFAULT_AGENT_PORT

Finding = tuple[YamlPath, str]


def semantic_issues(data: Any, positions: Positions, filename: str) -> list[ManifestIssue]:
    """Every semantic problem of ``data`` (a manifest with schema defaults filled in)."""
    findings = [
        *_duplicate_names(data, "nodes", "node"),
        *_duplicate_names(data, "models", "model"),
        *_undeclared_nodes(data),
        *_address_ports_out_of_range(data),
        *_port_conflicts(data, positions),
        *_api_key_issues(data),
    ]
    issues = []
    for path, message in findings:
        where = positions.of_value(path)
        issues.append(ManifestIssue(filename, where.line, where.column, format_path(path), message))
    return issues


def _field(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, or None as soon as a level is not a mapping or lacks the key."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _entries(data: Any, key: str) -> list[tuple[int, dict[str, Any]]]:
    """The mapping entries of ``spec.<key>`` with their indexes; anything else is skipped."""
    items = _field(data, "spec", key)
    if not isinstance(items, list):
        return []
    return [(index, item) for index, item in enumerate(items) if isinstance(item, dict)]


def _declared_nodes(data: Any) -> list[str]:
    return [node["name"] for _, node in _entries(data, "nodes") if isinstance(node.get("name"), str)]


def _duplicate_names(data: Any, key: str, kind: str) -> list[Finding]:
    first_seen: dict[str, int] = {}
    findings = []
    for index, entry in _entries(data, key):
        name = entry.get("name")
        if not isinstance(name, str):
            continue
        if name in first_seen:
            where = format_path(("spec", key, first_seen[name]))
            findings.append((("spec", key, index, "name"), f"{kind} '{name}' is already declared at {where}"))
        else:
            first_seen[name] = index
    return findings


def _api_key_issues(data: Any) -> list[Finding]:
    """Key names and digests said twice, models not declared, expiries that do not parse."""
    keys = _field(data, "spec", "auth", "apiKeys")
    entries = (
        [(i, key) for i, key in enumerate(keys) if isinstance(key, dict)] if isinstance(keys, list) else []
    )
    models = [model["name"] for _, model in _entries(data, "models") if isinstance(model.get("name"), str)]
    findings = [*_repeated_key_fields(entries)]
    for index, key in entries:
        at = ("spec", "auth", "apiKeys", index)
        named = key.get("models")
        for position, model in enumerate(named if isinstance(named, list) else []):
            if isinstance(model, str) and model not in models:
                findings.append(((*at, "models", position), _not_declared(model, models, "model")))
        if isinstance(key.get("expires"), str) and not _parses_as_expiry(key["expires"]):
            findings.append(((*at, "expires"), "must be a date (2027-01-31) or an RFC 3339 date-time"))
    return findings


def _repeated_key_fields(entries: list[tuple[int, dict[str, Any]]]) -> list[Finding]:
    first: dict[tuple[str, str], int] = {}
    findings = []
    for index, key in entries:
        for name in ("name", "sha256"):
            value = key.get(name)
            if not isinstance(value, str):
                continue
            if (name, value) in first:
                where = format_path(("spec", "auth", "apiKeys", first[(name, value)]))
                findings.append((("spec", "auth", "apiKeys", index, name), f"is already used at {where}"))
            first.setdefault((name, value), index)
    return findings


def _parses_as_expiry(text: str) -> bool:
    try:
        parse_expiry(text)
    except ValueError:
        return False
    return True


def _undeclared_nodes(data: Any) -> list[Finding]:
    if not isinstance(_field(data, "spec", "nodes"), list):
        return []  # no node list at all: the schema said so, and every name would be "undeclared"
    declared = _declared_nodes(data)
    findings = []
    master_node = _field(data, "spec", "master", "node")
    if isinstance(master_node, str) and master_node not in declared:
        findings.append((("spec", "master", "node"), _not_declared(master_node, declared)))
    for index, model in _entries(data, "models"):
        names = model.get("nodes")
        for position, name in enumerate(names if isinstance(names, list) else []):
            if isinstance(name, str) and name not in declared:
                findings.append((("spec", "models", index, "nodes", position), _not_declared(name, declared)))
    return findings


def _not_declared(name: str, declared: list[str], kind: str = "node") -> str:
    close = difflib.get_close_matches(name, declared, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"'{name}' is not a declared {kind}{hint}"


def _address_port(address: Any) -> int | None:
    if not isinstance(address, str) or ":" not in address:
        return None
    digits = address.rsplit(":", 1)[1]
    return int(digits) if digits.isdigit() else None


def _address_host(node: dict[str, Any]) -> str:
    """The host a node runs on: its address's host when given, else its name (one node, one host)."""
    address = node.get("address")
    if isinstance(address, str) and ":" in address:
        return address.rsplit(":", 1)[0].lower()
    return str(node.get("name"))


def _address_ports_out_of_range(data: Any) -> list[Finding]:
    findings = []
    for index, node in _entries(data, "nodes"):
        port = _address_port(node.get("address"))
        if port is not None and not 1 <= port <= 65535:
            path = ("spec", "nodes", index, "address")
            findings.append((path, f"port {port} in address '{node['address']}' must be from 1 to 65535"))
    return findings


@dataclass(frozen=True)
class _PortClaim:
    """A port something will listen on, on which hosts, and where the manifest says so."""

    port: int
    hosts: frozenset[str]
    path: YamlPath
    explicit: bool  # written in the file, rather than a default

    def describe(self) -> str:
        where = format_path(self.path) + ("" if self.explicit else " (default)")
        return f"{where} on {', '.join(sorted(self.hosts))}"


def _port_conflicts(data: Any, positions: Positions) -> list[Finding]:
    """Two listeners on one host cannot share a port.

    Rule: a node's host is the host of its address, or the node itself when it has none, so nodes on
    different machines may reuse a port while two nodes given the same host may not. The master
    listens on its node; each agent on its node; a model's rank 0 may land on any of the model's
    nodes, so its port is claimed on all of them; the mesh port is claimed on every node. The issue
    goes to the later claim written in the file and names the earlier one.
    """
    claims = _port_claims(data, positions)
    reported: set[YamlPath] = set()
    findings = []
    for later_index, later in enumerate(claims):
        for earlier in claims[:later_index]:
            if earlier.port != later.port or not earlier.hosts & later.hosts:
                continue
            if not (earlier.explicit or later.explicit):
                continue  # two defaults meet only when names repeat, which is reported by itself
            at, other = (later, earlier) if later.explicit else (earlier, later)
            if at.path in reported:
                continue
            reported.add(at.path)
            findings.append((at.path, f"port {at.port} is already used by {other.describe()}"))
    return findings


def _port_claims(data: Any, positions: Positions) -> list[_PortClaim]:
    nodes = _entries(data, "nodes")
    host_of = {str(node.get("name")): _address_host(node) for _, node in nodes}
    claims: list[_PortClaim] = []

    def claim(port: Any, hosts: Iterable[str], path: YamlPath, explicit: bool | None = None) -> None:
        hosts = frozenset(hosts)
        if type(port) is int and hosts:  # bool is an int too; anything else the schema reported
            written = path in positions.values if explicit is None else explicit
            claims.append(_PortClaim(port, hosts, path, written))

    def hosts_of(names: Any) -> list[str]:
        if names == "*":
            return list(host_of.values())
        return [host_of.get(str(n), str(n)) for n in names] if isinstance(names, list) else []

    master = _field(data, "spec", "master")
    claim(_field(master, "port"), hosts_of([_field(master, "node")]), ("spec", "master", "port"))
    for index, node in nodes:
        address_port = _address_port(node.get("address"))
        path = ("spec", "nodes", index, "address") if address_port else ("spec", "nodes", index)
        claim(address_port or DEFAULT_AGENT_PORT, [_address_host(node)], path, bool(address_port))
    claim(
        _field(data, "spec", "mesh", "port"),
        [_address_host(node) for _, node in nodes],
        ("spec", "mesh", "port"),
    )
    for index, model in _entries(data, "models"):
        path = ("spec", "models", index, "serving", "port")
        claim(_field(model, "serving", "port"), hosts_of(model.get("nodes")), path)
    return claims
