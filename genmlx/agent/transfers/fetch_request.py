"""Reading a ``POST /api/v1/models`` body into a ``FetchRequest``, refusing anything malformed.

Every refusal names the field at fault (HTTP 400), as for rank launches: the fields by the wire
type's rules, the source and the peer here.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from genmlx.agent.transfers.peer_client import Peer, PeerRefused
from genmlx.core.errors import AgentRequestError
from genmlx.wire.agent_state import FetchRequest
from genmlx.wire.codec import decode_json


class InvalidFetch(AgentRequestError):
    """A fetch request was malformed; the message names the field (HTTP 400)."""


def parse_fetch_request(body: bytes) -> FetchRequest:
    """Validate a JSON body and build the request it describes."""
    request = decode_json(FetchRequest, body, error=InvalidFetch)
    check_origin(request)
    return request


def check_origin(request: FetchRequest) -> None:
    """A source (download from it) or a peer (copy from that agent; a source given beside it is
    what the copy must hold), each well formed."""
    if request.source is None and request.peer is None:
        raise InvalidFetch("source: give a source (download) or a peer (copy from an agent)")
    if request.peer is not None:
        check_peer(request.peer)
    if request.source is not None:
        check_source(request.source)


def check_peer(peer: str) -> None:
    try:
        Peer.parse(peer, token="")
    except PeerRefused:
        raise InvalidFetch(f"peer: {peer!r} must be host:port") from None


def check_source(source: str) -> None:
    if source.startswith("hf://"):
        if hub_repo(source) is None:
            raise InvalidFetch(f"source: {source!r} must be hf://<org>/<repo>")
    elif source.startswith("file://"):
        if urlsplit(source).netloc not in ("", "localhost") or not os.path.isabs(file_source_path(source)):
            raise InvalidFetch(f"source: {source!r} must be file:///<absolute path>")
    else:
        raise InvalidFetch(f"source: {source!r} must start with hf:// or file://")


def hub_repo(source: str) -> str | None:
    """ "org/repo" of an "hf://org/repo" source, or None when it is not of that shape."""
    parts = source[len("hf://") :].split("/")
    return "/".join(parts) if len(parts) == 2 and all(parts) else None


def file_source_path(source: str) -> str:
    """The local path of a "file:///abs/path" source (percent escapes decoded)."""
    return unquote(urlsplit(source).path)
