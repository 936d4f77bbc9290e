"""The agent's HTTP API: thin tornado handlers over the inventory, the rank supervisor, the model
store and the transfer manager (the model endpoints are in ``model_api``). Each handler takes the
collaborators it uses as ``initialize`` keywords; ``make_app`` hands them out.

    GET    /healthz                          no token; {"status": "ok"} and nothing else
    GET    /api/v1/state                     AgentState JSON
    POST   /api/v1/ranks                     RankLaunch JSON -> 201 RankInfo JSON
    DELETE /api/v1/ranks/{model}/{rank}      200 RankInfo JSON once the process is gone
    GET    /api/v1/ranks/{model}/{rank}/log  text/plain tail of the rank's log (?tail=BYTES)
    POST   /api/v1/models                    FetchRequest JSON -> 202 {"transfer"} | 200 {"model"}
    DELETE /api/v1/models/{name}             200 {"removed": [paths]} (?storagePath=P&managedOnly=true)
    GET    /api/v1/models/{name}/files       the model's source, revision, commit and files
    GET    /api/v1/models/{name}/files/{path}  a file's bytes, with Range support
    POST   /api/v1/token                     a rotated token, sealed for this node -> {"keyId"}
    GET    /api/v1/telemetry                 TelemetryReport JSON: the samples after ?since=UNIX_TIME

Everything but ``/healthz`` needs a request signed with the cluster token's key
(``Authorization: GenMLX-HMAC-SHA256 ...``, ``genmlx.core.signing``); the token itself is refused.
Errors are raised as typed exceptions and rendered once, by ``genmlx.core.http.ApiHandler.write_error``, as
``{"error": {"message", "type"}}``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tornado.ioloop import IOLoop
from tornado.web import Application, HTTPError

import genmlx
from genmlx.agent.api.base import AgentHandler
from genmlx.agent.api.link_api import LinkCheckHandler, LinkProbeHandler
from genmlx.agent.api.model_api import ModelFileHandler, ModelFilesHandler, ModelHandler, ModelsHandler
from genmlx.agent.facts.collect import collect_node_facts
from genmlx.agent.links.verify import LinkVerifier
from genmlx.agent.ranks.launch_request import parse_rank_launch
from genmlx.agent.ranks.logs import DEFAULT_TAIL_BYTES, read_log_tail
from genmlx.agent.ranks.rdma_checks import check_rdma_launch
from genmlx.agent.ranks.supervisor import RankSupervisor
from genmlx.agent.store.file_serving import VerifiedFiles
from genmlx.agent.store.inventory import resolve_model_dir, scan_storage
from genmlx.agent.store.prompt_caches import clear_prompt_cache, prompt_cache_root, scan_prompt_caches
from genmlx.agent.telemetry.sampler import TelemetrySampler
from genmlx.agent.transfers.manager import TransferManager
from genmlx.core.errors import AgentConflict, AgentRequestError
from genmlx.core.http import ClusterAuth
from genmlx.core.signing import Keys
from genmlx.core.tokens import TokenFile, TokenSource, unseal_token, write_token_file
from genmlx.wire.agent_state import AgentState
from genmlx.wire.telemetry import TelemetryReport, since_time

log = logging.getLogger(__name__)


def make_app(
    *,
    name: str,
    token: str | TokenSource,
    storage_paths: tuple[Path, ...],
    supervisor: RankSupervisor,
    transfers: TransferManager,
    verified: VerifiedFiles,
    node_id: str = "",
    links: LinkVerifier | None = None,
    telemetry: TelemetrySampler | None = None,
) -> Application:
    """The agent's tornado application; ``verified`` is the one the transfer manager fills."""
    cluster_auth = ClusterAuth(token, accepts_bearer=False)
    auth = {"auth": cluster_auth}
    links = links or LinkVerifier(lambda: cluster_auth.keys)
    telemetry = telemetry or TelemetrySampler(storage_paths)  # not started: reports no samples
    stored = {**auth, "storage_paths": storage_paths, "verified": verified}
    ranks = {**auth, "supervisor": supervisor}
    state = {
        **ranks,
        "name": name,
        "node_id": node_id,
        "storage_paths": storage_paths,
        "transfers": transfers,
    }
    rank = r"/api/v1/ranks/([^/]+)/([0-9]+)"
    model = r"/api/v1/models/([^/]+)"
    routes = [
        (r"/healthz", HealthzHandler, auth),
        (r"/api/v1/state", StateHandler, state),
        (r"/api/v1/ranks", RanksHandler, {**ranks, "storage_paths": storage_paths, "links": links}),
        (rank, RankHandler, ranks),
        (rank + "/log", RankLogHandler, ranks),
        (r"/api/v1/models", ModelsHandler, {**auth, "transfers": transfers}),
        (model, ModelHandler, {**ranks, "storage_paths": storage_paths, "transfers": transfers}),
        (model + "/files", ModelFilesHandler, stored),
        (model + "/files/(.+)", ModelFileHandler, stored),
        (r"/api/v1/token", TokenHandler, {**auth, "name": name}),
        (r"/api/v1/links/check", LinkCheckHandler, {**auth, "links": links}),
        (r"/api/v1/prompt-caches/([^/]+)", PromptCacheHandler, auth),
        (r"/api/v1/links/probe", LinkProbeHandler, auth),
        (r"/api/v1/telemetry", TelemetryHandler, {**auth, "telemetry": telemetry}),
    ]
    return Application(routes, default_handler_class=NotFoundHandler, default_handler_args=auth)


class PromptCacheHandler(AgentHandler):
    """``DELETE /api/v1/prompt-caches/MODEL``: empty the model's prompt cache on this node's disk
    (every namespace: all weights and ranks); answers what it held."""

    async def delete(self, model: str) -> None:
        held = await IOLoop.current().run_in_executor(None, clear_prompt_cache, prompt_cache_root(), model)
        log.info("cleared the prompt cache of %s: %d blocks, %d bytes", model, held.blocks, held.bytes)
        self.write(held.to_json())


class TelemetryHandler(AgentHandler):
    """``GET /api/v1/telemetry?since=UNIX_TIME``: the node's samples taken after that time (all
    that are kept, the last five minutes, without it)."""

    def initialize(self, auth: ClusterAuth, telemetry: TelemetrySampler) -> None:
        super().initialize(auth)
        self.telemetry = telemetry

    def get(self) -> None:
        try:
            since = since_time(self.get_query_argument("since", "0"))
        except ValueError:
            raise InvalidTelemetryQuery("since must be a unix time in seconds") from None
        report = TelemetryReport(self.telemetry.interval_s, self.telemetry.since(since))
        self.write(report.to_json())


class InvalidTelemetryQuery(AgentRequestError):
    """A telemetry query was malformed (HTTP 400)."""


class HealthzHandler(AgentHandler):
    requires_token = False

    def get(self) -> None:
        self.write({"status": "ok"})


class StateHandler(AgentHandler):
    def initialize(
        self,
        auth: ClusterAuth,
        name: str,
        node_id: str,
        storage_paths: tuple[Path, ...],
        supervisor: RankSupervisor,
        transfers: TransferManager,
    ) -> None:
        super().initialize(auth)
        self.name = name
        self.node_id = node_id
        self.storage_paths = storage_paths
        self.supervisor = supervisor
        self.transfers = transfers

    async def get(self) -> None:
        loop = IOLoop.current()
        facts = await loop.run_in_executor(None, collect_node_facts)
        storage = await loop.run_in_executor(None, scan_storage, self.storage_paths)
        prompt_caches = await loop.run_in_executor(None, scan_prompt_caches, prompt_cache_root())
        ranks, transfers = self.supervisor.ranks(), self.transfers.transfers()
        state = AgentState(
            self.name,
            genmlx.__version__,
            facts,
            storage,
            ranks,
            transfers,
            node_id=self.node_id,
            key_id=self.auth.keys.signing_id,
            prompt_caches=prompt_caches,
        )
        self.write(state.to_json())


class RankEndpoint(AgentHandler):
    """An endpoint over the rank supervisor."""

    def initialize(self, auth: ClusterAuth, supervisor: RankSupervisor) -> None:
        super().initialize(auth)
        self.supervisor = supervisor


class RanksHandler(RankEndpoint):
    def initialize(
        self,
        auth: ClusterAuth,
        supervisor: RankSupervisor,
        storage_paths: tuple[Path, ...],
        links: LinkVerifier,
    ) -> None:
        super().initialize(auth, supervisor)
        self.storage_paths = storage_paths
        self.links = links

    async def post(self) -> None:
        launch = parse_rank_launch(self.request.body)
        model_dir = await IOLoop.current().run_in_executor(
            None, resolve_model_dir, launch.model_path, self.storage_paths
        )
        if launch.backend != "ring":
            facts = await IOLoop.current().run_in_executor(None, collect_node_facts)
            check_rdma_launch(launch, facts, self.links.down())
        info = self.supervisor.start(launch, model_dir)
        self.set_status(201)
        self.write(info.to_json())


class RankHandler(RankEndpoint):
    async def delete(self, model: str, rank: str) -> None:
        info = await self.supervisor.stop(model, int(rank))
        self.write(info.to_json())


class RankLogHandler(RankEndpoint):
    async def get(self, model: str, rank: str) -> None:
        path = self.supervisor.log_path(model, int(rank))
        tail = await IOLoop.current().run_in_executor(None, read_log_tail, path, self.tail_bytes())
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.write(tail)

    def tail_bytes(self) -> int:
        raw = self.get_query_argument("tail", None)
        if raw is None:
            return DEFAULT_TAIL_BYTES
        if not raw.isdigit():
            raise AgentRequestError(f"tail: {raw!r} is not a number of bytes")
        return int(raw)


class TokenHandler(AgentHandler):
    """``POST /api/v1/token``: the master pushes a rotated token, sealed for this node under the key
    of the token this agent holds (and signed with it). The agent writes it to its token file with
    the one it replaces kept until ``until``; everything that reads the file (this agent, its
    ranks) takes it within a second."""

    def initialize(self, auth: ClusterAuth, name: str) -> None:
        super().initialize(auth)
        self.name = name

    def post(self) -> None:
        body = self.json_body()
        path, held = self.auth.tokens.path, self.auth.tokens.current()
        if path is None:
            raise AgentConflict("this agent was given its token directly, not in a file it can update")
        if self.signed_by != self.auth.keys.signing:
            raise AgentConflict("this agent already holds a newer token than the one the push is signed with")
        try:
            new_token = unseal_token(body, self.signed_by, self.name)
            until = float(body["until"])
        except (KeyError, TypeError, ValueError) as e:
            raise AgentRequestError(f"the pushed token cannot be used: {e}") from None
        write_token_file(path, TokenFile(new_token, held.current, until))
        log.info("took a rotated cluster token; the previous one counts until %s", time.ctime(until))
        self.write({"keyId": Keys.of(new_token).signing_id})


class NotFoundHandler(AgentHandler):
    """Unknown paths: 401 without the token (so they reveal nothing), else a JSON 404."""

    def prepare(self) -> None:
        super().prepare()
        raise HTTPError(404, "no such endpoint on this agent")
