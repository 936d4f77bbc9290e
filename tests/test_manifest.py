"""The manifest loader: every broken manifest is reported at the exact line, column and YAML path,
all problems at once; valid manifests become the frozen dataclasses with defaults applied."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from textwrap import dedent

import pytest

from genmlx.core.errors import ManifestError
from genmlx.manifest import format_issues, load_manifest, load_manifest_text, schema_path
from genmlx.manifest.types import (
    ApiKey,
    Auth,
    Manifest,
    Master,
    Mesh,
    ModelSpec,
    Node,
    Serving,
    Source,
    StoragePath,
    Tls,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cluster.yaml"

# A small valid manifest; each broken case below is a copy of it with one thing wrong, so the line
# numbers in the expectations can be read straight off this text (line 1 is "apiVersion").
VALID = """\
apiVersion: genmlx/v1
kind: Cluster
metadata:
  name: desk
spec:
  master: {node: studio-a}
  nodes:
    - name: studio-a
      storage: [{path: ~/models}]
    - name: mini-b
      address: mini-b.local:6790
      storage: [{path: /Volumes/T9/models, maxGB: 100}]
  models:
    - name: qwen
      source: hf://mlx-community/Qwen3-0.6B-4bit
      nodes: [studio-a, mini-b]
"""


def broken(old: str, new: str) -> str:
    """VALID with one exact piece of text replaced (which must be there)."""
    assert old in VALID, old
    return VALID.replace(old, new, 1)


def issues_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifest_text(text, "cluster.yaml")
    return [str(issue) for issue in caught.value.issues]


CASES = [
    # (id, manifest text, "LINE:COL", YAML path, message fragment)
    (
        "unknown-top-level-key",
        broken("kind: Cluster", "kind: Cluster\nknid: Cluster"),
        "3:1",
        "knid",
        "unknown key 'knid'; did you mean 'kind'?",
    ),
    (
        "unknown-nested-key",
        broken("      storage: [{path: ~/models}]", "      sotrage: [{path: ~/models}]"),
        "9:7",
        "spec.nodes[0].sotrage",
        "unknown key 'sotrage'; did you mean 'storage'?",
    ),
    (
        "unknown-key-no-close-match",
        broken("    - name: qwen\n", "    - name: qwen\n      gpu: 1\n"),
        "15:7",
        "spec.models[0].gpu",
        "unknown key 'gpu'; expected one of: name, source, revision",
    ),
    (
        "missing-required-key",
        broken("      source: hf://mlx-community/Qwen3-0.6B-4bit\n", ""),
        "14:7",
        "spec.models[0]",
        "missing required key 'source'",
    ),
    (
        "wrong-type",
        broken("maxGB: 100", "maxGB: lots"),
        "12:51",
        "spec.nodes[1].storage[0].maxGB",
        "expected a number, got string 'lots'",
    ),
    (
        "number-where-text-expected",
        broken("    - name: qwen\n", "    - name: qwen\n      revision: 1234\n"),
        "15:17",
        "spec.models[0].revision",
        "expected a string, got integer 1234; quote it",
    ),
    (
        "bad-enum",
        VALID + "  mesh: {topology: mesh}\n",
        "17:20",
        "spec.mesh.topology",
        "'mesh' must be one of full-mesh, ring",
    ),
    ("bad-const", broken("kind: Cluster", "kind: Clusters"), "2:7", "kind", "'Clusters' must be 'Cluster'"),
    (
        "bad-source-scheme",
        broken("hf://mlx-community", "s3://mlx-community"),
        "15:15",
        "spec.models[0].source",
        "'s3://mlx-community/Qwen3-0.6B-4bit' must be hf://org/repo or file:///absolute/path",
    ),
    (
        "relative-file-source",
        broken("hf://mlx-community/Qwen3-0.6B-4bit", "file://models/qwen"),
        "15:15",
        "spec.models[0].source",
        "'file://models/qwen' must be hf://org/repo or file:///absolute/path",
    ),
    (
        "undeclared-model-node",
        broken("[studio-a, mini-b]", "[studio-a, mini-c]"),
        "16:25",
        "spec.models[0].nodes[1]",
        "'mini-c' is not a declared node; did you mean 'mini-b'?",
    ),
    (
        "undeclared-master-node",
        broken("{node: studio-a}", "{node: master-x}"),
        "6:18",
        "spec.master.node",
        "'master-x' is not a declared node",
    ),
    (
        "duplicate-node-name",
        broken(
            "    - name: mini-b\n", "    - name: studio-a\n      storage: [{path: /m}]\n    - name: mini-b\n"
        ),
        "10:13",
        "spec.nodes[1].name",
        "node 'studio-a' is already declared at spec.nodes[0]",
    ),
    (
        "duplicate-model-name",
        VALID + "    - {name: qwen, source: 'file:///m/q', nodes: '*'}\n",
        "17:14",
        "spec.models[1].name",
        "model 'qwen' is already declared at spec.models[0]",
    ),
    (
        "duplicate-yaml-key",
        broken("  name: desk\n", "  name: desk\n  name: desk2\n"),
        "5:3",
        "metadata.name",
        "duplicate key 'name' (first at line 4)",
    ),
    (
        "duplicate-list-entry",
        broken("[studio-a, mini-b]", "[studio-a, studio-a]"),
        "16:25",
        "spec.models[0].nodes[1]",
        "'studio-a' is listed twice",
    ),
    (
        "empty-node-list",
        broken("[studio-a, mini-b]", "[]"),
        "16:14",
        "spec.models[0].nodes",
        "must not be empty",
    ),
    (
        "nodes-neither-list-nor-star",
        broken("[studio-a, mini-b]", "all"),
        "16:14",
        "spec.models[0].nodes",
        "'all' must be a list of node names or \"*\"",
    ),
    (
        "bad-name",
        broken("name: qwen", "name: Qwen_3"),
        "14:13",
        "spec.models[0].name",
        "'Qwen_3' must be lowercase letters, digits",
    ),
    (
        "shared-port-same-host",
        broken(
            "      nodes: [studio-a, mini-b]\n",
            "      nodes: [studio-a, mini-b]\n      serving: {port: 6790}\n",
        ),
        "17:23",
        "spec.models[0].serving.port",
        "port 6790 is already used by spec.nodes[0] (default) on studio-a",
    ),
    (
        "shared-port-with-address",
        broken("      nodes: [studio-a, mini-b]\n", "      nodes: [mini-b]\n      serving: {port: 6790}\n"),
        "17:23",
        "spec.models[0].serving.port",
        "port 6790 is already used by spec.nodes[1].address on mini-b.local",
    ),
    (
        "shared-port-default-master",
        broken("{node: studio-a}", "{node: studio-a}\n  mesh: {port: 6789}"),
        "7:16",
        "spec.mesh.port",
        "port 6789 is already used by spec.master.port (default) on studio-a",
    ),
    (
        "port-out-of-range",
        broken("{node: studio-a}", "{node: studio-a, port: 70000}"),
        "6:34",
        "spec.master.port",
        "70000 must be at most 65535",
    ),
    (
        "relative-storage-path",
        broken("{path: ~/models}", "{path: models}"),
        "9:24",
        "spec.nodes[0].storage[0].path",
        "'models' must be an absolute path or start with '~'",
    ),
    (
        "no-storage",
        broken("      storage: [{path: ~/models}]\n", ""),
        "8:7",
        "spec.nodes[0]",
        "missing required key 'storage'",
    ),
    (
        "yaml-syntax-error",
        broken("[studio-a, mini-b]", "[studio-a, mini-b"),
        "17:1",
        "",
        "YAML syntax error: expected ',' or ']'",
    ),
    ("unquoted-star", broken("[studio-a, mini-b]", "*"), "16:15", "", 'a literal * must be quoted: "*"'),
    ("empty-file", "", "1:1", "", "the file is empty"),
    ("comments-only", "# nothing here\n", "1:1", "", "the file is empty"),
    ("not-a-mapping", "- apiVersion: genmlx/v1\n", "1:1", "", "a manifest is a mapping"),
    (
        "control-character",
        broken("name: desk", "name: de\x07sk"),
        "4:11",
        "",
        "character #x0007 is not allowed",
    ),
]


@pytest.mark.parametrize(
    ("text", "where", "path", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_broken_manifest_is_reported_at_its_place(text: str, where: str, path: str, fragment: str):
    issues = issues_of(text)
    assert len(issues) == 1, issues
    prefix = f"cluster.yaml:{where}: {path}: " if path else f"cluster.yaml:{where}: "
    assert issues[0].startswith(prefix), issues[0]
    assert fragment in issues[0], issues[0]


KEY = "a" * 64
KEYS = f"""\
  auth:
    apiKeys:
      - {{name: laptop, sha256: {KEY}, models: [qwne]}}
      - {{name: laptop, sha256: {KEY}, expires: next tuesday}}
      - {{name: app, sha256: ABC}}
"""


def test_api_keys_said_twice_naming_undeclared_models_or_unparsable_expiry_are_errors():
    issues = issues_of(VALID.replace("  nodes:\n", KEYS + "  nodes:\n", 1))
    assert issues == [
        "cluster.yaml:9:107: spec.auth.apiKeys[0].models[0]: 'qwne' is not a declared model; "
        "did you mean 'qwen'?",
        "cluster.yaml:10:16: spec.auth.apiKeys[1].name: is already used at spec.auth.apiKeys[0]",
        "cluster.yaml:10:32: spec.auth.apiKeys[1].sha256: is already used at spec.auth.apiKeys[0]",
        "cluster.yaml:10:107: spec.auth.apiKeys[1].expires: must be a date (2027-01-31) or an RFC 3339 "
        "date-time",
        "cluster.yaml:11:29: spec.auth.apiKeys[2].sha256: 'ABC' must be 64 lowercase hex digits: the "
        "SHA-256 `genmlx key create` prints",
    ]


@pytest.mark.parametrize(
    ("written", "moment"),
    [
        ("2027-01-31", datetime(2027, 1, 31, tzinfo=UTC)),
        ("2027-01-31T12:30:00Z", datetime(2027, 1, 31, 12, 30, tzinfo=UTC)),
        ("2027-01-31T12:30:00+02:00", datetime(2027, 1, 31, 10, 30, tzinfo=UTC)),
    ],
)
def test_an_api_key_expires_at_the_moment_it_names_in_utc(written: str, moment: datetime):
    text = VALID.replace(
        "  nodes:\n",
        f"  auth:\n    apiKeys: [{{name: k, sha256: {KEY}, expires: '{written}'}}]\n  nodes:\n",
        1,
    )
    (key,) = load_manifest_text(text, "cluster.yaml").auth.api_keys
    assert key.expires == moment.timestamp() and key.models is None and key.reaches("anything")


def test_several_errors_are_reported_at_once_in_file_order():
    text = dedent("""\
        apiVersion: genmlx/v1
        kind: Cluster
        metadata: {name: desk}
        spec:
          master: {node: studio-x}
          nodes:
            - name: studio-a
              storage: [{path: models}]
          mesh: {backend: mpi}
          models:
            - name: qwen
              source: hf://org/repo
              nodes: [studio-a, mini-c]
              serving: {maxBatch: 0}
        """)
    with pytest.raises(ManifestError) as caught:
        load_manifest_text(text, "cluster.yaml")
    assert [str(issue) for issue in caught.value.issues] == [
        "cluster.yaml:5:18: spec.master.node: 'studio-x' is not a declared node; did you mean 'studio-a'?",
        "cluster.yaml:8:24: spec.nodes[0].storage[0].path: "
        "'models' must be an absolute path or start with '~'",
        "cluster.yaml:9:19: spec.mesh.backend: 'mpi' must be one of auto, jaccl, nccl, ring",
        "cluster.yaml:13:25: spec.models[0].nodes[1]: 'mini-c' is not a declared node",
        "cluster.yaml:14:27: spec.models[0].serving.maxBatch: 0 must be at least 1",
    ]
    assert format_issues(caught.value).splitlines() == [str(i) for i in caught.value.issues]
    assert str(caught.value) == format_issues(caught.value)


def test_anchors_and_merge_keys_work_and_an_override_is_not_a_duplicate():
    text = VALID.replace(
        "  models:\n",
        "  models:\n    - &base\n      name: a\n      source: hf://o/a\n"
        "      nodes: [mini-b]\n      serving: {maxBatch: 4}\n    - <<: *base\n      name: b\n",
    )
    manifest = load_manifest_text(text, "cluster.yaml")
    assert [m.name for m in manifest.models] == ["a", "b", "qwen"]
    assert manifest.model("b").source == Source("hf", "o/a")
    assert manifest.model("b").serving.max_batch == 4


def test_a_value_rejected_by_the_schema_is_not_reported_again():
    issues = issues_of(broken("{node: studio-a}", "{node: Studio-A}"))
    assert len(issues) == 1, issues
    assert "must be lowercase letters" in issues[0]


def test_nodes_on_different_hosts_may_share_a_port():
    text = broken(
        "      storage: [{path: ~/models}]\n",
        "      address: studio-a.local:6790\n      storage: [{path: ~/models}]\n",
    )
    manifest = load_manifest_text(text, "cluster.yaml")
    assert [n.address for n in manifest.nodes] == ["studio-a.local:6790", "mini-b.local:6790"]


def test_nodes_at_the_same_address_collide():
    text = broken("mini-b.local:6790", "studio-a.local:7000").replace(
        "      storage: [{path: ~/models}]\n",
        "      address: studio-a.local:7000\n      storage: [{path: ~/models}]\n",
    )
    issues = issues_of(text)
    assert issues == [
        "cluster.yaml:12:16: spec.nodes[1].address: port 7000 is already used by spec.nodes[0].address "
        "on studio-a.local"
    ]


def test_non_utf8_file_is_an_issue_not_a_traceback(tmp_path: Path):
    path = tmp_path / "cluster.yaml"
    path.write_bytes(VALID.encode().replace(b"name: desk", b"name: d\xe9sk"))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert str(caught.value) == f"{path}:4:10: the file is not valid UTF-8 (byte 0xe9); save it as UTF-8"


def test_missing_file_is_an_issue(tmp_path: Path):
    with pytest.raises(ManifestError, match="cannot read the file"):
        load_manifest(tmp_path / "absent.yaml")


def test_example_round_trips_into_the_dataclasses():
    assert load_manifest(EXAMPLE) == Manifest(
        name="desk",
        master=Master(
            node="studio-a",
            port=6789,
            tls=Tls(cert_file="~/.genmlx/tls/cert.pem", key_file="~/.genmlx/tls/key.pem"),
        ),
        nodes=(
            Node(
                name="studio-a",
                address="studio-a.local:6790",
                storage=(StoragePath("~/.genmlx/models"), StoragePath("/Volumes/T9/models", max_gb=800.0)),
                prune=False,
            ),
            Node(name="mini-b", storage=(StoragePath("~/.genmlx/models"),)),
        ),
        models=(
            ModelSpec(
                name="qwen3-30b",
                source=Source("hf", "mlx-community/Qwen3-30B-A3B-4bit"),
                nodes=("studio-a", "mini-b"),
                revision="main",
                parallelism="auto",
                serving=Serving(
                    max_batch=16,
                    max_queue=128,
                    context_length=32768,
                    kv_bits=8,
                    kv_group_size=64,
                    disk_cache_gb=50.0,
                    port=8100,
                ),
            ),
            ModelSpec(
                name="notes-llama",
                source=Source("file", "/Users/shared/models/notes-llama-1b"),
                nodes=("studio-a", "mini-b"),
                serving=Serving(port=8101),
            ),
        ),
        auth=Auth(
            token_file="~/.genmlx/token",
            api_keys=(
                ApiKey(
                    name="alice-laptop",
                    sha256=hashlib.sha256(b"gmx_example-key-not-a-real-one").hexdigest(),
                    models=("qwen3-30b",),
                    expires=datetime(2027, 6, 30, tzinfo=UTC).timestamp(),
                    requests_per_minute=60,
                ),
                ApiKey(
                    name="prometheus",
                    sha256=hashlib.sha256(b"gmx_example-prometheus-key-not-a-real-one").hexdigest(),
                    models=(),
                    metrics=True,
                ),
            ),
        ),
        mesh=Mesh(topology="full-mesh", backend="auto", port=32323),
    )


def test_example_shows_every_field_of_the_schema():
    example = EXAMPLE.read_text()
    keys = set(re.findall(r"^\s*(?:- )?(\w+):", example, flags=re.MULTILINE))
    assert _schema_keys(json.loads(schema_path().read_text())) <= keys


def _schema_keys(schema: object) -> set[str]:
    if isinstance(schema, dict):
        own = set(schema.get("properties", {}))
        return own | {key for value in schema.values() for key in _schema_keys(value)}
    if isinstance(schema, list):
        return {key for value in schema for key in _schema_keys(value)}
    return set()


def test_star_expands_to_every_node_in_declaration_order():
    text = (
        broken("[studio-a, mini-b]", '"*"') + "    - {name: b2, source: 'file://~/m/b2', nodes: [mini-b]}\n"
    )
    manifest = load_manifest_text(text, "cluster.yaml")
    assert manifest.model("qwen").nodes == ("studio-a", "mini-b")
    assert manifest.model("b2").nodes == ("mini-b",)
    assert manifest.model("b2").source == Source("file", "~/m/b2")
    assert str(manifest.model("b2").source) == "file://~/m/b2"


def test_defaults_are_applied():
    manifest = load_manifest_text(VALID, "cluster.yaml")
    assert manifest.master == Master(node="studio-a", port=6789)
    assert manifest.auth == Auth(token_file=None)
    assert manifest.mesh == Mesh(topology="full-mesh", backend="auto", port=32323)
    assert manifest.node("studio-a") == Node(
        name="studio-a", address=None, storage=(StoragePath("~/models"),)
    )
    assert manifest.node("mini-b").storage == (StoragePath("/Volumes/T9/models", max_gb=100.0),)
    model = manifest.model("qwen")
    assert (model.revision, model.parallelism, model.prune) == ("main", "auto", False)
    assert model.serving == Serving(max_batch=None, max_queue=None, context_length=None, port=None)


def test_schema_defaults_match_the_dataclass_defaults():
    """The loader takes defaults from the schema; the dataclasses must not quietly disagree."""
    definitions = json.loads(schema_path().read_text())["$defs"]
    expected = {
        ("master", "port"): Master(node="n").port,
        ("node", "prune"): Node(name="n").prune,
        ("mesh", "topology"): Mesh().topology,
        ("mesh", "backend"): Mesh().backend,
        ("mesh", "port"): Mesh().port,
        ("model", "revision"): ModelSpec("m", Source("hf", "o/r"), ()).revision,
        ("model", "parallelism"): ModelSpec("m", Source("hf", "o/r"), ()).parallelism,
        ("model", "prune"): ModelSpec("m", Source("hf", "o/r"), ()).prune,
    }
    for (definition, key), default in expected.items():
        assert definitions[definition]["properties"][key]["default"] == default, (definition, key)


@pytest.mark.parametrize(
    ("definition", "dataclass_type"),
    [
        ("master", Master),
        ("auth", Auth),
        ("apiKey", ApiKey),
        ("node", Node),
        ("storagePath", StoragePath),
        ("mesh", Mesh),
        ("model", ModelSpec),
        ("serving", Serving),
    ],
)
def test_schema_matches_the_dataclasses_field_for_field(definition: str, dataclass_type: type):
    properties = json.loads(schema_path().read_text())["$defs"][definition]["properties"]
    as_fields = {re.sub(r"(?<=[a-z])([A-Z]+)", lambda m: "_" + m.group(1).lower(), key) for key in properties}
    assert as_fields == {f.name for f in dataclasses.fields(dataclass_type)}


def test_returned_objects_are_frozen():
    manifest = load_manifest(EXAMPLE)
    for target, attribute in [
        (manifest, "name"),
        (manifest.nodes[0], "name"),
        (manifest.models[0].serving, "port"),
        (manifest.models[0].source, "location"),
        (manifest.mesh, "port"),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(target, attribute, "changed")
    assert isinstance(manifest.nodes, tuple) and isinstance(manifest.models[0].nodes, tuple)


def test_names_outside_a_manifest_follow_the_schemas_rule():
    """A joining node's name and a new key's are checked by the one rule the schema states."""
    import json

    from genmlx.manifest.schema import schema_path
    from genmlx.manifest.types import NAME

    assert NAME.pattern == json.loads(schema_path().read_text())["$defs"]["name"]["pattern"]
