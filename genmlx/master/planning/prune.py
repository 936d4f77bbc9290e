"""Prune: which copies of models GenMLX deletes from nodes that no longer need them. Pure.

Files stay by default. A copy is deleted only when the manifest asks (the node's ``prune: true``
for any model no longer placed on it, the model's ``prune: true`` for the nodes it leaves) and
only when all of this holds, so that a prune never costs data or a download:

- GenMLX put the directory there (its metadata records a source), and it is not a ``file://``
  source used where it lies: a user's own directories are never touched;
- the node is reachable, and no rank and no transfer of that model is on it;
- the directory is not the copy a model placed on the node uses (a copy may serve under another
  name when its source and revision match);
- a model still in the manifest is already present on every node it is placed on, since the copy
  being pruned may be the peer those nodes sync from.
"""

from __future__ import annotations

from genmlx.manifest.types import Manifest, ModelSpec
from genmlx.master.planning.actions import DeleteModel
from genmlx.master.planning.observed import Observed, ObservedNode
from genmlx.master.planning.presence import find_copy, same_path
from genmlx.wire.agent_state import StoredModel


def prune_actions(desired: Manifest, observed: Observed) -> list[DeleteModel]:
    """A ``DeleteModel`` for every copy the manifest asks to prune and that is safe to delete now."""
    actions = []
    for node_spec in desired.nodes:
        node = observed.nodes.get(node_spec.name)
        if node is None or node.reachability != "ready" or node.state is None:
            continue
        in_use = copies_in_use(desired, node)
        for report in node.state.storage:
            for name, entries in by_name((*report.models, *report.partials)).items():
                reason = prune_reason(desired, observed, node, name, node_spec.prune)
                # The agent removes a model and its partial together: every one must be ours to delete.
                if reason and all(e.path not in in_use and deletable(desired, node, e) for e in entries):
                    actions.append(DeleteModel(node.name, report.path, name, reason))
    return actions


def by_name(entries: tuple[StoredModel, ...]) -> dict[str, list[StoredModel]]:
    grouped: dict[str, list[StoredModel]] = {}
    for entry in entries:
        grouped.setdefault(entry.name, []).append(entry)
    return grouped


def prune_reason(
    desired: Manifest, observed: Observed, node: ObservedNode, name: str, node_prunes: bool
) -> str:
    """Why the manifest wants the model directory ``name`` gone from ``node``; "" when it does not."""
    spec = next((m for m in desired.models if m.name == name), None)
    if spec is None:
        return "no longer in the manifest (node prune: true)" if node_prunes else ""
    if node.name in spec.nodes or not (node_prunes or spec.prune):
        return ""
    if not present_everywhere(spec, observed):
        return ""  # this copy may be the peer the model's own nodes are syncing from
    who = "model" if spec.prune else "node"
    return f"no longer placed on {node.name} ({who} prune: true)"


def deletable(desired: Manifest, node: ObservedNode, stored: StoredModel) -> bool:
    """GenMLX's own copy (or partial), with no rank or transfer of that model on the node."""
    if any(info.launch.model == stored.name for info in node.ranks):
        return False
    transfers = node.state.transfers if node.state else ()
    if any(t.model == stored.name and t.state == "running" for t in transfers):
        return False
    return is_partial(stored) or is_managed_copy(desired, stored)


def is_managed_copy(desired: Manifest, stored: StoredModel) -> bool:
    """Whether GenMLX put the directory there: its metadata names a source, and it is not a
    ``file://`` source itself (adopted in place: its metadata names its own directory)."""
    if stored.source is None:
        return False
    originals = [m.source.location.rstrip("/") for m in desired.models if m.source.scheme == "file"]
    if stored.source.startswith("file://"):
        originals.append(stored.source.removeprefix("file://").rstrip("/"))
    return not any(same_path(stored.path, original) for original in originals)


def is_partial(stored: StoredModel) -> bool:
    """A transfer's unfinished directory (``<storage>/.genmlx-partial/<model>``): always ours."""
    return "/.genmlx-partial/" in stored.path


def copies_in_use(desired: Manifest, node: ObservedNode) -> set[str]:
    """Paths on ``node`` that a placed model uses or would use, or a rank runs from."""
    used = {info.launch.model_path for info in node.ranks}
    for spec in desired.models:
        if node.name in spec.nodes and (copy := find_copy(node, spec)) is not None:
            used.add(copy.path)
    return used


def present_everywhere(spec: ModelSpec, observed: Observed) -> bool:
    """Whether every node ``spec`` is placed on is reachable and holds a complete copy."""
    for name in spec.nodes:
        node = observed.nodes.get(name)
        if node is None or node.reachability != "ready" or find_copy(node, spec) is None:
            return False
    return True
