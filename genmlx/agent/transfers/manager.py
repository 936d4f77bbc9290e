"""Transfers: making a model present in a storage path, in the background.

Three kinds, chosen by the ``FetchRequest``:

- ``sync`` from a peer agent (``peer_sync``);
- ``download`` of an ``hf://org/repo`` source (``hf_download.download_model``), published with
  the commit the revision resolved to;
- ``download`` of a ``file:///path`` source, which is used where it lies: a directory inside one
  of the storage paths is adopted in place (hashed, metadata written), never copied.

Each runs as an asyncio task whose blocking work is in a worker thread. A running transfer shows
in ``AgentState.transfers`` with its bytes done and total; a finished one stays reported (done, or
failed with its error and whether it is permanent) until the next request for the model replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from genmlx.agent.store.file_serving import VerifiedFiles
from genmlx.agent.store.inventory import describe_model_dir, directory_size, find_complete_model
from genmlx.agent.store.metadata import ModelMetadata, read_metadata
from genmlx.agent.store.model_store import (
    DownloadResult,
    VerificationFailed,
    adopt,
    check_room,
    holds_revision,
    is_bare_model_dir,
    is_complete,
    partial_dir,
    publish,
    verify_files,
)
from genmlx.agent.transfers.fetch_request import file_source_path, hub_repo
from genmlx.agent.transfers.peer_sync import sync_model
from genmlx.agent.transfers.progress import TransferCancelled, TransferProgress
from genmlx.core.errors import AgentConflict, AgentRequestError, GenMLXError, PermanentError
from genmlx.core.threads import run_in_worker_thread
from genmlx.core.tokens import TokenSource
from genmlx.wire.agent_state import FetchRequest, StoredModel, Transfer, TransferKind, TransferState

log = logging.getLogger(__name__)

# (repo, revision, dest, progress(done, total), token) -> the commit and the verified files
DownloadFunction = Callable[[str, str, Path, Callable[[int, int | None], None], str | None], DownloadResult]
STOP_WAIT_S = 5.0


class StoragePathRefused(AgentRequestError):
    """The request named a storage path this agent does not have."""


class TransferRunning(AgentConflict):
    """A transfer of the same model is already under way."""


class UnusableFileSource(PermanentError):
    """A ``file://`` source that is not a model directory inside a storage path (the agent uses
    such models in place, never copies them)."""


@dataclass(frozen=True)
class FetchOutcome:
    """What a fetch request led to: the model already present, or a transfer started."""

    present: StoredModel | None = None
    transfer: Transfer | None = None


@dataclass
class TransferRecord:
    """The manager's mutable record of one transfer."""

    request: FetchRequest
    kind: TransferKind
    origin: str
    storage_root: Path
    started_at: float = field(default_factory=time.time)
    progress: TransferProgress = field(default_factory=TransferProgress)
    state: TransferState = "running"
    error: str | None = None
    permanent: bool = False
    task: asyncio.Future | None = None

    def snapshot(self) -> Transfer:
        return Transfer(
            model=self.request.model,
            kind=self.kind,
            origin=self.origin,
            storage_path=str(self.storage_root),
            state=self.state,
            bytes_done=self.progress.done,
            bytes_total=self.progress.total,
            error=self.error,
            permanent=self.permanent,
            started_at=self.started_at,
        )


def describe_origin(request: FetchRequest) -> tuple[TransferKind, str]:
    if request.peer is not None:
        return "sync", f"peer {request.peer}/{request.peer_model or request.model}"
    if (request.source or "").startswith("hf://"):
        return "download", f"{request.source}@{request.revision}"
    return "download", request.source or ""


class TransferManager:
    """Starts, tracks and (when the agent stops) cancels this agent's transfers. Lives on the event
    loop; the bytes move in its worker threads."""

    def __init__(
        self,
        storage_paths: tuple[Path, ...],
        token: str | TokenSource,
        verified: VerifiedFiles,
        *,
        download: DownloadFunction | None = None,
    ):
        self._storage_paths = storage_paths
        # Signs requests to peers (never sent, never logged); followed through a rotation.
        self._tokens = token if isinstance(token, TokenSource) else TokenSource.fixed(token)
        self._verified = verified
        self._download = download
        self._records: dict[str, TransferRecord] = {}

    def transfers(self) -> tuple[Transfer, ...]:
        return tuple(record.snapshot() for _, record in sorted(self._records.items()))

    def is_running(self, model: str) -> bool:
        record = self._records.get(model)
        return record is not None and record.state == "running"

    def forget(self, model: str) -> None:
        """Drop the finished transfer of ``model`` (the model was deleted, or is present now)."""
        if not self.is_running(model):
            self._records.pop(model, None)

    async def fetch(self, request: FetchRequest) -> FetchOutcome:
        """Start a transfer for ``request``, unless the model is already complete in one of the
        storage paths (then say where). Raises ``StoragePathRefused`` or ``TransferRunning``."""
        root = self.storage_root(request.storage_path)
        self.refuse_if_running(request.model)
        present = await asyncio.get_running_loop().run_in_executor(None, self.find_present, request)
        if present is not None:
            self.forget(request.model)  # an old failure is no news once the model is there
            return FetchOutcome(present=present)
        self.refuse_if_running(request.model)  # another request may have started it meanwhile
        kind, origin = describe_origin(request)
        record = TransferRecord(request, kind, origin, root)
        self._records[request.model] = record
        record.task = asyncio.ensure_future(self._run(record))
        log.info("transfer of %s into %s started from %s", request.model, root, origin)
        return FetchOutcome(transfer=record.snapshot())

    def storage_root(self, storage_path: str) -> Path:
        """The storage path a request names, which must be one of this agent's own."""
        for root in self._storage_paths:
            if storage_path in (str(root), os.path.realpath(root)):
                return root
        where = ", ".join(str(p) for p in self._storage_paths) or "none configured"
        raise StoragePathRefused(f"storagePath: {storage_path} is not a storage path of this agent ({where})")

    def refuse_if_running(self, model: str) -> None:
        if self.is_running(model):
            raise TransferRunning(f"a transfer of {model} is already under way")

    def find_present(self, request: FetchRequest) -> StoredModel | None:
        """The model, complete in any storage path; for a file:// source, that directory once adopted."""
        found = find_complete_model(self._storage_paths, request.model)
        if found is not None and (request.source or "").startswith("hf://"):
            metadata = read_metadata(found)
            if metadata is not None and not holds_revision(metadata, request.source or "", request.revision):
                found = None  # another revision: fetch this one, replacing it once verified
        if (request.source or "").startswith("file://") and request.peer is None:
            source_dir = Path(file_source_path(request.source or ""))
            adopted = (
                self.storage_holding(source_dir) and is_complete(source_dir) and read_metadata(source_dir)
            )
            if found is not None and os.path.realpath(found) == os.path.realpath(source_dir):
                found = source_dir if adopted else None  # not adopted yet: do it, to record its source
            elif found is None and adopted:
                found = source_dir
        return describe_model_dir(found) if found is not None else None

    def storage_holding(self, directory: Path) -> Path | None:
        """The storage path that ``directory`` (symlinks resolved) lies inside, if any."""
        real = Path(os.path.realpath(directory))
        for root in self._storage_paths:
            real_root = Path(os.path.realpath(root))
            if real != real_root and real.is_relative_to(real_root):
                return root
        return None

    async def stop_all(self) -> None:
        """Cancel every running transfer; each stops within a chunk (partial directories stay, so
        the next request resumes). A worker that does not stop in time is abandoned: it is a
        daemon thread, so it does not keep the agent alive."""
        running = [r.task for r in self._records.values() if r.state == "running" and r.task is not None]
        for record in self._records.values():
            record.progress.cancel()
        if running:
            await asyncio.wait(running, timeout=STOP_WAIT_S)

    async def _run(self, record: TransferRecord) -> None:
        try:
            final, metadata = await run_in_worker_thread(
                f"transfer-{record.request.model}", self.execute, record
            )
        except TransferCancelled as e:
            record.state, record.error = "failed", str(e)
            log.info("transfer of %s stopped: %s (the next request resumes it)", record.request.model, e)
        except PermanentError as e:
            self.record_failure(record, e, permanent=True)
        except GenMLXError as e:
            self.record_failure(record, e, permanent=False)
        except Exception:
            log.exception("transfer of %s failed unexpectedly", record.request.model)
            record.state, record.error = "failed", "internal error: see the agent's log"
        else:
            record.progress.done = record.progress.total = metadata.total_bytes
            record.state = "done"
            log.info("transfer of %s done: %s", record.request.model, final)

    def record_failure(self, record: TransferRecord, error: GenMLXError, permanent: bool) -> None:
        record.state, record.error, record.permanent = "failed", str(error), permanent
        how = "permanently" if permanent else "for now"
        log.warning("transfer of %s from %s failed %s: %s", record.request.model, record.origin, how, error)

    def execute(self, record: TransferRecord) -> tuple[Path, ModelMetadata]:
        """The blocking part of a transfer, in a worker thread; remembers what it verified."""
        request, root, progress = record.request, record.storage_root, record.progress
        if request.peer is not None:
            final, metadata = sync_model(request, root, self._tokens.token, progress)
        elif (request.source or "").startswith("hf://"):
            final, metadata = self.download_from_hub(request, root, progress)
        else:
            final, metadata = self.adopt_file_source(request, progress)
        self._verified.remember_model(final, metadata.files)
        return final, metadata

    def download_from_hub(
        self, request: FetchRequest, root: Path, progress: TransferProgress
    ) -> tuple[Path, ModelMetadata]:
        partial = partial_dir(root, request.model)
        partial.mkdir(parents=True, exist_ok=True)
        download = self._download or hub_download_function()
        report = room_checked(progress, root, request.model, partial)
        repo = hub_repo(request.source or "") or ""
        result = download(repo, request.revision, partial, report, os.environ.get("HF_TOKEN") or None)
        metadata = ModelMetadata(request.source, request.revision, result.commit, result.files, time.time())
        # download_model hashed every file as it arrived and matched it against the Hub's listing.
        # A copy already there is of another revision: find_present let this download start.
        final = publish(partial, root, request.model, metadata, replace=True, hashes_checked=True)
        return final, metadata

    def adopt_file_source(
        self, request: FetchRequest, progress: TransferProgress
    ) -> tuple[Path, ModelMetadata]:
        source_dir = self.usable_file_source(request.source or "")
        progress.total = directory_size(source_dir)
        existing = read_metadata(source_dir)
        if existing is None:
            if not is_bare_model_dir(source_dir):
                raise UnusableFileSource(f"{request.source} has no config.json and *.safetensors weights")
            return source_dir, adopt(source_dir)
        problems = verify_files(source_dir, existing.files)  # adopted before: check every byte again
        if problems:
            raise VerificationFailed(source_dir, problems)
        return source_dir, existing

    def usable_file_source(self, source: str) -> Path:
        """The directory of a file:// source, which must lie inside one of the storage paths."""
        source_dir = Path(file_source_path(source))
        if self.storage_holding(source_dir) is None:
            where = ", ".join(str(p) for p in self._storage_paths)
            raise UnusableFileSource(
                f"{source} is not inside a storage path of this agent ({where}): move the model "
                "directory into one of them (file:// sources are used in place, never copied)"
            )
        if not source_dir.is_dir():
            raise UnusableFileSource(f"{source}: no such directory on this agent")
        return source_dir


def room_checked(
    progress: TransferProgress, root: Path, name: str, partial: Path
) -> Callable[[int, int | None], None]:
    """A download's progress callback that also checks, once the total is known, that the rest fits."""
    checked = False

    def report(done: int, total: int | None) -> None:
        nonlocal checked
        if total is not None and not checked:
            checked = True
            check_room(root, name, max(0, total - directory_size(partial)))
        progress.report(done, total)

    return report


def hub_download_function() -> DownloadFunction:
    # Imported on first use: huggingface_hub is slow to import and most agents never download.
    from genmlx.agent.transfers.hf_download import download_model

    return download_model
