"""Node's calls to Laravel through the router: every spelling of the webhook path is
verified as a webhook; only the calls Node makes go on; the rest never reaches Laravel.
Raw bytes on a socket, so no client library tidies the paths first."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from wa_router.gate import PASS, REFUSE, WEBHOOK, decide_path
from wa_router.sim import SimInstance, sign_webhook

from .conftest import StartRouter
from .test_webhooks import SECRET, Laravel, hook_config

HOOK = "/api/whatsapp/webhooks/webjs"


@pytest.fixture
async def stand_in() -> AsyncIterator[Laravel]:
    lv = Laravel()
    await lv.start()
    yield lv
    await lv.stop()


@pytest.mark.parametrize(
    ("method", "path", "kind", "status"),
    [
        ("POST", HOOK, WEBHOOK, 200),
        ("POST", HOOK + "/", WEBHOOK, 200),
        ("POST", "/api/whatsapp/webhooks//webjs", WEBHOOK, 200),
        ("POST", "/api/whatsapp//webhooks/webjs/", WEBHOOK, 200),
        ("POST", "/api/whatsapp/WebHooks/WEBJS", WEBHOOK, 200),
        ("POST", "/api/whatsapp/x/../webhooks/webjs", REFUSE, 400),
        ("POST", "/api/whatsapp/x/%2e%2e/webhooks/webjs", REFUSE, 400),
        ("POST", "/api/whatsapp/x/%2E./webhooks/webjs", REFUSE, 400),
        ("GET", "/api/whatsapp/../../admin/secret", REFUSE, 400),
        ("GET", "/api/whatsapp/./accounts/active", REFUSE, 400),
        ("GET", "/api/whatsapp/accounts%2factive", REFUSE, 400),
        ("GET", "/api/whatsapp/accounts/active", PASS, 200),
        ("GET", "/api/whatsapp/accounts//active", REFUSE, 400),
        ("GET", "/api/whatsapp/accounts/active/", REFUSE, 400),
        ("POST", "/api/whatsapp/accounts/active", REFUSE, 404),
        ("POST", "/api/whatsapp/chats/sync", PASS, 200),
        ("POST", "/api/whatsapp/sessions/s1/mark-disconnected", PASS, 200),
        ("POST", "/api/whatsapp/sessions//mark-disconnected", REFUSE, 400),
        ("POST", "/api/whatsapp/mobile-activity", PASS, 200),
        ("GET", "/api/whatsapp/admin/users", REFUSE, 404),
        ("DELETE", "/api/whatsapp/chats/sync", REFUSE, 404),
    ],
)
def test_decide_path(method: str, path: str, kind: str, status: int) -> None:
    d = decide_path(method, path, HOOK)
    assert (d.kind, d.status) == (kind, status)


async def raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1])
    payload = data.split(b"\r\n\r\n", 1)[1]
    return status, json.loads(payload) if payload.strip().startswith(b"{") else {}


def forged(path: str, body: bytes) -> str:
    return (
        f"POST {path} HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        f"X-Timestamp: {int(time.time())}\r\nX-HMAC-Signature: {'0' * 64}\r\n"
        f"X-Instance-Url: http://localhost:1\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n"
    )


async def test_no_spelling_gets_a_forged_webhook_or_a_stray_call_to_laravel(
    sims: list[SimInstance],
    stand_in: Laravel,
    start_router: StartRouter,
    tmp_path: Path,
) -> None:
    laravel = stand_in
    client, router = await start_router(hook_config(sims, laravel, tmp_path))
    port = client.port
    assert port is not None
    body = b'{"event":"session_ready","data":{"session_id":"s1"}}'
    for path in (
        HOOK + "/",
        "/api/whatsapp/webhooks//webjs",
        "/api/whatsapp//webhooks/webjs/",
        "/api/whatsapp/WebHooks/webjs",
    ):
        status, doc = await raw_request(port, forged(path, body), body)
        assert status == 401 and doc["error"] == "unauthorized", (path, status, doc)
    for path in ("/api/whatsapp/x/../webhooks/webjs", "/api/whatsapp/x/%2e%2e/webhooks/webjs"):
        status, doc = await raw_request(port, forged(path, body), body)
        assert status == 400 and doc["error"] == "bad_request", (path, status, doc)
    for head, want in (
        ("GET /api/whatsapp/../../admin/secret HTTP/1.1\r\nHost: r\r\nConnection: close\r\n", 400),
        ("GET /api/whatsapp/admin/users HTTP/1.1\r\nHost: r\r\nConnection: close\r\n", 404),
        ("GET /api/whatsapp/accounts//active HTTP/1.1\r\nHost: r\r\nConnection: close\r\n", 400),
    ):
        status, doc = await raw_request(port, head)
        assert status == want and "error" in doc, (head, status, doc)
    assert laravel.events == [] and laravel.other == []  # nothing reached Laravel
    # What Node really calls goes on.
    status, _ = await raw_request(
        port, "GET /api/whatsapp/accounts/active HTTP/1.1\r\nHost: r\r\nConnection: close\r\n"
    )
    assert status == 200 and [o[1] for o in laravel.other] == ["/api/whatsapp/accounts/active"]
    assert router.webhooks.stats.rejected.get("bad_signature") == 4


async def test_a_timestamp_in_other_digits_and_a_body_nested_too_deep_are_refused_in_json(
    sims: list[SimInstance], stand_in: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    """Both correctly signed (the sender has the secret), neither a webhook Laravel could
    take: `int()` reads Arabic-Indic digits as a time PHP reads as 0, and a body nested
    deeper than the parser's stack once answered a plain-text 500 (the event lost)."""
    laravel = stand_in
    client, router = await start_router(hook_config(sims, laravel, tmp_path))
    port = client.port
    assert port is not None
    body = b'{"event":"message_received","data":{"session_id":"s1","text":"hi"}}'
    digits = "".join(chr(0x0660 + int(d)) for d in str(int(time.time())))  # same time
    head = (
        f"POST {HOOK} HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        f"X-Timestamp: {digits}\r\nX-HMAC-Signature: {sign_webhook(SECRET, digits, body)}\r\n"
        f"X-Instance-Url: http://localhost:1\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n"
    )
    status, doc = await raw_request(port, head, body)
    assert (status, doc["error"], doc["reason"]) == (401, "unauthorized", "bad_timestamp")

    deep = b'{"event":"message_received","data":{"session_id":"s1","x":%s1%s}}' % (
        b"[" * 5000,
        b"]" * 5000,
    )
    stamp = str(int(time.time()))
    head = (
        f"POST {HOOK} HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        f"X-Timestamp: {stamp}\r\nX-HMAC-Signature: {sign_webhook(SECRET, stamp, deep)}\r\n"
        f"X-Instance-Url: http://localhost:1\r\nContent-Length: {len(deep)}\r\n"
        "Connection: close\r\n"
    )
    status, doc = await raw_request(port, head, deep)
    assert status == 400 and "nested too deeply" in str(doc["message"]), (status, doc)
    assert laravel.events == []  # neither went on
    # The router still serves: a plain webhook after them is relayed.
    stamp = str(int(time.time()))
    head = (
        f"POST {HOOK} HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        f"X-Timestamp: {stamp}\r\nX-HMAC-Signature: {sign_webhook(SECRET, stamp, body)}\r\n"
        f"X-Instance-Url: http://localhost:1\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n"
    )
    status, _ = await raw_request(port, head, body)
    assert status == 200 and len(laravel.events) == 1
