"""The master's HTTP surface: liveness, status, apply, and the OpenAI and Anthropic router under
``/v1``.

Everything but ``/healthz`` and the status page's files needs a request signed with the cluster
token's key (as the CLI sends) or the token as a bearer token (as API clients send); a client key
(``client_keys``) reaches the models under ``/v1`` only; the page's session cookie (``ui_auth``)
reads status, events, the stream and the client snippets (``integrations``), nothing else.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado.web import Application

from genmlx.core.errors import Forbidden, InvalidManifest, InvalidRequest, ManifestError, UnknownRoute
from genmlx.core.http import ApiHandler, ClientKey, ClusterAuth
from genmlx.manifest import load_manifest_text
from genmlx.manifest.types import Manifest
from genmlx.master.api.client_keys import ClientKeys
from genmlx.master.api.integrations import IntegrationsHandler
from genmlx.master.api.join import join_routes
from genmlx.master.api.proxy import (
    AnthropicProxyHandler,
    ModelsHandler,
    ProxyHandler,
    UnknownMessagesRouteHandler,
)
from genmlx.master.api.responses import ResponsesProxyHandler, StoredResponseHandler
from genmlx.master.api.stream import EventsHandler, ReadEndpoint, StreamHandler, current_status
from genmlx.master.api.ui_handlers import ui_routes
from genmlx.master.planning.actions import describe_plan, plan_summary
from genmlx.master.runtime.loop import ApplyOutcome, Reconciler
from genmlx.master.runtime.prompt_caches import clear_model_prompt_cache
from genmlx.master.runtime.responses import ResponseStore
from genmlx.master.runtime.telemetry import NodeTelemetry
from genmlx.wire.agent_state import PromptCacheReport
from genmlx.wire.codec import WireError, decode
from genmlx.wire.status import Revision
from genmlx.wire.telemetry import since_time

PREVIEW_TIMEOUT_S = 10.0


class HealthzHandler(ApiHandler):
    requires_token = False

    def get(self) -> None:
        self.write_json(200, {"status": "ok"})


class TelemetryHandler(ReadEndpoint):
    """``GET /api/v1/telemetry[?since=UNIX_TIME]``: each node's samples and each serving model's
    points of the last five minutes (after ``since``), oldest first: ``{"nodes": {NAME:
    [TelemetrySample, ...]}, "models": {NAME: [ServingSample, ...]}}``."""

    def initialize(self, telemetry: NodeTelemetry, **deps: Any) -> None:
        super().initialize(**deps)
        self.telemetry = telemetry

    def get(self) -> None:
        try:
            since = since_time(self.get_argument("since", "0"))
        except ValueError:
            raise InvalidRequest("since must be a unix time in seconds", param="since") from None
        nodes = self.telemetry.series(since)
        models = self.telemetry.serving.series(since) if self.telemetry.serving else {}
        self.write_json(
            200,
            {
                "nodes": {node: [s.to_json() for s in samples] for node, samples in nodes.items()},
                "models": {model: [p.to_json() for p in points] for model, points in models.items()},
            },
        )


class StatusHandler(ReadEndpoint):
    """``GET /api/v1/status``: the status document."""

    def get(self) -> None:
        self.write_json(200, current_status(self.reconciler))


def revision_of(body: dict[str, Any]) -> Revision | None:
    """The ``revision`` an apply names (the git commit its file was read at), checked."""
    if body.get("revision") is None:
        return None
    try:
        return decode(Revision, body["revision"], path="revision")
    except WireError as e:
        raise InvalidRequest(str(e), param="revision") from None


class ManifestHandler(ApiHandler):
    """``POST`` applies a manifest: ``{"manifest": YAML, "filename", "revision", "dryRun"}``.
    Answers the generation, whether the manifest changed, and the plan: what the master will now
    do, or with ``dryRun`` what it would do (nothing is applied then)."""

    def initialize(self, auth: ClusterAuth, reconciler: Reconciler) -> None:
        super().initialize(auth)
        self.reconciler = reconciler

    def get(self) -> None:
        applied = self.reconciler.applied
        if applied is None:
            raise UnknownRoute("No manifest has been applied yet.", code="no_manifest")
        self.write_json(
            200, {"manifest": applied.text, "filename": applied.filename, "generation": applied.generation}
        )

    async def post(self) -> None:
        body = self.json_body()
        text, filename = body.get("manifest"), body.get("filename") or "cluster.yaml"
        if not isinstance(text, str):
            raise InvalidRequest("'manifest' must be the manifest's YAML text.", param="manifest")
        try:
            if body.get("dryRun"):
                return await self.dry_run(load_manifest_text(text, filename))
            outcome = self.reconciler.apply(text, filename, revision_of(body))
        except ManifestError as e:
            issues = [str(i) for i in e.issues]
            raise InvalidManifest("The manifest is invalid; nothing was applied.", issues=issues) from None
        document = {"generation": outcome.applied.generation, "changed": outcome.changed}
        self.write_json(200, {**document, **await self.executed_plan(outcome)})

    async def executed_plan(self, outcome: ApplyOutcome) -> dict[str, Any]:
        """The plan of the loop's first pass over the applied manifest: the one it carries out."""
        try:
            planned = self.reconciler.planned(outcome.after_pass)
            snapshot = await asyncio.wait_for(planned, PREVIEW_TIMEOUT_S)
        except TimeoutError:
            late = f"the master has not planned within {PREVIEW_TIMEOUT_S:.0f} s (an agent is slow to answer)"
            return {"plan": None, "summary": f"{late}: `genmlx status` shows what it does"}
        lines = describe_plan(list(snapshot.planned))
        summary = plan_summary(lines)
        if snapshot.generation != outcome.applied.generation:
            summary += f" (the plan of generation {snapshot.generation}, applied meanwhile)"
        return {"plan": lines, "summary": summary}

    async def dry_run(self, manifest: Manifest) -> None:
        applied = self.reconciler.applied
        document = {
            "generation": applied.generation if applied else 0,
            "changed": applied is None or applied.manifest != manifest,
        }
        self.write_json(200, {**document, **await self.preview(manifest)})

    async def preview(self, manifest: Manifest) -> dict[str, Any]:
        """What a pass would do for ``manifest`` now (a dry run: nothing carries it out)."""
        try:
            actions = await asyncio.wait_for(self.reconciler.preview(manifest), PREVIEW_TIMEOUT_S)
        except TimeoutError:
            return {"plan": None, "summary": "the cluster did not answer in time to preview the plan"}
        lines = describe_plan(actions)
        return {"plan": lines, "summary": plan_summary(lines)}


class LinksVerifyHandler(ApiHandler):
    """``POST /api/v1/links/verify``: check every cabled Thunderbolt link from both ends now, and
    answer the links as the pass after the checks shows them (``{"links": [...]}``)."""

    def initialize(self, auth: ClusterAuth, reconciler: Reconciler) -> None:
        super().initialize(auth)
        self.reconciler = reconciler

    async def post(self) -> None:
        links = await self.reconciler.verify_links()
        self.write_json(200, {"links": [link.to_json() for link in links]})


class PromptCacheHandler(ApiHandler):
    """``DELETE /api/v1/models/NAME/prompt-cache``: empty the model's prompt cache on the disks of
    its nodes; by node, what each held (``bytes``, ``blocks``) or the ``error`` it met."""

    def initialize(self, auth: ClusterAuth, reconciler: Reconciler) -> None:
        super().initialize(auth)
        self.reconciler = reconciler

    async def delete(self, model: str) -> None:
        applied = self.reconciler.applied
        outcome = await clear_model_prompt_cache(
            applied.manifest if applied else None, self.reconciler.proven_clients(), model
        )
        self.reconciler.wake()  # the next pass reports the emptied caches
        nodes = [
            {"node": node, **(held.to_json() if isinstance(held, PromptCacheReport) else {"error": held})}
            for node, held in outcome.items()
        ]
        self.write_json(200, {"model": model, "nodes": nodes})


class KeysHandler(ApiHandler):
    """``GET /api/v1/keys``: every client key of the applied manifest, its scope and its use."""

    def initialize(self, auth: ClusterAuth, keys: ClientKeys) -> None:
        super().initialize(auth)
        self.keys = keys

    def get(self) -> None:
        self.write_json(200, {"keys": self.keys.report()})


class MetricsHandler(ApiHandler):
    """``GET /metrics``: the client keys' requests, tokens and refusals, every node's latest
    telemetry and every serving model's own metrics, in Prometheus' format. Besides the token, a
    client key with ``metrics: true`` reads it (what a Prometheus server is given)."""

    def initialize(self, auth: ClusterAuth, keys: ClientKeys) -> None:
        super().initialize(auth)
        self.keys = keys

    def admits_client_key(self, key: ClientKey) -> bool:
        if not key.metrics:
            raise Forbidden(
                f"The API key {key.name!r} does not read /metrics: give its entry in cluster.yaml "
                "`metrics: true` (genmlx key create NAME --metrics), or send the cluster token."
            )
        return True

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.keys.registry))


def make_app(
    reconciler: Reconciler,
    token: str,
    responses: ResponseStore,
    telemetry: NodeTelemetry | None = None,
    package_dir: Path | None = None,
) -> Application:
    """The master's HTTP API; ``package_dir`` keeps the wheels it offers joining nodes."""
    keys = ClientKeys(reconciler)
    telemetry = telemetry or NodeTelemetry(lambda: reconciler.proven_clients())  # not run: no samples
    keys.registry.register(telemetry)  # /metrics: each node's latest sample
    cluster_auth = ClusterAuth(token, keyring=keys)
    auth = {"auth": cluster_auth}
    deps = {**auth, "reconciler": reconciler}
    routed = {**deps, "keys": keys}
    page, sessions = ui_routes(cluster_auth)
    # Only the endpoints given ``sessions`` (status, events, stream, integrations) let the page in.
    readable = {**deps, "sessions": sessions}
    return Application(
        [
            (r"/healthz", HealthzHandler, auth),
            (r"/api/v1/status", StatusHandler, readable),
            (r"/api/v1/manifest", ManifestHandler, deps),
            (r"/api/v1/events", EventsHandler, readable),
            (r"/api/v1/stream", StreamHandler, readable),
            (r"/api/v1/integrations", IntegrationsHandler, readable),
            (r"/api/v1/telemetry", TelemetryHandler, {**readable, "telemetry": telemetry}),
            (r"/api/v1/keys", KeysHandler, {**auth, "keys": keys}),
            (r"/api/v1/links/verify", LinksVerifyHandler, deps),
            (r"/api/v1/models/([^/]+)/prompt-cache", PromptCacheHandler, deps),
            (r"/metrics", MetricsHandler, {**auth, "keys": keys}),
            *page,
            *join_routes(
                cluster_auth, reconciler, package_dir or Path(tempfile.mkdtemp(prefix="genmlx-packages-"))
            ),
            (r"/v1/models(?:/(.+))?", ModelsHandler, deps),
            (r"/v1/responses", ResponsesProxyHandler, {**routed, "responses": responses}),
            (r"/v1/responses/([^/]+)", StoredResponseHandler, {**auth, "responses": responses}),
            (r"/v1/(messages(?:/count_tokens)?)", AnthropicProxyHandler, routed),
            (r"/v1/messages/.*", UnknownMessagesRouteHandler, auth),
            (r"/v1/(.+)", ProxyHandler, routed),
        ]
    )
