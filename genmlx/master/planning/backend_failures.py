"""Failed starts on a faster backend than ring, read from what a pass observed and from the
refusals of the agents asked to start a group. Pure: the master keeps what these find
(``Observed.backend_failures``) and hands it back to the planner, which then runs ring (``auto``)
or holds the model back (``jaccl``, ``nccl``) until the facts the failure was planned from change.
"""

from __future__ import annotations

from genmlx.manifest.types import Manifest
from genmlx.master.planning.actions import StartRankGroup
from genmlx.master.planning.backends import backend_fingerprint
from genmlx.master.planning.mesh import observed_mesh_nodes
from genmlx.master.planning.observed import BackendFailure, Observed
from genmlx.wire.rank_launch import RDMA_NOT_READY


def failures_in_ranks(manifest: Manifest, observed: Observed) -> dict[str, BackendFailure]:
    """By model, the first rank of each multi-node model whose agent says it could not join its
    group's backend (its exit and log read as such), with the fingerprint of its nodes' facts now."""
    found: dict[str, BackendFailure] = {}
    for spec in manifest.models:
        if len(spec.nodes) < 2 or any(name not in observed.nodes for name in spec.nodes):
            continue
        failed = [
            (node.name, info)
            for node in (observed.nodes[name] for name in spec.nodes)
            for info in node.ranks
            if info.launch.model == spec.name and info.backend_failure and info.launch.backend != "ring"
        ]
        if failed:
            name, info = failed[0]
            fingerprint = backend_fingerprint(observed_mesh_nodes(spec.nodes, observed.nodes))
            found[spec.name] = BackendFailure(
                info.launch.backend, fingerprint, name, info.backend_failure or "", info.launch.spec_hash
            )
    return found


def failure_of_refused_start(
    start: StartRankGroup, node: str, error: str, observed: Observed
) -> BackendFailure | None:
    """The failure a group start records when ``node``'s agent refused its rank after checking its
    RDMA devices and links (``RDMA_NOT_READY``); None for any other failed start."""
    backend = start.launches[0][1].backend if start.launches else "ring"
    names = [name for name, _ in start.launches]
    if backend == "ring" or RDMA_NOT_READY not in error or any(n not in observed.nodes for n in names):
        return None
    fingerprint = backend_fingerprint(observed_mesh_nodes(names, observed.nodes))
    why = error[error.index(RDMA_NOT_READY) :]
    return BackendFailure(backend, fingerprint, node, why, start.spec_hash)


def remember(known: dict[str, BackendFailure], found: dict[str, BackendFailure]) -> dict[str, BackendFailure]:
    """``known`` with the failures just found, except those of a group already remembered on the
    same facts (its exited ranks stay visible until the master stops them: the first reading
    holds). The same group failing again on other facts is remembered anew."""
    updated = dict(known)
    for model, failure in found.items():
        old = known.get(model)
        if old is None or (old.spec_hash, old.fingerprint) != (failure.spec_hash, failure.fingerprint):
            updated[model] = failure
    return updated
