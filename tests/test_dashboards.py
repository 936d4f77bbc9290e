"""The Grafana dashboard (``dashboards/grafana-genmlx-cluster.json``) and the Prometheus scrape
config (``dashboards/prometheus.yml``) against what GenMLX exports.

Every query of the dashboard (panels and variables) is parsed with a PromQL parser; every metric
it names must be one a real master's ``/metrics`` exposes (scraped, as the config says, with a
client key that reads metrics only), under the name Prometheus stores it by (a counter's
``_total``, a histogram's ``_bucket``); every label it matches on or groups by must be one that
metric carries. The master serves a model with a disk tier, and a client key has been used, so
every family is there to be checked."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import openai
import promql_parser
import pytest
import test_cluster as harness
import yaml
from agent_harness import call
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from genmlx.core.home import client_key_digest, new_client_key
from genmlx.master.runtime.telemetry import node_gauges
from genmlx.wire.telemetry import GpuSample, InterfaceSample, StorageSample, TelemetrySample

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
DASHBOARD = DASHBOARDS / "grafana-genmlx-cluster.json"
SCRAPE_CONFIG = DASHBOARDS / "prometheus.yml"
# Grafana's own variables, as it fills them in before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)$")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}

KEYS = {"prometheus": new_client_key(), "laptop": new_client_key(), "limited": new_client_key()}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(document: dict) -> Iterator[dict]:
    for panel in document["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def queries(document: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target."""
    return [
        (f"panel {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in panels(document)
        for target in panel.get("targets", [])
    ]


def variable_queries(document: dict) -> list[tuple[str, str, str]]:
    """(variable, metric, label) of every ``label_values`` variable."""
    found = []
    for variable in document["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = LABEL_VALUES.match(variable["query"]["query"])
        assert match, f"variable {variable['name']}: {variable['query']['query']}"
        found.append((variable["name"], match[1], match[2]))
    return found


def selectors(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """The metrics ``expr`` selects, each with the labels its matchers name, and the labels it
    groups by."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    found: list[tuple[str, set[str]]] = []
    grouped: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, {m.name for m in node.matchers.matchers}))
        elif isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
        elif isinstance(node, promql_parser.AggregateExpr):
            if node.modifier is not None:
                grouped.update(node.modifier.labels)
            walk(node.expr)
            if node.param is not None:
                walk(node.param)
        elif isinstance(node, promql_parser.Call):
            for argument in node.args:
                walk(argument)
        elif isinstance(node, promql_parser.BinaryExpr):
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
            walk(node.expr)

    walk(promql_parser.parse(expr))
    return found, grouped


def test_the_dashboard_is_grafana_json_with_a_datasource_variable_and_valid_promql():
    document = dashboard()
    assert document["uid"] == "genmlx-cluster" and document["schemaVersion"] >= 36
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [panel["id"] for panel in panels(document)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    found = queries(document)
    assert len(found) >= 20
    for where, expr in found:
        metrics, _ = selectors(expr)  # raises on a query Prometheus would refuse
        assert metrics, f"{where} names no metric: {expr}"
    for panel in panels(document):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["gridPos"]["w"] <= 24 and panel.get("description"), panel["title"]
    named = {metric for _, expr in found for metric, _ in selectors(expr)[0]}
    for part in ("genmlx_node_", "vllm:", "genmlx:prompt_cache_", "genmlx_client_"):
        assert any(name.startswith(part) for name in named), f"no panel shows {part}*"


def test_the_scrape_config_reads_the_masters_metrics_with_a_metrics_key():
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"], "the key is read from a file, not written here"
    (target,) = job["static_configs"][0]["targets"]
    assert target.endswith(":6789"), "the master's default port"
    assert "genmlx key create prometheus --metrics --models ''" in SCRAPE_CONFIG.read_text()


class ScrapedCluster(harness.Cluster):
    """The demo model with a disk tier, a metrics key for Prometheus and a client key."""

    def manifest_text(self, max_batch: int = 8) -> str:
        entries = [
            {
                "name": "prometheus",
                "sha256": client_key_digest(KEYS["prometheus"]),
                "models": [],
                "metrics": True,
            },
            {"name": "laptop", "sha256": client_key_digest(KEYS["laptop"])},
            {"name": "limited", "sha256": client_key_digest(KEYS["limited"]), "requestsPerMinute": 1},
        ]
        keys = "  auth:\n    apiKeys:\n" + "".join(f"      - {json.dumps(e)}\n" for e in entries)
        return super().manifest_text(max_batch).replace("  nodes:\n", keys + "  nodes:\n", 1)

    def models_text(self, max_batch: int) -> str:
        serving = f"maxBatch: {max_batch}, port: {self.serving_port}, diskCacheGB: 1"
        return self.model_entry(harness.MODEL, self.storage / harness.MODEL, serving)


@pytest.mark.e2e
def test_every_metric_and_label_the_dashboard_queries_is_on_the_masters_metrics(tmp_path, demo_model_dir):
    with harness.ready_cluster(tmp_path, demo_model_dir, ScrapedCluster) as cluster:
        laptop = cluster.client(api_key=KEYS["laptop"])
        prompt = " ".join(f"line {i} of a shared preamble;" for i in range(60))  # a disk block or two
        for _ in range(2):
            laptop.chat.completions.create(
                model=harness.MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4
            )

        limited = cluster.client(api_key=KEYS["limited"])
        limited.models.list()
        with pytest.raises(openai.RateLimitError):  # counted in genmlx_client_rate_limited_total
            limited.models.list()

        def scrape() -> str | None:
            bearer = {"Authorization": f"Bearer {KEYS['prometheus']}"}  # as Prometheus sends it
            reply = call("GET", f"{cluster.url}/metrics", None, headers=bearer)
            assert reply.status == 200, reply.body
            text = reply.body.decode()
            ready = "genmlx_node_cpu_percent{" in text and "genmlx:prompt_cache_disk_written_bytes" in text
            ready = ready and 'genmlx_client_requests_total{key="laptop"}' in text
            return text if ready and "genmlx_client_rate_limited_total{" in text else None

        text = harness.wait_until(scrape, 60, what="the master to have every family")

    # What this machine cannot measure (a GPU, wired memory, a Mac's power) has no sample here:
    # its labels are read from the master's gauges of a sample that has every figure.
    measured_elsewhere = generate_latest(Gauges([full_sample()])).decode()
    exported: dict[str, set[str] | None] = {}  # sample name -> its labels (None: no sample yet)
    for family in [
        *text_string_to_metric_families(text),
        *text_string_to_metric_families(measured_elsewhere),
    ]:
        for suffix in SUFFIXES.get(family.type, ("",)):
            exported.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = exported.get(sample.name) or set()
            exported[sample.name] = labels | set(sample.labels)

    problems = []
    checked = [(where, *selectors(expr)) for where, expr in queries(dashboard())]
    checked += [
        (f"variable {name}", [(metric, {label})], set())
        for name, metric, label in variable_queries(dashboard())
    ]
    for where, metrics, grouped in checked:
        carried: set[str] = set()
        for metric, matched in metrics:
            if metric not in exported:
                problems.append(f"{where}: {metric} is not on the master's /metrics")
                continue
            labels = exported[metric]
            if labels is None:
                problems.append(f"{where}: {metric} has no sample to check its labels on")
                continue
            carried |= labels
            problems += [f"{where}: {metric} has no label {label}" for label in matched - labels]
        problems += [f"{where}: nothing it selects carries {label}" for label in grouped - carried - {"le"}]
    assert not problems, "\n".join(problems)


class Gauges:
    """The master's node gauges of ``samples``, as a registry collects them."""

    def __init__(self, samples: list[TelemetrySample]):
        self.samples = samples

    def collect(self):
        yield from node_gauges({f"node-{i}": sample for i, sample in enumerate(self.samples)})


def full_sample() -> TelemetrySample:
    """A sample with every figure a node can report (a Mac with macmon, a Thunderbolt cable)."""
    return TelemetrySample(
        at=0.0,
        cpu_percent=50.0,
        memory_used_bytes=1 << 30,
        memory_total_bytes=4 << 30,
        swap_used_bytes=0,
        memory_wired_bytes=1 << 29,
        system_power_watts=40.0,
        gpu=GpuSample(
            "macmon",
            utilization_percent=90.0,
            power_watts=30.0,
            memory_used_bytes=1 << 29,
            temperature_c=60.0,
        ),
        storage=(StorageSample("/models", 1 << 30, 2 << 30, 1.0, 2.0),),
        network=(InterfaceSample("en2", "thunderbolt", 1.0, 2.0),),
    )
