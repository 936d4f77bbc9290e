"""Downloading a model from the Hugging Face Hub into a partial directory, resumably and verified.

``download_model`` resolves the revision to a commit once (repo info with file metadata), keeps only
the files mlx-lm loads (``mlx_files``), and fetches each one pinned to that commit, so a branch
that moves mid-download cannot mix two revisions. Bytes go to ``<dest>/.hf-download/<etag>.part``
and are hashed as they arrive; a restarted download (after a kill, a crash or a dropped connection)
continues from what is on disk with an HTTP Range request. A file is renamed into place only when
it matches what the Hub lists: the sha256 for LFS files, the git blob sha1 for the others.

The Hub is asked through huggingface_hub (``HfApi.model_info``, ``get_hf_file_metadata``, its HTTP
session and error mapping), but not through ``hf_hub_download``: in 2.4 that writes each attempt to
a fresh temporary file and deletes it on failure, so it cannot resume. Nor through its
``http_get``, which hands over bytes 10 MB at a time: progress, cancellation (the progress callback
may raise) and what a kill loses would all move in 10 MB steps; the body is streamed here instead,
1 MB at a time. The endpoint is read from ``HF_ENDPOINT`` on every call (huggingface_hub reads it
once, at import) and passed explicitly.

Errors: what the Hub refuses (401, 403, 404: missing, gated, unknown revision or file) is a
``PermanentError`` saying "not found or gated"; 5xx, 408, 429, connection errors, timeouts and a
file that fails verification are retried with backoff, then raised as ``TemporaryError``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, constants, get_hf_file_metadata, get_session, hf_hub_url
from huggingface_hub.errors import (
    DisabledRepoError,
    FileMetadataError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from genmlx.agent.store.metadata import ModelFile, safe_relative_path
from genmlx.agent.store.mlx_files import (
    AUTO_MAP_FILES,
    loadable,
    needed_by_mlx_lm,
    needs_remote_code,
    remove_stale_model_files,
)
from genmlx.agent.store.model_store import DownloadResult, out_of_room
from genmlx.agent.transfers.resumable_file import ContentHashes, PartialFile, hash_file
from genmlx.core.errors import PermanentError, TemporaryError

log = logging.getLogger(__name__)

SCRATCH_DIR = ".hf-download"  # inside dest; the store treats names starting with "." as its own
INFO_TIMEOUT_S = 30.0
METADATA_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 30.0  # a stalled connection is dropped and resumed from what is on disk
WRITE_CHUNK_BYTES = 1024 * 1024
PROGRESS_INTERVAL_S = 0.25

ProgressCallback = Callable[[int, int | None], None]


@dataclass(frozen=True)
class HubRetry:
    """How often and how patiently a temporary failure is retried (exponential backoff, capped)."""

    attempts: int = 5
    first_wait_s: float = 1.0
    max_wait_s: float = 20.0


class FileCorrupted(TemporaryError):
    """A downloaded file did not match the hash the Hub lists for it (it is fetched again)."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repo at the resolved commit, as the Hub lists it."""

    path: str
    size: int
    sha256: str | None  # LFS files: the content's sha256
    git_sha1: str | None  # other files: the git blob id, sha1(b"blob <size>\0" + content)

    @property
    def etag(self) -> str:
        """What the Hub sends as the file's ETag (or X-Linked-Etag)."""
        return self.sha256 or self.git_sha1 or ""

    @property
    def in_git(self) -> bool:
        """Stored in git itself (not LFS): the Hub names it by git blob sha1, not by sha256."""
        return self.sha256 is None

    def matches(self, hashes: ContentHashes) -> bool:
        if self.in_git:
            return hashes.git_sha1 == self.git_sha1
        return hashes.sha256 == self.sha256


@dataclass(frozen=True)
class RepoListing:
    commit: str
    files: tuple[RemoteFile, ...]


@dataclass(frozen=True)
class HubSession:
    """One download's view of the Hub: where it is, who asks, and how failures are retried."""

    repo: str
    revision: str
    endpoint: str
    token: str | bool = field(repr=False)  # False: send none (never the one huggingface_hub saved)
    retry: HubRetry

    @property
    def origin(self) -> str:
        return f"hf://{self.repo}@{self.revision}"

    def retrying(self) -> Retrying:
        """Retry ``TemporaryError`` only; the last one is raised as is."""
        return Retrying(
            retry=retry_if_exception_type(TemporaryError),
            stop=stop_after_attempt(self.retry.attempts),
            wait=wait_exponential(multiplier=self.retry.first_wait_s, max=self.retry.max_wait_s),
            before_sleep=lambda state: log.warning(
                "%s: attempt %d failed (%s); retrying",
                self.origin,
                state.attempt_number,
                state.outcome.exception(),
            ),
            reraise=True,
        )

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with the Hub's errors made ours, retried while they are temporary."""

        def attempt() -> Any:
            with hub_errors(self.origin):
                return fn(*args)

        return self.retrying()(attempt)


class ByteProgress:
    """Bytes on disk per file, summed and reported at most every ``interval_s`` (and at the end)."""

    def __init__(self, report: ProgressCallback, interval_s: float = PROGRESS_INTERVAL_S):
        self.report = report
        self.interval_s = interval_s
        self.total: int | None = None
        self.per_file: dict[str, int] = {}
        self.last_report = 0.0

    @property
    def done(self) -> int:
        return sum(self.per_file.values())

    def update(self, path: str, nbytes: int) -> None:
        self.per_file[path] = nbytes
        now = time.monotonic()
        if now - self.last_report >= self.interval_s:
            self.last_report = now
            self.report(self.done, self.total)

    def set_total(self, total: int) -> None:
        """Settle the total and report it at once (the caller may check there is room for it)."""
        self.total = total
        self.finish()

    def finish(self) -> None:
        self.last_report = time.monotonic()
        self.report(self.done, self.total)


def download_model(
    repo: str,
    revision: str,
    dest: Path,
    progress: ProgressCallback,
    token: str | None,
    *,
    retry: HubRetry = HubRetry(),  # noqa: B008 - frozen, so one shared default is safe
) -> DownloadResult:
    """Download the files mlx-lm needs from ``repo`` at ``revision`` into ``dest``, resuming
    whatever an earlier run left there, and return the commit and every file's size and sha256.

    Blocks (run it in an executor). ``progress(bytes_done, bytes_total)`` is called a few times a
    second while bytes arrive; the total is None until the file list is settled. ``token`` is sent
    to the Hub (never logged); None sends no token at all.
    """
    silence_hub_telemetry()
    hub = HubSession(repo, revision, hub_endpoint(), token or False, retry)
    listing = hub.call(list_repo_files, hub)
    log.info("%s resolved to commit %s; downloading into %s", hub.origin, listing.commit, dest)
    tracker = ByteProgress(progress)
    dest.mkdir(parents=True, exist_ok=True)
    # What the configs' auto_map says decides whether code files are needed: fetch them first.
    first = [f for f in listing.files if f.path in AUTO_MAP_FILES]
    done = {f.path: fetch_file(hub, listing.commit, f, dest, tracker) for f in first}
    wanted = select_files(hub, listing, needs_remote_code(dest))
    tracker.set_total(sum(f.size for f in wanted))
    for remote in wanted:
        if remote.path not in done:
            done[remote.path] = fetch_file(hub, listing.commit, remote, dest, tracker)
    tracker.finish()
    shutil.rmtree(dest / SCRATCH_DIR, ignore_errors=True)
    remove_stale_model_files(dest, keep={f.path for f in wanted})
    files = tuple(done[f.path] for f in wanted)
    log.info("%s: %d files, %d bytes, verified", hub.origin, len(files), sum(f.size for f in files))
    return DownloadResult(commit=listing.commit, files=files)


def silence_hub_telemetry() -> None:
    """huggingface_hub reads HF_HUB_DISABLE_TELEMETRY once, at import; while it is off, building
    request headers fetches an agent registry from the endpoint it saw then (huggingface.co
    unless HF_ENDPOINT was already set). Turn it off for this process and its children."""
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    constants.HF_HUB_DISABLE_TELEMETRY = True


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` as it is now, else the Hub huggingface_hub defaults to."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


@contextmanager
def hub_errors(origin: str) -> Iterator[None]:
    """Turn what huggingface_hub and httpx raise into ``PermanentError`` or ``TemporaryError``."""
    try:
        yield
    except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError, DisabledRepoError) as e:
        raise PermanentError(f"{origin} not found or gated: {hub_reason(e)}") from e
    except HfHubHTTPError as e:
        raise classify_http_error(origin, e) from e
    except httpx2.TransportError as e:
        raise TemporaryError(f"{origin}: cannot reach the Hub ({type(e).__name__}: {e})") from e
    except (FileMetadataError, OfflineModeIsEnabled, HFValidationError) as e:
        raise PermanentError(f"{origin}: {e}") from e
    except OSError as e:
        if full := out_of_room(e, origin):
            raise full from e
        raise  # another local failure (permissions, I/O): not the Hub's, and not ours to retry


def classify_http_error(origin: str, error: HfHubHTTPError) -> PermanentError | TemporaryError:
    status = error.response.status_code
    if status in (401, 403, 404):
        return PermanentError(f"{origin} not found or gated: {hub_reason(error)}")
    if status >= 500 or status in (408, 429):
        return TemporaryError(f"{origin}: the Hub answered {hub_reason(error)}")
    return PermanentError(f"{origin}: the Hub refused the request: {hub_reason(error)}")


def hub_reason(error: HfHubHTTPError) -> str:
    """A one-line reason: the status and what the Hub said, without the library's advice."""
    response = error.response
    code = response.headers.get("X-Error-Code")
    said = (error.server_message or "").splitlines()
    return " ".join(p for p in (f"HTTP {response.status_code}", code, said[0] if said else "") if p)


def list_repo_files(hub: HubSession) -> RepoListing:
    """The commit ``hub.revision`` resolves to now, and every file there with its size and hash."""
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    info = api.model_info(hub.repo, revision=hub.revision, files_metadata=True, timeout=INFO_TIMEOUT_S)
    if not info.sha or info.siblings is None:
        raise PermanentError(f"{hub.origin}: the Hub's repo info lacks the commit or the file list")
    return RepoListing(info.sha, tuple(remote_file(hub, s) for s in info.siblings))


def remote_file(hub: HubSession, sibling: Any) -> RemoteFile:
    lfs = sibling.lfs
    if lfs is None and (sibling.size is None or sibling.blob_id is None):
        raise PermanentError(f"{hub.origin}: the Hub listed {sibling.rfilename} without its size and hash")
    if lfs is not None:
        return RemoteFile(sibling.rfilename, lfs.size, lfs.sha256.lower(), None)
    return RemoteFile(sibling.rfilename, sibling.size, None, sibling.blob_id.lower())


def select_files(hub: HubSession, listing: RepoListing, remote_code: bool) -> tuple[RemoteFile, ...]:
    """The files mlx-lm needs, by path; a repo it could not load (GGUF or PyTorch weights only, not
    a model) is refused before anything large is fetched."""
    wanted = sorted((f for f in listing.files if needed_by_mlx_lm(f.path, remote_code)), key=lambda f: f.path)
    if not loadable(f.path for f in wanted):
        raise PermanentError(f"{hub.origin} has no config.json and model*.safetensors weights for mlx-lm")
    return tuple(wanted)


def fetch_file(
    hub: HubSession, commit: str, remote: RemoteFile, dest: Path, tracker: ByteProgress
) -> ModelFile:
    """``remote`` in ``dest``, verified: kept if an earlier run already finished it, else
    downloaded (resuming a partial copy) with retries."""
    target = dest / safe_relative_path(remote.path)
    if target.is_file():
        found = kept_file(target, remote)
        if found is not None:
            tracker.update(remote.path, remote.size)
            return found
        target.unlink()
    return hub.call(download_verified, hub, commit, remote, dest, tracker)


def kept_file(target: Path, remote: RemoteFile) -> ModelFile | None:
    """The file already at ``target`` if it is ``remote`` (one read), else None."""
    if target.stat().st_size != remote.size:
        return None
    hashes = hash_file(target, remote.size, with_git_sha1=remote.in_git)
    return ModelFile(remote.path, remote.size, hashes.sha256) if remote.matches(hashes) else None


def download_verified(
    hub: HubSession, commit: str, remote: RemoteFile, dest: Path, tracker: ByteProgress
) -> ModelFile:
    """Fetch ``remote`` into its partial file (continuing it), verify it, and move it into ``dest``."""
    url, headers = locate(hub, commit, remote)
    scratch = dest / SCRATCH_DIR
    scratch.mkdir(exist_ok=True)
    part = scratch / f"{remote.etag}.part"  # by content: only ever continued with the same bytes
    with PartialFile(part, remote.size, remote.in_git, lambda n: tracker.update(remote.path, n)) as partial:
        if not partial.complete:
            stream_into(partial, url, headers)
    if partial.size != remote.size:
        raise TemporaryError(f"{hub.origin}: {remote.path}: got {partial.size} of {remote.size} bytes")
    if not remote.matches(partial.hashes):
        part.unlink(missing_ok=True)
        tracker.update(remote.path, 0)
        raise FileCorrupted(
            f"{hub.origin}: {remote.path} does not match the hash the Hub lists ({remote.etag})"
        )
    target = dest / remote.path
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, target)
    log.debug("%s: %s verified (%d bytes)", hub.origin, remote.path, remote.size)
    return ModelFile(remote.path, remote.size, partial.hashes.sha256)


def stream_into(partial: PartialFile, url: str, headers: dict[str, str]) -> None:
    """GET ``url`` into ``partial``, asking only for the bytes it lacks. Byte-exact (no gzip), so
    that a Range means what it says."""
    asked = {**headers, "Accept-Encoding": "identity"}
    if partial.size:
        asked["Range"] = f"bytes={partial.size}-"
    with get_session().stream("GET", url, headers=asked, timeout=READ_TIMEOUT_S) as response:
        hf_raise_for_status(response)
        if partial.size and response.status_code != 206:
            partial.restart()  # the server ignored the Range: the whole file is coming
        for chunk in response.iter_bytes(chunk_size=WRITE_CHUNK_BYTES):
            partial.write(chunk)


def locate(hub: HubSession, commit: str, remote: RemoteFile) -> tuple[str, dict[str, str]]:
    """Where to GET ``remote`` at ``commit`` and with which headers. The Hub answers a HEAD with the
    commit it serves and, for LFS files, a redirect to its CDN, which must not receive our token.
    (The content is checked against the listing's hash afterwards, so its ETag need not be.)"""
    url = hf_hub_url(hub.repo, remote.path, revision=commit, endpoint=hub.endpoint)
    meta = get_hf_file_metadata(url, token=hub.token, timeout=METADATA_TIMEOUT_S, endpoint=hub.endpoint)
    if meta.commit_hash != commit:
        raise TemporaryError(
            f"{hub.origin}: asked for {remote.path} at {commit}, the Hub served {meta.commit_hash}"
        )
    headers = build_hf_headers(token=hub.token)
    if same_origin(meta.location, hub.endpoint):
        return meta.location, headers
    return meta.location, {k: v for k, v in headers.items() if k.lower() != "authorization"}


def same_origin(url: str, other: str) -> bool:
    a, b = urlsplit(url), urlsplit(other)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)
