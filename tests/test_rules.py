"""Where the session id is: a table over the whole Blazz API and the simplified form."""

from __future__ import annotations

import json
from typing import Any

import pytest

from wa_router.config import LimitsConfig, NotHereConfig, ProfileConfig, RouteRuleConfig
from wa_router.errors import RequestRejected
from wa_router.profiles import build_profile
from wa_router.rules import (
    RuleTable,
    SessionIdPolicy,
    check_path,
    extract_session,
    parse_json_object,
)
from wa_router.stores.base import Status

BLAZZ = build_profile(ProfileConfig(), None)
IDS = SessionIdPolicy(LimitsConfig().session_id_max_length, LimitsConfig().session_id_pattern)
TABLE = RuleTable(BLAZZ.rules)


def route(
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    table: RuleTable = TABLE,
) -> tuple[str, str | None, float]:
    check_path(path)
    m = table.match(method, path)
    if m is None:
        return ("no_rule", None, 0.0)
    session = None
    if m.rule.kind in ("session", "create"):
        session = extract_session(m, IDS, query=query or {}, headers=headers or {}, body=body)
    return (m.rule.kind, session, m.rule.read_timeout_s)


@pytest.mark.parametrize(
    ("method", "path", "body", "want"),
    [
        ("POST", "/api/sessions", {"session_id": "s1", "workspace_id": 1}, ("create", "s1", 60)),
        ("GET", "/api/sessions", None, ("pool_list", None, 60)),
        ("GET", "/api/sessions/s1/status", None, ("session", "s1", 60)),
        ("GET", "/api/sessions/s1/metadata", None, ("session", "s1", 60)),
        ("PUT", "/api/sessions/s1/metadata", {"x": 1}, ("session", "s1", 60)),
        ("POST", "/api/sessions/s1/reconnect", None, ("session", "s1", 60)),
        ("POST", "/api/sessions/s1/regenerate-qr", None, ("session", "s1", 60)),
        ("POST", "/api/sessions/s1/restore", None, ("create", "s1", 60)),
        ("DELETE", "/api/sessions/s1", {"workspace_id": 1}, ("session", "s1", 60)),
        (
            "POST",
            "/api/messages/send",
            {"session_id": "webjs_1_abc"},
            ("session", "webjs_1_abc", 45),
        ),
        ("POST", "/api/messages/send-media", {"session_id": "s2"}, ("session", "s2", 45)),
        ("POST", "/api/messages/bulk-send", {"session_id": "s2"}, ("session", "s2", 45)),
        ("GET", "/api/messages/s3/validate", None, ("session", "s3", 30)),
        ("GET", "/health", None, ("pool_health", None, 5)),
        ("GET", "/health/ready", None, ("any_instance", None, 5)),
        ("GET", "/health/detailed", None, ("any_instance", None, 5)),
        ("GET", "/session/s4/status", None, ("session", "s4", 30)),
        ("POST", "/session/s4/send", {"text": "x"}, ("session", "s4", 30)),
        ("GET", "/api/sessions/a%40b/status", None, ("session", "a@b", 60)),
        ("GET", "/nothing/here", None, ("no_rule", None, 0)),
        ("POST", "/health", None, ("no_rule", None, 0)),
        # HEAD is GET without the content (RFC 9110 9.3.2): wherever GET goes, HEAD goes.
        ("HEAD", "/api/sessions", None, ("pool_list", None, 60)),
        ("HEAD", "/api/messages/s3/validate", None, ("session", "s3", 30)),
        ("HEAD", "/api/sessions/s1/status", None, ("session", "s1", 60)),
    ],
)
def test_blazz_rules(
    method: str, path: str, body: dict[str, Any] | None, want: tuple[str, str | None, float]
) -> None:
    assert route(method, path, body) == want


def test_query_and_header_rules() -> None:
    table = RuleTable(
        (
            RouteRuleConfig("q", "/q/**", (), "session", "query", "session"),
            RouteRuleConfig("h", "/h/*", ("GET",), "session", "header", "X-Session-Id"),
        )
    )
    assert route("GET", "/q/a/b", query={"session": "s9"}, table=table)[1] == "s9"
    assert route("GET", "/h/x", headers={"X-Session-Id": "s8"}, table=table)[1] == "s8"
    assert route("POST", "/h/x", headers={"X-Session-Id": "s8"}, table=table)[0] == "no_rule"


@pytest.mark.parametrize(
    ("method", "path", "body", "words"),
    [
        ("GET", "/api/sessions/..%2Fhealth/status", None, "characters"),
        ("GET", "/api/sessions/a%2Fb/status", None, "characters"),
        ("GET", "/api/sessions/%2e%2e/status", None, "dot segments"),
        ("GET", "/api/sessions/../health", None, "dot segments"),
        ("GET", "/api/sessions/" + "x" * 129 + "/status", None, "longer than 128"),
        ("GET", "/api/sessions/a%20b/status", None, "characters"),
        ("GET", "/api/sessions/-lead/status", None, "characters"),
        ("POST", "/api/messages/send", {"session_id": "a/b"}, "characters"),
        ("POST", "/api/messages/send", {"session_id": ""}, "empty"),
        ("POST", "/api/messages/send", {"session_id": 12}, "must be a string"),
        ("POST", "/api/messages/send", {"message": "x"}, "missing"),
        ("POST", "/api/messages/send", None, "missing"),
    ],
)
def test_bad_session_ids_are_400(
    method: str, path: str, body: dict[str, Any] | None, words: str
) -> None:
    with pytest.raises(RequestRejected) as info:
        route(method, path, body)
    assert info.value.status == 400
    assert info.value.code == "bad_request"
    assert words in info.value.message


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        (b"", True),
        (b"{}", True),
        (b"[1]", False),
        (b"{bad", False),
        (b"\xff\xfe", False),
        # What Node's body parser takes and orjson alone does not: taken too.
        (b'\xef\xbb\xbf{"session_id": "s1"}', True),  # a UTF-8 byte order mark
        (b"\xef\xbb\xbf" + b'{"a":' * 1000 + b"1" + b"}" * 1000, True),  # as without it
        (b'{"session_id": "s1", "t": "\\ud800"}', True),  # a lone surrogate, escaped
        # ...and what JSON.parse refuses too, or what is not worth reading slowly.
        (b'{"session_id": "s1", "n": NaN}', False),
        (b'{"session_id": "s1", "n": Infinity}', False),
        (b'{"session_id": "s1", "t": "\\ud800", "n": 1e99999}', False),
        (b'{"session_id": "s1", "t": "\\ud800", "pad": "' + b"x" * (1 << 20) + b'"}', False),
        (b"\xef\xbb\xbf{bad", False),
        (b'\xef\xbb\xbf\xef\xbb\xbf{"session_id": "s1"}', False),  # Node strips one
        (b"\xef\xbb\xbf" * 2000 + b'{"session_id": "s1"}', False),  # not one per call
        (b'\xef\xbb\xbf{"session_id": "s1", "t": "\\ud800"}', True),  # both at once
        (b'{"t": "\\ud800", "n": 1' + b"0" * 309 + b"}", False),  # an int beyond a double
        (b"\xef\xbb\xbf[1]", False),
        (b'{"t": "\\ud800", "u": "\xff"}', False),  # not UTF-8
        (b"\xef\xbb\xbf" + b"[" * 100_000, False),  # too deep for any parser's stack
        (b'{"t": "\\ud800", "d": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", False),
    ],
)
def test_parse_json_object(raw: bytes, ok: bool) -> None:
    if ok:
        doc = parse_json_object(raw)
        assert doc is None or doc.get("session_id", "s1") == "s1"
    else:
        with pytest.raises(RequestRejected) as info:
            parse_json_object(raw)
        assert (info.value.status, info.value.code) == (400, "bad_request")


@pytest.mark.parametrize(
    ("status", "body", "not_here"),
    [
        (404, {"error": "Session not found"}, True),
        (404, {"error": "Endpoint not found", "path": "/x"}, False),
        (404, {"success": False, "message": "Session not found or not connected"}, True),
        (421, {}, True),
        # Blazz checks the connection before sending anything: not processed either.
        (400, {"error": "Session not connected. Please check session status."}, True),
        (400, {"error": "Missing required fields: message"}, False),
        (200, {"error": "Session not found"}, False),
    ],
)
def test_session_not_here(status: int, body: dict[str, Any], not_here: bool) -> None:
    assert BLAZZ.says_not_here(status, json.dumps(body).encode()) is not_here


@pytest.mark.parametrize(
    ("status", "body", "means"),
    [
        (404, {"error": "Session not found"}, Status.GONE),
        (421, {}, Status.GONE),
        (
            400,
            {"error": "Session not connected. Current status: authenticated"},
            Status.DISCONNECTED,
        ),
        (404, {"error": "Endpoint not found"}, None),
    ],
)
def test_what_not_here_says(status: int, body: dict[str, Any], means: Status | None) -> None:
    assert BLAZZ.not_here(status, json.dumps(body).encode()) is means


def test_not_here_answers_are_configuration() -> None:
    cfg = ProfileConfig(not_here=(NotHereConfig(409, "busy", "disconnected"),))
    profile = build_profile(cfg, None)
    assert profile.not_here(409, b'{"error":"Busy elsewhere"}') is Status.DISCONNECTED
    assert profile.not_here(400, b'{"error":"Session not connected"}') is None
    assert profile.not_here_statuses == frozenset({409})


@pytest.mark.parametrize(
    ("reported", "status"),
    [
        ("connected", Status.CONNECTED),
        ("CONNECTED", Status.CONNECTED),
        ("authenticated", Status.AUTHENTICATED),
        ("qr_scanning", Status.QR_SCANNING),
        ("disconnected", Status.DISCONNECTED),
        ("error", Status.DISCONNECTED),
        (None, None),
    ],
)
def test_reported_status_to_directory_status(reported: str | None, status: Status | None) -> None:
    assert BLAZZ.status_of(reported) is status


def test_status_ranking() -> None:
    assert BLAZZ.rank("connected") == 0
    assert BLAZZ.rank("CONNECTED") == 0
    assert BLAZZ.rank("qr_scanning") == 2
    assert BLAZZ.rank("disconnected") is None
    assert BLAZZ.rank(None) is None
