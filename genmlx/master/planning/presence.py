"""Presence: is a model's every file on every node it is placed on, and if not, how it gets there.

Pure, like the planner it serves. A model is downloaded from its source once, by one node; every
other node copies it from a node that has it (peer sync over the LAN), never from the internet
again. A new copy goes to the first storage path of the node that has room for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from genmlx.manifest.types import Manifest, ModelSpec, Node, StoragePath
from genmlx.master.planning.actions import FetchModel
from genmlx.master.planning.observed import Observed, ObservedNode
from genmlx.wire.agent_state import FetchRequest, StorageReport, StoredModel, Transfer

TRANSFER_RETRY_S = 10.0  # after a temporary failure, wait this long before asking again
GB = 1_000_000_000


@dataclass(frozen=True)
class Presence:
    """Where the model's copies are, and what to do for the nodes that lack one."""

    copies: dict[str, StoredModel]  # node → its complete copy, for placed nodes that have one
    fetches: tuple[FetchModel, ...] = ()
    reason: str = ""  # why the model is not yet everywhere ("" when it is)
    message: str = ""
    blocked: bool = False  # nothing will change until the manifest or the nodes do


@dataclass(frozen=True)
class Wait:
    """Why no fetch is due for one node now."""

    reason: str
    message: str
    blocked: bool = False


def assess_presence(spec: ModelSpec, manifest: Manifest, observed: Observed) -> Presence:
    copies = {name: copy for name in spec.nodes if (copy := find_copy(observed.nodes[name], spec))}
    missing = [name for name in spec.nodes if name not in copies]
    if not missing:
        return Presence(copies)
    holder = first_holder(spec, observed)
    steps = [plan_fetch(spec, manifest.node(name), observed, holder, missing[0]) for name in missing]
    fetches = tuple(step for step in steps if isinstance(step, FetchModel))
    notes = sorted((step for step in steps if isinstance(step, Wait)), key=lambda w: not w.blocked)
    if notes:  # a node that cannot get it blocks the model; the others still fetch
        return Presence(copies, fetches, notes[0].reason, notes[0].message, blocked=notes[0].blocked)
    return Presence(copies, fetches, "Fetching", "; ".join(f.describe()[2:] for f in fetches))


Holder = tuple[ObservedNode, StoredModel]  # a node with a complete copy, and that copy


def plan_fetch(
    spec: ModelSpec, node: Node, observed: Observed, holder: Holder | None, first: str
) -> FetchModel | Wait:
    """The fetch that brings ``spec`` to ``node``, or why none is due now."""
    seen = observed.nodes[node.name]
    transfer = current_transfer(seen, spec)
    if transfer is not None and transfer.state == "running":
        return Wait(transfer_reason(transfer), transfer_progress(node.name, transfer))
    if transfer is not None and transfer.state == "failed":
        failed = f"{transfer.kind} of {spec.name} to {node.name} failed: {transfer.error}"
        if transfer.permanent:
            return Wait("TransferFailed", failed, blocked=True)
        if observed.now - transfer.started_at < TRANSFER_RETRY_S:
            return Wait("TransferFailed", f"{failed}; retrying shortly")
    if holder is None and spec.source.scheme == "file":
        return missing_local_source(spec, observed)
    if holder is None and node.name != first:
        return Wait("WaitingForDownload", f"{node.name} copies {spec.name} once {first} has it")
    size = holder[1].size_bytes if holder else None
    storage = choose_storage(seen, node, size)
    if storage is None:
        need = (f"{size / GB:.1f} GB" if size >= GB / 10 else f"{size / 1e6:.1f} MB") if size else "it"
        return Wait("NoRoom", f"no storage path of {node.name} has room for {need}", blocked=True)
    return FetchModel(node.name, fetch_request(spec, storage, holder))


def missing_local_source(spec: ModelSpec, observed: Observed) -> Wait:
    """Why a ``file://`` source is nowhere to be copied from: absent, or there but incomplete."""
    location = spec.source.location.rstrip("/")
    for node in observed.nodes.values():
        for report in node.state.storage if node.state else ():
            for stored in report.models:
                if same_path(stored.path, location):
                    message = f"{stored.path} on node {node.name} is incomplete (no config.json or weights)"
                    return Wait("ModelIncomplete", message, blocked=True)
    return Wait("ModelNotFound", f"{spec.source} is not in a storage path of any node", blocked=True)


def fetch_request(spec: ModelSpec, storage: StorageReport, holder: Holder | None) -> FetchRequest:
    if holder is not None:
        peer, copy = holder
        # The source beside the peer is what the copy must hold, so a stale copy is never taken.
        return FetchRequest(
            spec.name,
            storage.path,
            source=str(spec.source),
            revision=spec.revision,
            peer=peer.address,
            peer_model=copy.name,
        )
    return FetchRequest(spec.name, storage.path, source=str(spec.source), revision=spec.revision)


def find_copy(node: ObservedNode, spec: ModelSpec) -> StoredModel | None:
    """A complete copy of ``spec`` on ``node``: its own directory first, then any matching one."""
    if node.state is None:
        return None
    candidates = [m for s in node.state.storage for m in s.models if m.complete and is_copy_of(m, spec)]
    candidates.sort(key=lambda m: m.name != spec.name)
    return candidates[0] if candidates else None


def is_copy_of(stored: StoredModel, spec: ModelSpec) -> bool:
    """Whether a stored directory holds ``spec``'s source at ``spec``'s revision.

    A ``file://`` source matches its own directory, or a copy whose metadata names it.
    """
    source = str(spec.source)
    if spec.source.scheme == "file":
        return same_path(stored.path, spec.source.location.rstrip("/")) or stored.source == source
    if stored.source != source:
        return False
    return stored.revision == spec.revision or bool(stored.commit and stored.commit.startswith(spec.revision))


def first_holder(spec: ModelSpec, observed: Observed) -> Holder | None:
    """A reachable node with a complete copy, preferring the nodes the model is placed on."""
    order = list(spec.nodes) + sorted(n for n in observed.nodes if n not in spec.nodes)
    for name in order:
        node = observed.nodes.get(name)
        if node is not None and node.reachability == "ready" and (copy := find_copy(node, spec)):
            return node, copy
    return None


def current_transfer(node: ObservedNode, spec: ModelSpec) -> Transfer | None:
    """The node's transfer of ``spec``; a download from another source or revision (the manifest
    has changed since it ran) is not, so its failure no longer blocks the model."""
    wanted = f"{spec.source}@{spec.revision}" if spec.source.scheme == "hf" else str(spec.source)
    transfers = node.state.transfers if node.state else ()
    return next(
        (t for t in transfers if t.model == spec.name and (t.kind != "download" or t.origin == wanted)), None
    )


def transfer_reason(transfer: Transfer) -> str:
    return "Downloading" if transfer.kind == "download" else "Syncing"


def transfer_progress(node: str, transfer: Transfer) -> str:
    verb = "downloading to" if transfer.kind == "download" else "syncing to"
    done = f"{transfer.bytes_done / GB:.2f} GB"
    if transfer.bytes_total:
        percent = 100 * transfer.bytes_done / transfer.bytes_total
        done = f"{percent:.0f}% of {transfer.bytes_total / GB:.2f} GB"
    return f"{verb} {node} from {transfer.origin}: {done}"


def choose_storage(node: ObservedNode, declared: Node, size: int | None) -> StorageReport | None:
    """The first storage path with room for ``size`` bytes (unknown: any room at all), honouring
    the manifest's ``maxGB`` for the paths it declares."""
    for report in node.state.storage if node.state else ():
        if not report.exists:
            continue
        limit = max_bytes(report, declared.storage)
        used = sum(m.size_bytes for m in report.models)
        room = min(report.free_bytes, limit - used) if limit is not None else report.free_bytes
        if room > 0 and (size is None or room >= size):
            return report
    return None


def max_bytes(report: StorageReport, declared: tuple[StoragePath, ...]) -> int | None:
    for entry in declared:
        if same_path(report.path, entry.path) and entry.max_gb is not None:
            return int(entry.max_gb * GB)
    return None


def same_path(reported: str, declared: str) -> bool:
    """Whether a path an agent reports is one the manifest declares. A ``~`` path cannot be
    expanded here (it is the node's home, not ours): it matches by the part after ``~``."""
    return reported == declared or (declared.startswith("~/") and reported.endswith(declared[1:]))
