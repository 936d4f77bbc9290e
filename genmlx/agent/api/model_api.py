"""The model endpoints of the agent's API: fetch, delete, list a model's files and serve them.

POST   /api/v1/models                      FetchRequest JSON -> 202 {"transfer": Transfer}
                                           or 200 {"model": StoredModel} when already complete
DELETE /api/v1/models/{name}               200 {"removed": [paths]}; 409 while a rank or a
                                           transfer uses it; 404 when there is nothing to remove.
       ?storagePath=P                      only from that storage path (400 if not one of ours)
       &managedOnly=true                   409 unless GenMLX put it there (the master's prune)
GET    /api/v1/models/{name}/files         {"name", "source", "revision", "commit", "files"}
GET    /api/v1/models/{name}/files/{path}  the file (Range: one range; ETag: its sha256); HEAD too
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tornado.ioloop import IOLoop

from genmlx.agent.api.base import AgentHandler
from genmlx.agent.ranks.supervisor import RankSupervisor
from genmlx.agent.store.file_serving import (
    CorruptFile,
    ServedFile,
    VerifiedFiles,
    complete_model_metadata,
    locate_model_file,
    parse_byte_range,
    send_file_range,
)
from genmlx.agent.store.metadata import InvalidMetadata, read_metadata, safe_model_name
from genmlx.agent.store.model_store import remove_model
from genmlx.agent.transfers.fetch_request import file_source_path, parse_fetch_request
from genmlx.agent.transfers.manager import TransferManager
from genmlx.core.errors import AgentConflict, AgentNotFound
from genmlx.core.http import ClusterAuth
from genmlx.wire.agent_state import RankInfo

log = logging.getLogger(__name__)


class ModelInUse(AgentConflict):
    """A model cannot be deleted while a rank runs on it or a transfer writes it."""


class NothingToRemove(AgentNotFound):
    """No model or partial directory of that name in any storage path."""


class ModelNotManaged(AgentConflict):
    """A prune named a directory GenMLX did not put there: a user's own, or a ``file://`` source
    used in place. Those are never deleted by the master."""


class ModelsHandler(AgentHandler):
    def initialize(self, auth: ClusterAuth, transfers: TransferManager) -> None:
        super().initialize(auth)
        self.transfers = transfers

    async def post(self) -> None:
        outcome = await self.transfers.fetch(parse_fetch_request(self.request.body))
        if outcome.present is not None:
            self.write({"model": outcome.present.to_json()})
        else:
            self.set_status(202)
            self.write({"transfer": outcome.transfer.to_json() if outcome.transfer else None})


class ModelHandler(AgentHandler):
    def initialize(
        self,
        auth: ClusterAuth,
        storage_paths: tuple[Path, ...],
        supervisor: RankSupervisor,
        transfers: TransferManager,
    ) -> None:
        super().initialize(auth)
        self.storage_paths = storage_paths
        self.supervisor = supervisor
        self.transfers = transfers

    async def delete(self, name: str) -> None:
        safe_model_name(name)
        roots = self.storage_roots()
        if self.transfers.is_running(name):
            raise ModelInUse(f"a transfer of {name} is under way")
        users = ranks_using(self.supervisor.ranks(), [root / name for root in roots])
        if users:
            raise ModelInUse(f"{name} is in use by running rank(s) {', '.join(users)}: stop them first")
        managed_only = self.get_query_argument("managedOnly", "") in ("1", "true")
        removed = await IOLoop.current().run_in_executor(None, remove_from, roots, name, managed_only)
        self.transfers.forget(name)
        if not removed:
            raise NothingToRemove(f"no model {name!r} in {', '.join(str(r) for r in roots)}")
        log.info("removed model %s: %s", name, ", ".join(str(p) for p in removed))
        self.write({"removed": [str(p) for p in removed]})

    def storage_roots(self) -> tuple[Path, ...]:
        """Every storage path, or only the one ``?storagePath=`` names (which must be ours)."""
        storage_path = self.get_query_argument("storagePath", None)
        if storage_path is None:
            return self.storage_paths
        return (self.transfers.storage_root(storage_path),)


class StoredFilesEndpoint(AgentHandler):
    """An endpoint over the models' files and what the agent knows of their hashes."""

    def initialize(self, auth: ClusterAuth, storage_paths: tuple[Path, ...], verified: VerifiedFiles) -> None:
        super().initialize(auth)
        self.storage_paths = storage_paths
        self.verified = verified


class ModelFilesHandler(StoredFilesEndpoint):
    async def get(self, name: str) -> None:
        _, metadata = await IOLoop.current().run_in_executor(
            None, complete_model_metadata, self.storage_paths, name, self.verified
        )
        self.write({"name": name, **metadata.to_json()})


class ModelFileHandler(StoredFilesEndpoint):
    signs_reply_body = False  # the receiver checks the bytes against the signed listing's sha256

    async def get(self, name: str, path: str) -> None:
        await self.serve(name, path, send_body=True)

    async def head(self, name: str, path: str) -> None:
        await self.serve(name, path, send_body=False)

    async def serve(self, name: str, path: str, send_body: bool) -> None:
        served = await IOLoop.current().run_in_executor(
            None, locate_model_file, self.storage_paths, name, path, self.verified
        )
        if self.verified.verdict(served) == "corrupt":
            raise CorruptFile(f"{path} of model {name} does not match its recorded sha256 on this agent")
        size = served.file.size
        byte_range = parse_byte_range(self.request.headers.get("Range"), size)
        first, last = byte_range or (0, size - 1)
        self.set_response_headers(served, first, last, partial=byte_range is not None)
        if send_body and last >= first:
            sent = await send_file_range(self, served, first, last, self.verified)
            log.info(
                "served %s/%s bytes %d-%d: %d bytes to %s",
                name,
                path,
                first,
                last,
                sent,
                self.request.remote_ip,
            )

    def set_response_headers(self, served: ServedFile, first: int, last: int, partial: bool) -> None:
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Accept-Ranges", "bytes")
        self.set_header("ETag", f'"{served.file.sha256}"')
        self.set_header("Content-Length", str(last - first + 1))
        if partial:
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {first}-{last}/{served.file.size}")


def ranks_using(ranks: tuple[RankInfo, ...], model_dirs: list[Path]) -> list[str]:
    """The keys of running ranks whose model path is one of ``model_dirs`` (symlinks resolved)."""
    real_dirs = {os.path.realpath(d) for d in model_dirs}
    return [
        r.launch.key
        for r in ranks
        if r.state == "running" and os.path.realpath(r.launch.model_path) in real_dirs
    ]


def remove_from(storage_paths: tuple[Path, ...], name: str, managed_only: bool) -> list[Path]:
    """Remove model ``name`` (and its partial directory) from each storage path. With
    ``managed_only`` a directory GenMLX did not put there is refused before anything is removed."""
    if managed_only:
        for root in storage_paths:
            refuse_unmanaged(root / name)
    return [path for root in storage_paths for path in remove_model(root, name)]


def refuse_unmanaged(model_dir: Path) -> None:
    """Raise ``ModelNotManaged`` for a directory without our metadata, or for a ``file://`` source
    adopted where it lies (its metadata names the directory itself)."""
    if not model_dir.is_dir() or model_dir.is_symlink():
        return  # remove_model leaves it alone anyway
    try:
        metadata = read_metadata(model_dir)
    except InvalidMetadata:
        metadata = None
    if metadata is None or metadata.source is None:
        raise ModelNotManaged(f"{model_dir} has no GenMLX metadata: a directory of yours is never pruned")
    source = metadata.source
    if source.startswith("file://") and os.path.realpath(file_source_path(source)) == os.path.realpath(
        model_dir
    ):
        raise ModelNotManaged(f"{model_dir} is the file:// source {source} itself: it is never pruned")
