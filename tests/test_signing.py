"""Signed requests and replies (``genmlx.core.signing``): a request verifies once, with the key of the
token it was signed with, within the time window, to the host it was sent to; any change to a
signed part, a replay, a stale or future timestamp, another cluster's key or a malformed header is
refused; a reply verifies only against the request it answers, with its own body or status."""

from __future__ import annotations

import pytest

from genmlx.core.signing import (
    REPLY_HEADER,
    Keys,
    ReplayGuard,
    SignatureError,
    check_reply,
    host_is_ours,
    parse_signature,
    reply_covers_body,
    sign_reply,
    sign_request,
    signed_headers,
    verify_request,
)

KEYS = Keys.of("the-cluster-token")
NOW = 1_800_000_000.0
BODY = b'{"model": "qwen", "rank": 0}'


def signed(keys: Keys = KEYS, method: str = "POST", host: str = "10.0.0.2:6790", now: float = NOW):
    return sign_request(keys, method, host, "/api/v1/ranks?x=1", BODY, now=now)


def verify(signature, guard: ReplayGuard | None = None, now: float = NOW, **changed) -> bytes:
    request = {"method": "POST", "host": "10.0.0.2:6790", "target": "/api/v1/ranks?x=1", "body": BODY}
    request.update(changed)
    return verify_request(KEYS, signature, **request, guard=guard or ReplayGuard(), now=now)


def test_a_signed_request_verifies_once_with_the_key_it_was_signed_with() -> None:
    guard = ReplayGuard()
    signature = parse_signature(signed().header())
    assert verify(signature, guard) == KEYS.signing
    with pytest.raises(SignatureError, match="replay"):
        verify(signature, guard, now=NOW + 5)


@pytest.mark.parametrize(
    "changed",
    [
        {"method": "DELETE"},
        {"host": "10.0.0.3:6790"},
        {"target": "/api/v1/ranks?x=2"},
        {"target": "/api/v1/models"},
        {"body": BODY + b" "},
        {"body": b""},
    ],
    ids=lambda changed: next(iter(changed)),
)
def test_a_request_changed_in_any_signed_part_is_refused(changed: dict) -> None:
    with pytest.raises(SignatureError, match="does not match"):
        verify(signed(), **changed)


def test_the_host_is_compared_without_regard_to_case() -> None:
    assert verify(
        sign_request(KEYS, "POST", "Studio-A.local:6790", "/api/v1/ranks?x=1", BODY, now=NOW),
        host="studio-a.local:6790",
    )


@pytest.mark.parametrize("skew", [-61, 61, 3600])
def test_a_timestamp_outside_the_window_is_refused(skew: int) -> None:
    with pytest.raises(SignatureError, match="clock"):
        verify(signed(now=NOW + skew))


def test_a_timestamp_inside_the_window_is_accepted() -> None:
    assert verify(signed(now=NOW - 59)) and verify(signed(now=NOW + 59))


def test_another_clusters_key_is_refused_and_an_older_key_held_beside_the_new_one_is_accepted() -> None:
    other = Keys.of("another-token")
    with pytest.raises(SignatureError, match="does not hold"):
        verify(signed(keys=other))
    rotating = Keys.of("the-new-token", "the-cluster-token")
    signature = signed()
    accepted = verify_request(
        rotating, signature, "POST", "10.0.0.2:6790", "/api/v1/ranks?x=1", BODY, ReplayGuard(), now=NOW
    )
    assert accepted == KEYS.signing


def test_a_forged_signature_with_a_known_key_id_is_refused() -> None:
    genuine = signed()
    forged = type(genuine)(genuine.key_id, genuine.timestamp, genuine.nonce, "0" * 64)
    with pytest.raises(SignatureError, match="does not match"):
        verify(forged)


@pytest.mark.parametrize(
    "header",
    [
        "GenMLX-HMAC-SHA256 ",
        "GenMLX-HMAC-SHA256 key=abc",
        "GenMLX-HMAC-SHA256 key=abc, ts=soon, nonce=n, sig=s",
        "GenMLX-HMAC-SHA256 key=a, key=b, ts=1, nonce=n, sig=s",
        "GenMLX-HMAC-SHA256 key=a; ts=1; nonce=n; sig=s",
        "GenMLX-HMAC-SHA256 key=ä, ts=1, nonce=n, sig=s",
        "GenMLX-HMAC-SHA256 key=" + "a" * 10_000 + ", ts=1, nonce=n, sig=s",
    ],
)
def test_a_malformed_signature_header_is_refused(header: str) -> None:
    with pytest.raises(SignatureError):
        parse_signature(header)


def test_other_schemes_are_not_signatures() -> None:
    assert parse_signature(None) is None
    assert parse_signature("Bearer the-cluster-token") is None
    assert parse_signature("GenMLX-HMAC-SHA256x key=a") is None


def test_the_replay_guard_forgets_nonces_once_their_window_is_over_and_stays_bounded() -> None:
    guard = ReplayGuard(window_s=60, capacity=3)
    assert guard.first_use("a", NOW) and not guard.first_use("a", NOW + 1)
    assert guard.first_use("a", NOW + 121)  # refused by its timestamp by then anyway
    for nonce in "bcdef":
        assert guard.first_use(nonce, NOW + 122)
    assert len(guard._seen) <= 3


def test_a_reply_is_checked_against_the_request_it_answers() -> None:
    header = sign_reply(KEYS.signing, "nonce-1", 200, b'{"ok": true}')
    assert reply_covers_body(header)
    check_reply(KEYS, "nonce-1", 200, header, b'{"ok": true}')
    for nonce, status, body in [
        ("nonce-2", 200, b'{"ok": true}'),
        ("nonce-1", 500, b'{"ok": true}'),
        ("nonce-1", 200, b'{"ok": false}'),
    ]:
        with pytest.raises(SignatureError):
            check_reply(KEYS, nonce, status, header, body)
    with pytest.raises(SignatureError, match="not read"):
        check_reply(KEYS, "nonce-1", 200, header)


def test_a_streamed_reply_is_signed_over_its_status() -> None:
    header = sign_reply(KEYS.signing, "nonce-1", 200, None, streamed=True)
    assert not reply_covers_body(header)
    check_reply(KEYS, "nonce-1", 200, header)
    with pytest.raises(SignatureError):
        check_reply(KEYS, "nonce-1", 206, header)


@pytest.mark.parametrize("header", [None, "", "key=x, scope=body, sig=00", "scope=body", "key=, sig="])
def test_an_unsigned_or_foreign_reply_is_refused(header: str | None) -> None:
    with pytest.raises(SignatureError):
        check_reply(KEYS, "nonce-1", 200, header, b"{}")
    foreign = sign_reply(Keys.of("another-token").signing, "nonce-1", 200, b"{}")
    with pytest.raises(SignatureError, match="no key"):
        check_reply(KEYS, "nonce-1", 200, foreign, b"{}")


def test_signed_headers_name_the_host_and_path_as_sent() -> None:
    headers, nonce = signed_headers(KEYS, "GET", "http://10.0.0.2:6790/api/v1/state?tail=5", None)
    assert headers["Host"] == "10.0.0.2:6790"
    signature = parse_signature(headers["Authorization"])
    assert signature.nonce == nonce
    verify_request(KEYS, signature, "GET", "10.0.0.2:6790", "/api/v1/state?tail=5", b"", ReplayGuard())
    assert REPLY_HEADER == "GenMLX-Reply-Signature"


@pytest.mark.parametrize(
    ("host", "ours"),
    [
        ("10.0.0.2:6790", True),
        ("10.0.0.9:6790", False),
        ("10.0.0.9", False),
        ("127.0.0.1:8100", True),
        ("localhost:6790", True),
        ("studio-a.local:6790", True),
        ("[::1]:6790", True),
        ("[fe80::1]:6790", True),
        ("[fe80::2]:6790", False),
    ],
)
def test_a_request_addressed_to_another_machines_ip_is_not_ours(host: str, ours: bool) -> None:
    assert host_is_ours(host, {"10.0.0.2", "fe80::1"}) is ours
