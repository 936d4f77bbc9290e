"""The model store: publish, verify and adopt on disk; the inventory's complete and partial models;
and, through a real agent process, the file list, Range serving, path escapes, auth, fetch requests
(file:// sources and, with the local Hub stand-in, hf:// downloads) and deletion."""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from agent_harness import Agent, call, start_agent
from conftest import free_port, http_status, signed, wait_until
from fakehub import FakeHub, files_from_dir

from genmlx.agent.store.file_serving import RangeNotSatisfiable, parse_byte_range
from genmlx.agent.store.inventory import scan_storage_path
from genmlx.agent.store.metadata import (
    METADATA_NAME,
    ModelFile,
    ModelMetadata,
    UnsafePath,
    read_metadata,
    safe_relative_path,
)
from genmlx.agent.store.model_store import (
    ModelAlreadyPresent,
    NoRoom,
    VerificationFailed,
    adopt,
    check_room,
    out_of_room,
    partial_dir,
    publish,
    sha256_file,
    verify_files,
)
from genmlx.agent.transfers.manager import room_checked
from genmlx.agent.transfers.progress import TransferProgress
from genmlx.core.errors import PermanentError
from genmlx.wire.agent_state import FetchRequest, StoredModel
from genmlx.wire.rank_launch import RankLaunch
from genmlx.wire.serving import ServingSettings

pytestmark = pytest.mark.timeout(120)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_files(directory: Path, files: dict[str, bytes]) -> tuple[ModelFile, ...]:
    for path, data in files.items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(data)
    return tuple(ModelFile(path, len(data), sha(data)) for path, data in sorted(files.items()))


MODEL_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": os.urandom(100_000),
    "tokenizer/vocab.txt": b"a\nb\n",
    "empty.txt": b"",
}


# ----- on disk -----


def test_sha256_file_streams_any_size(tmp_path: Path):
    for size in (0, 1, 4 * 1024 * 1024, 4 * 1024 * 1024 + 3):
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        assert sha256_file(tmp_path / "f") == sha(data), size
        assert sha256_file(tmp_path / "f", chunk_bytes=1000) == sha(data), size


@pytest.mark.parametrize(
    "path",
    ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", "a\\..\\b", "nul\0", "..", 7, None],
)
def test_a_relative_path_that_could_leave_its_directory_is_refused(path):
    with pytest.raises(UnsafePath):
        safe_relative_path(path)


def test_safe_relative_paths_pass_as_they_are():
    for path in ("model.safetensors", "tokenizer/vocab.txt", "a b/c-d_e.f", ".hidden"):
        assert safe_relative_path(path) == path


def test_verify_files_names_each_problem(tmp_path: Path):
    files = write_files(tmp_path, MODEL_FILES)
    assert verify_files(tmp_path, files) == []
    (tmp_path / "tokenizer" / "vocab.txt").unlink()
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.seek(500)
        f.write(b"\xff" if MODEL_FILES["model.safetensors"][500] != 0xFF else b"\x00")
    (tmp_path / "config.json").write_bytes(b"{}")
    assert verify_files(tmp_path, files) == [
        "config.json: 2 bytes, expected 23",
        "model.safetensors: sha256 does not match",
        "tokenizer/vocab.txt: missing",
    ]
    assert verify_files(tmp_path, files, check_hashes=False) == [
        "config.json: 2 bytes, expected 23",
        "tokenizer/vocab.txt: missing",
    ]


def test_publish_verifies_first_then_renames_the_partial_into_place(tmp_path: Path):
    root = tmp_path / "storage"
    partial = partial_dir(root, "m")
    partial.mkdir(parents=True)
    files = write_files(partial, MODEL_FILES)
    lying = ModelMetadata("hf://o/r", "main", "c0ffee", (*files[:-1], ModelFile(files[-1].path, 4, "0" * 64)))
    with pytest.raises(VerificationFailed, match="tokenizer/vocab.txt: sha256 does not match"):
        publish(partial, root, "m", lying)
    assert partial.is_dir() and not (root / "m").exists(), "a model that fails verification is not published"

    metadata = ModelMetadata("hf://o/r", "main", "c0ffee", files, time.time())
    final = publish(partial, root, "m", metadata)
    assert final == root / "m" and not partial.exists()
    assert read_metadata(final) == metadata
    assert {p.name for p in root.iterdir()} == {"m", ".genmlx-partial"}

    again = partial_dir(root, "m")
    again.mkdir()
    write_files(again, MODEL_FILES)
    with pytest.raises(ModelAlreadyPresent):
        publish(again, root, "m", metadata)
    newer = ModelMetadata("hf://o/r", "main", "beef", files, time.time())
    assert publish(again, root, "m", newer, replace=True) == final
    assert read_metadata(final).commit == "beef"
    assert [p.name for p in root.iterdir() if p.name.startswith(".genmlx-deleting")] == []


def test_adopt_hashes_a_hand_placed_model_in_place(tmp_path: Path):
    model = tmp_path / "storage" / "hand"
    model.mkdir(parents=True)
    files = write_files(model, MODEL_FILES)
    (model / ".DS_Store").write_bytes(b"finder")
    (tmp_path / "secret").write_bytes(b"outside")
    (model / "leak.bin").symlink_to(tmp_path / "secret")
    (model / "alias.safetensors").symlink_to(model / "model.safetensors")

    metadata = adopt(model)
    alias = ModelFile("alias.safetensors", len(MODEL_FILES["model.safetensors"]), files[2].sha256)
    assert metadata.files == tuple(sorted((*files, alias), key=lambda f: f.path))
    assert (metadata.source, metadata.revision, metadata.commit) == (model.resolve().as_uri(), None, None)
    assert read_metadata(model) == metadata
    assert adopt(model) == metadata, "adopting twice changes nothing"


def test_the_inventory_reports_complete_incomplete_and_partial_models(tmp_path: Path, demo_model_dir: Path):
    root = tmp_path / "storage"
    shutil.copytree(demo_model_dir, root / "bare")  # no metadata: config.json + weights
    (root / "published").mkdir()
    files = write_files(root / "published", MODEL_FILES)
    metadata = ModelMetadata("hf://o/r", "v1", "abc", files, time.time())
    (root / "published" / METADATA_NAME).write_text(json.dumps(metadata.to_json()))
    shutil.copytree(root / "published", root / "truncated")
    with open(root / "truncated" / "model.safetensors", "r+b") as f:
        f.truncate(10)
    (root / "damaged").mkdir()
    (root / "damaged" / METADATA_NAME).write_text("{not json")
    (root / ".genmlx-deleting-old-1-2").mkdir()
    partial = partial_dir(root, "arriving")
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"x" * 1000)

    report = scan_storage_path(root)
    models = {m.name: m for m in report.models}
    assert set(models) == {"bare", "published", "truncated", "damaged"}, "hidden entries are not models"
    assert models["bare"].complete and models["bare"].source is None
    assert models["published"] == StoredModel(
        "published",
        str(root / "published"),
        sum(f.size for f in files) + (root / "published" / METADATA_NAME).stat().st_size,
        True,
        "hf://o/r",
        "v1",
        "abc",
        published_at=(root / "published" / METADATA_NAME).stat().st_mtime,
    )
    assert not models["truncated"].complete, "a file shorter than recorded makes the model incomplete"
    assert not models["damaged"].complete
    assert report.partials == (StoredModel("arriving", str(partial), 1000, False),)


def test_a_model_that_does_not_fit_is_refused_with_the_numbers(tmp_path: Path):
    free = shutil.disk_usage(tmp_path).free
    check_room(tmp_path, "m", 1000)  # fits: nothing happens
    with pytest.raises(NoRoom, match=rf"model m needs {free + 10**12} more bytes .* in {tmp_path}, but only"):
        check_room(tmp_path, "m", free + 10**12)

    progress = TransferProgress()
    report = room_checked(progress, tmp_path, "m", tmp_path / "partial")
    report(0, None)  # the total is not known yet: nothing to check
    report(10, 1000)
    assert (progress.done, progress.total) == (10, 1000)
    too_big = room_checked(TransferProgress(), tmp_path, "m", tmp_path / "partial")
    with pytest.raises(NoRoom):
        too_big(0, free + 10**12)


def test_a_full_disk_is_no_room_and_not_permanent_and_other_write_errors_are_not():
    full = out_of_room(OSError(errno.ENOSPC, "No space left on device"), "m/model.safetensors")
    assert isinstance(full, NoRoom) and not isinstance(full, PermanentError)
    assert str(full).startswith("no room left while writing m/model.safetensors (No space left on device)")
    assert isinstance(out_of_room(OSError(errno.EDQUOT, "Disk quota exceeded"), "m"), NoRoom)
    assert out_of_room(OSError(errno.EIO, "Input/output error"), "m") is None


@pytest.mark.parametrize(
    "header, expected",
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, 99)),
        ("bytes=-7", (93, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=90-1000", (90, 99)),
        ("bytes=99-99", (99, 99)),
        ("bytes=5-2", None),  # invalid: ignored, the whole file is served
        ("bytes=0-1,5-6", None),  # several ranges: we may serve the whole file instead
        ("bytes=a-b", None),
        ("items=0-1", None),
        ("bytes=-", None),
    ],
)
def test_byte_ranges(header, expected):
    assert parse_byte_range(header, 100) == expected


@pytest.mark.parametrize(
    "header, size", [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0)]
)
def test_unsatisfiable_byte_ranges(header, size):
    with pytest.raises(RangeNotSatisfiable) as refused:
        parse_byte_range(header, size)
    assert refused.value.headers == {"Content-Range": f"bytes */{size}"}


# ----- through a real agent -----


@pytest.fixture
def storage(tmp_path: Path, demo_model_dir: Path) -> Path:
    """A storage path with the demo model put there by hand, a symlink leading out, and a model
    whose metadata lists a file that is a symlink to a file outside."""
    root = tmp_path / "storage"
    shutil.copytree(demo_model_dir, root / "demo-llama")
    outside = tmp_path / "outside"
    shutil.copytree(demo_model_dir, outside / "stolen")
    (root / "escape").symlink_to(outside / "stolen")
    (root / "sneaky").mkdir()
    files = write_files(root / "sneaky", {"config.json": b"{}", "model.safetensors": b"secret weights"})
    metadata = ModelMetadata(None, None, None, files, time.time())
    (root / "sneaky" / METADATA_NAME).write_text(json.dumps(metadata.to_json()))
    (outside / "model.safetensors").write_bytes(b"secret weights")
    (root / "sneaky" / "model.safetensors").unlink()
    (root / "sneaky" / "model.safetensors").symlink_to(outside / "model.safetensors")
    return root


@pytest.fixture
def agent(spawn, token: str, storage: Path, tmp_path: Path) -> Agent:
    return start_agent(spawn, token, "node-a", (storage, tmp_path / "second"))


def raw_get(agent: Agent, path: str, token: str | None = None) -> int:
    """A GET with the path sent exactly as given (no client normalising "..")."""
    connection = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        url = f"http://127.0.0.1:{agent.port}{path}"
        connection.request("GET", path, headers=signed(token or agent.token, "GET", url))
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.mark.e2e
def test_the_file_list_adopts_a_hand_placed_model(agent: Agent, storage: Path, demo_model_dir: Path):
    assert not (storage / "demo-llama" / METADATA_NAME).exists()
    reply = agent.call("GET", "/api/v1/models/demo-llama/files")
    assert reply.status == 200, reply.body
    listing = reply.json()
    expected = sorted(
        p.relative_to(demo_model_dir).as_posix() for p in demo_model_dir.rglob("*") if p.is_file()
    )
    assert [f["path"] for f in listing["files"]] == expected
    for f in listing["files"]:
        data = (demo_model_dir / f["path"]).read_bytes()
        assert (f["size"], f["sha256"]) == (len(data), sha(data))
    source = (storage / "demo-llama").resolve().as_uri()
    assert (listing["name"], listing["source"], listing["revision"], listing["commit"]) == (
        "demo-llama",
        source,
        None,
        None,
    )
    assert (storage / "demo-llama" / METADATA_NAME).is_file()
    demo = next(m for m in agent.state().storage[0].models if m.name == "demo-llama")
    assert (demo.complete, demo.source) == (True, source)
    assert agent.call("GET", "/api/v1/models/absent/files").status == 404


@pytest.mark.e2e
def test_files_are_served_whole_or_by_range(agent: Agent, demo_model_dir: Path):
    data = (demo_model_dir / "model.safetensors").read_bytes()
    size, url = len(data), "/api/v1/models/demo-llama/files/model.safetensors"
    whole = agent.call("GET", url)
    assert (whole.status, whole.body) == (200, data)
    assert whole.headers["Accept-Ranges"] == "bytes"
    assert whole.headers["ETag"] == f'"{sha(data)}"'
    assert whole.headers["Content-Length"] == str(size)
    for header, first, last in [
        ("bytes=10-19", 10, 19),
        ("bytes=100-", 100, size - 1),
        ("bytes=-7", size - 7, size - 1),
        (f"bytes=5-{size * 2}", 5, size - 1),
    ]:
        part = agent.call("GET", url, headers={"Range": header})
        assert part.status == 206, header
        assert part.body == data[first : last + 1], header
        assert part.headers["Content-Range"] == f"bytes {first}-{last}/{size}", header
    for header in (f"bytes={size}-", "bytes=-0"):
        refused = agent.call("GET", url, headers={"Range": header})
        assert refused.status == 416, header
        assert refused.headers["Content-Range"] == f"bytes */{size}"
    ignored = agent.call("GET", url, headers={"Range": "bytes=0-1,4-5"})
    assert (ignored.status, ignored.body) == (200, data)
    head = agent.call("HEAD", url)
    assert (head.status, head.body, head.headers["Content-Length"]) == (200, b"", str(size))
    nested = agent.call("GET", "/api/v1/models/demo-llama/files/tokenizer.json")
    assert nested.body == (demo_model_dir / "tokenizer.json").read_bytes()


@pytest.mark.e2e
def test_paths_that_escape_the_storage_root_are_refused(agent: Agent, tmp_path: Path):
    secret = (tmp_path / "outside" / "stolen" / "config.json").read_bytes()
    assert agent.call("GET", "/api/v1/models/demo-llama/files").status == 200  # adopt it first
    refused = {
        "/api/v1/models/demo-llama/files/../../escape/config.json": 400,
        "/api/v1/models/demo-llama/files/..%2F..%2Fescape%2Fconfig.json": 400,
        "/api/v1/models/demo-llama/files/%2E%2E/demo-llama/config.json": 400,
        "/api/v1/models/demo-llama/files//etc/passwd": 400,
        "/api/v1/models/demo-llama/files/%2Fetc%2Fpasswd": 400,
        "/api/v1/models/demo-llama/files/.genmlx-model.json": 404,  # not a file of the model
        "/api/v1/models/demo-llama/files/nothing-here": 404,
        "/api/v1/models/../files/storage/demo-llama/config.json": 400,
        "/api/v1/models/%2E%2E/files": 400,
        "/api/v1/models/escape/files": 404,  # a symlinked directory is not a model
        "/api/v1/models/escape/files/config.json": 404,
        "/api/v1/models/sneaky/files/model.safetensors": 403,  # listed, but a link leading out
    }
    for path, status in refused.items():
        assert raw_get(agent, path) == status, path
    sneaky = agent.call("GET", "/api/v1/models/sneaky/files/model.safetensors")
    assert sneaky.error_type() == "PathRefused" and b"secret" not in sneaky.body
    assert secret not in agent.call("GET", "/api/v1/models/escape/files/config.json").body


MODEL_ENDPOINTS = [
    ("GET", "/api/v1/models/demo-llama/files", None),
    ("GET", "/api/v1/models/demo-llama/files/config.json", None),
    ("HEAD", "/api/v1/models/demo-llama/files/config.json", None),
    ("POST", "/api/v1/models", {"model": "x", "storagePath": "/", "peer": "127.0.0.1:1"}),
    ("DELETE", "/api/v1/models/demo-llama", None),
]


@pytest.mark.e2e
def test_model_endpoints_refuse_a_missing_or_wrong_token(agent: Agent, storage: Path):
    for method, path, body in MODEL_ENDPOINTS:
        for token in (None, "wrong-token", agent.token + "x"):
            reply = call(method, agent.url + path, token, body)
            assert reply.status == 401, (method, path, token is None)
            if method != "HEAD":
                assert reply.error_type() == "AuthError"
    assert (storage / "demo-llama" / "config.json").is_file(), "the refused DELETE removed nothing"
    assert not (storage / "demo-llama" / METADATA_NAME).exists(), "the refused GET adopted nothing"


@pytest.mark.e2e
def test_fetch_requests_are_validated(agent: Agent, storage: Path, tmp_path: Path):
    good = FetchRequest("copy", str(storage), peer="127.0.0.1:9").to_json()
    refused = [
        (b"{nope", "body", "InvalidFetch"),
        ({**good, "storagePath": str(tmp_path)}, "storagePath", "StoragePathRefused"),
        ({**good, "storagePath": str(storage / "demo-llama")}, "storagePath", "StoragePathRefused"),
        ({**good, "model": "../evil"}, "model", "InvalidFetch"),
        ({**good, "model": ".hidden"}, "model", "InvalidFetch"),
        ({**good, "model": "a/b"}, "model", "InvalidFetch"),
        ({**good, "peerModel": ".."}, "peerModel", "InvalidFetch"),
        ({**good, "source": "hf://no-org"}, "source", "InvalidFetch"),  # what the copy must hold
        ({**good, "peer": None}, "source", "InvalidFetch"),
        ({**good, "peer": "no-port"}, "peer", "InvalidFetch"),
        ({**good, "peer": None, "source": "hf://just-a-name"}, "source", "InvalidFetch"),
        ({**good, "peer": None, "source": "s3://bucket/x"}, "source", "InvalidFetch"),
        ({**good, "peer": None, "source": "file://relative/x"}, "source", "InvalidFetch"),
        ({**good, "surprise": 1}, "surprise", "InvalidFetch"),
    ]
    for body, field, kind in refused:
        reply = agent.call("POST", "/api/v1/models", body)
        assert reply.status == 400, (field, reply.body)
        error = reply.json()["error"]
        assert error["message"].startswith(field + ":") and error["type"] == kind, error
    assert agent.state().transfers == (), "a refused request starts nothing"


@pytest.mark.e2e
def test_a_model_already_complete_anywhere_is_not_fetched_again(agent: Agent, storage: Path, tmp_path: Path):
    second = tmp_path / "second"
    for storage_path in (storage, second):
        reply = agent.fetch(FetchRequest("demo-llama", str(storage_path), source="hf://org/demo"))
        assert reply.status == 200, reply.body
        present = StoredModel.from_json(reply.json()["model"])
        assert (present.path, present.complete) == (str(storage / "demo-llama"), True)
    assert agent.state().transfers == ()
    assert not second.exists()


@pytest.mark.e2e
def test_a_file_source_inside_storage_is_adopted_in_place(agent: Agent, storage: Path, demo_model_dir: Path):
    shutil.copytree(demo_model_dir, storage / "by-hand")
    source = (storage / "by-hand").as_uri()
    reply = agent.fetch(FetchRequest("by-hand", str(storage), source=source))
    assert reply.status == 202, reply.body
    assert reply.json()["transfer"]["kind"] == "download"
    done = agent.wait_transfer("by-hand")
    assert (done.state, done.error, done.origin) == ("done", None, source)
    metadata = read_metadata(storage / "by-hand")
    assert metadata is not None and metadata.source == (storage / "by-hand").resolve().as_uri()
    assert sorted(p.name for p in storage.iterdir() if not p.name.startswith(".")) == [
        "by-hand",
        "demo-llama",
        "escape",
        "sneaky",
    ], "nothing was copied"
    again = agent.fetch(FetchRequest("by-hand", str(storage), source=source))
    assert again.status == 200 and again.json()["model"]["path"] == str(storage / "by-hand")

    with open(storage / "by-hand" / "tokenizer.json", "r+b") as f:
        f.truncate(100)
    assert agent.fetch(FetchRequest("by-hand", str(storage), source=source)).status == 202
    damaged = agent.wait_transfer("by-hand")
    assert (damaged.state, damaged.permanent) == ("failed", True)
    assert "tokenizer.json: 100 bytes, expected" in damaged.error


@pytest.mark.e2e
def test_a_file_source_outside_storage_fails_permanently(agent: Agent, storage: Path, tmp_path: Path):
    source = (tmp_path / "outside" / "stolen").as_uri()
    assert agent.fetch(FetchRequest("stolen", str(storage), source=source)).status == 202
    failed = agent.wait_transfer("stolen")
    assert (failed.state, failed.permanent) == ("failed", True)
    assert "move the model directory into one of them" in failed.error
    assert not (tmp_path / "outside" / "stolen" / METADATA_NAME).exists()
    retry = agent.fetch(FetchRequest("stolen", str(storage), source=(storage / "demo-llama").as_uri()))
    assert retry.status == 202, "a finished transfer does not block the next request"


@pytest.mark.e2e
def test_delete_removes_the_model_and_its_partial_but_not_while_a_rank_uses_it(agent: Agent, storage: Path):
    (partial_dir(storage, "demo-llama") / "leftover").mkdir(parents=True)
    serving = ServingSettings(context_length=256)
    launch = RankLaunch("demo", str(storage / "demo-llama"), 0, 1, free_port(), "spec", serving=serving)
    assert agent.call("POST", "/api/v1/ranks", launch.to_json()).status == 201
    in_use = agent.call("DELETE", "/api/v1/models/demo-llama")
    assert (in_use.status, in_use.error_type()) == (409, "ModelInUse")
    assert (storage / "demo-llama" / "config.json").is_file()
    assert agent.call("DELETE", "/api/v1/ranks/demo/0").status == 200

    removed = agent.call("DELETE", "/api/v1/models/demo-llama")
    assert removed.status == 200, removed.body
    assert removed.json() == {
        "removed": [str(storage / "demo-llama"), str(partial_dir(storage, "demo-llama"))]
    }
    assert not (storage / "demo-llama").exists() and not partial_dir(storage, "demo-llama").exists()
    assert [p.name for p in storage.iterdir() if p.name.startswith(".genmlx-deleting")] == []
    assert agent.call("DELETE", "/api/v1/models/demo-llama").status == 404
    assert agent.call("DELETE", "/api/v1/models/..").status == 400
    assert (storage.parent / "outside" / "stolen" / "config.json").is_file()


# ----- hf:// downloads, against the local stand-in for the Hub -----


@pytest.fixture
def hub(demo_model_dir: Path):
    fake = FakeHub().start()
    fake.add_commit("org/demo", files_from_dir(demo_model_dir))
    fake.add_commit("org/gated", files_from_dir(demo_model_dir))
    fake.gate("org/gated")
    yield fake
    fake.stop()


@pytest.mark.e2e
def test_an_hf_source_is_downloaded_verified_and_published(spawn, token: str, hub: FakeHub, tmp_path: Path):
    storage = tmp_path / "storage"
    proc_env = {"HF_ENDPOINT": hub.url, "GENMLX_DISCOVERY": "off", "HF_HUB_DISABLE_TELEMETRY": "1"}
    port = free_port()
    args = ["-m", "genmlx", "agent", "--name", "dl", "--port", str(port), "--host", "127.0.0.1"]
    proc = spawn([*args, "--storage", str(storage)], "agent-dl", env=proc_env)
    wait_until(lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200, timeout=30, interval=0.05)
    agent = Agent("dl", port, (storage,), token, proc)

    assert agent.fetch(FetchRequest("demo", str(storage), source="hf://org/demo")).status == 202
    done = agent.wait_transfer("demo")
    assert (done.state, done.origin, done.error) == ("done", "hf://org/demo@main", None)
    metadata = read_metadata(storage / "demo")
    commit = hub.repos["org/demo"].refs["main"]
    assert (metadata.source, metadata.revision, metadata.commit) == ("hf://org/demo", "main", commit)
    assert done.bytes_done == done.bytes_total == metadata.total_bytes
    assert verify_files(storage / "demo", metadata.files) == []
    model = next(m for m in agent.state().storage[0].models if m.name == "demo")
    assert model.complete and model.commit == metadata.commit
    assert not partial_dir(storage, "demo").exists()

    assert agent.fetch(FetchRequest("gated", str(storage), source="hf://org/gated")).status == 202
    gated = agent.wait_transfer("gated")
    assert (gated.state, gated.permanent) == ("failed", True)
    assert "not found or gated" in gated.error
    assert not (storage / "gated").exists()
