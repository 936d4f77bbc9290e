"""The model endpoints of the agent's API: fetch, delete, list a model's files and serve them.

POST   /api/v1/models                      FetchRequest JSON -> 202 {"transfer": Transfer}
                                           or 200 {"model": StoredModel} when already complete
DELETE /api/v1/models/{name}               200 {"removed": [paths]}; 409 while a rank or a
                                           transfer uses it; 404 when there is nothing to remove
GET    /api/v1/models/{name}/files         {"name", "source", "revision", "commit", "files"}
GET    /api/v1/models/{name}/files/{path}  the file (Range: one range; ETag: its sha256); HEAD too
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tornado.ioloop import IOLoop

from genmlx.errors import AgentRequestError
from genmlx.node_state import RankInfo

from .api_base import AgentHandler
from .fetch_request import parse_fetch_request
from .file_serving import (
    CorruptFile,
    ServedFile,
    complete_model_metadata,
    locate_model_file,
    parse_byte_range,
    send_file_range,
)
from .store import remove_model, safe_model_name

log = logging.getLogger(__name__)


class ModelInUse(AgentRequestError):
    """A model cannot be deleted while a rank runs on it or a transfer writes it (HTTP 409)."""

    def __init__(self, message: str):
        super().__init__(message, status=409)


class NothingToRemove(AgentRequestError):
    """No model or partial directory of that name in any storage path (HTTP 404)."""

    def __init__(self, message: str):
        super().__init__(message, status=404)


class ModelsHandler(AgentHandler):
    async def post(self) -> None:
        outcome = await self.deps.transfers.fetch(parse_fetch_request(self.request.body))
        if outcome.present is not None:
            self.write({"model": outcome.present.to_json()})
        else:
            self.set_status(202)
            self.write({"transfer": outcome.transfer.to_json() if outcome.transfer else None})


class ModelHandler(AgentHandler):
    async def delete(self, name: str) -> None:
        safe_model_name(name)
        if self.deps.transfers.is_running(name):
            raise ModelInUse(f"a transfer of {name} is under way")
        dirs = [root / name for root in self.deps.storage_paths]
        users = ranks_using(self.deps.supervisor.ranks(), dirs)
        if users:
            raise ModelInUse(f"{name} is in use by running rank(s) {', '.join(users)}: stop them first")
        removed = await IOLoop.current().run_in_executor(
            None, remove_everywhere, self.deps.storage_paths, name
        )
        self.deps.transfers.forget(name)
        if not removed:
            raise NothingToRemove(f"no model {name!r} on this agent")
        log.info("removed model %s: %s", name, ", ".join(str(p) for p in removed))
        self.write({"removed": [str(p) for p in removed]})


class ModelFilesHandler(AgentHandler):
    async def get(self, name: str) -> None:
        _, metadata = await IOLoop.current().run_in_executor(
            None, complete_model_metadata, self.deps.storage_paths, name, self.deps.verified
        )
        self.write({"name": name, **metadata.to_json()})


class ModelFileHandler(AgentHandler):
    async def get(self, name: str, path: str) -> None:
        await self.serve(name, path, send_body=True)

    async def head(self, name: str, path: str) -> None:
        await self.serve(name, path, send_body=False)

    async def serve(self, name: str, path: str, send_body: bool) -> None:
        served = await IOLoop.current().run_in_executor(
            None, locate_model_file, self.deps.storage_paths, name, path, self.deps.verified
        )
        if self.deps.verified.verdict(served) == "corrupt":
            raise CorruptFile(f"{path} of model {name} does not match its recorded sha256 on this agent")
        size = served.file.size
        byte_range = parse_byte_range(self.request.headers.get("Range"), size)
        first, last = byte_range or (0, size - 1)
        self.set_response_headers(served, first, last, partial=byte_range is not None)
        if send_body and last >= first:
            sent = await send_file_range(self, served, first, last, self.deps.verified)
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


def remove_everywhere(storage_paths: tuple[Path, ...], name: str) -> list[Path]:
    return [path for root in storage_paths for path in remove_model(root, name)]
