"""Webhooks end to end: simulated instances sign, the router verifies, learns and relays to a
receiver that checks signatures exactly as Laravel's VerifyWhatsAppHmac does."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from wa_router.app import Router
from wa_router.config import Config
from wa_router.sim import SimInstance
from wa_router.stores.base import Source, Status

from .conftest import (
    API_KEY,
    StartRouter,
    free_port,
    pool_config,
    send_body,
    sends,
    wait_for,
    wait_until,
)

SECRET = "hook-secret"
HOOK = "/api/whatsapp/webhooks/webjs"


def sign(secret: str, ts: str, body: bytes) -> str:
    return hmac.new(secret.encode(), ts.encode() + body, hashlib.sha256).hexdigest()


class Laravel:
    """The receiver: Laravel's HMAC middleware (hash_equals over timestamp . raw body, and
    |now - ts| <= window), plus the pass-through routes Node calls."""

    def __init__(self, window_s: float = 300.0) -> None:
        self.window_s = window_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.events: list[dict[str, Any]] = []
        self.refused = 0
        self.answer_status = 200
        self.other: list[tuple[str, str, bytes, dict[str, str]]] = []
        self._runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        ts = request.headers.get("X-Timestamp", "")
        sig = request.headers.get("X-HMAC-Signature", "")
        fresh = ts.isdigit() and abs(time.time() - int(ts)) <= self.window_s
        if not (fresh and hmac.compare_digest(sign(SECRET, ts, raw), sig)):
            self.refused += 1
            return web.json_response({"error": "Invalid signature"}, status=401)
        if self.answer_status != 200:
            return web.json_response({"error": "nope"}, status=self.answer_status)
        self.events.append(
            {
                **json.loads(raw),
                "_instance": request.headers["X-Instance-Url"],
                "_from": request.headers.get("X-Wa-Router-Instance-Url"),
                "_member": request.headers.get("X-Wa-Router-Instance"),
                "_raw": raw,
            }
        )
        return web.json_response({"status": "ok"})

    async def _other(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.other.append((request.method, request.raw_path, body, dict(request.headers)))
        return web.json_response({"success": True, "accounts": []})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(HOOK, self._hook)
        app.router.add_route("*", "/api/whatsapp/{tail:.*}", self._other)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def seqs(self, session: str) -> list[int]:
        return [e["data"]["seq"] for e in self.events if e["data"].get("session_id") == session]


@pytest.fixture
async def laravel() -> AsyncIterator[Laravel]:
    lv = Laravel()
    await lv.start()
    yield lv
    await lv.stop()


def hook_config(sims: list[SimInstance], lv: Laravel, state: Path, **webhooks: Any) -> Config:
    wh = {
        "secrets": [SECRET],
        "laravel_url": lv.url,
        "retry_base_s": 0.05,
        "retry_max_s": 0.2,
        **webhooks,
    }
    return pool_config(sims, webhooks=wh, state={"dir": str(state)})


async def routed_hooks(
    start_router: StartRouter, cfg: Config, sims: list[SimInstance]
) -> tuple[TestClient[web.Request, web.Application], Router]:
    client, router = await start_router(cfg)
    for sim in sims:
        sim.webhook_url = str(client.make_url(HOOK))
        sim.webhook_secret = SECRET
        sim.webhook_retry_scale = 0.01
    return client, router


async def post_hook(
    client: TestClient[web.Request, web.Application],
    event: str,
    data: dict[str, Any] | None,
    *,
    ts: int | None = None,
    secret: str = SECRET,
    instance_url: str = "http://localhost:1",
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    body = (
        raw
        if raw is not None
        else json.dumps({"event": event, "data": data}, separators=(",", ":")).encode()
    )
    stamp = str(int(time.time()) if ts is None else ts)
    h = {
        "Content-Type": "application/json",
        "X-Timestamp": stamp,
        "X-HMAC-Signature": sign(secret, stamp, body),
        "X-Instance-Url": instance_url,
    }
    h.update(headers or {})
    h = {k: v for k, v in h.items() if v is not None}
    resp = await client.post(HOOK, data=body, headers=h)
    return resp.status, await resp.json()


def local(sim: SimInstance) -> str:
    return f"http://localhost:{sim.port}"


async def test_ownership_follows_one_webhook_without_a_scan(
    sims: list[SimInstance], laravel: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    client, router = await routed_hooks(start_router, hook_config(sims, laravel, tmp_path), sims)
    sims[0].add_session("w1")
    assert (await client.post("/api/messages/send", json=send_body("w1"))).status == 200
    scans = router.discovery.stats.scans
    await sims[0].move_session("w1", sims[2], notify=True)  # session_ready from node-2
    assert (await client.post("/api/messages/send", json=send_body("w1"))).status == 200
    assert router.discovery.stats.scans == scans  # no rediscovery: the webhook said it
    assert (sends(sims[0]), sends(sims[2])) == (1, 1)
    ready = [e for e in laravel.events if e["event"] == "session_ready"]
    assert len(ready) == 1
    # Laravel sends where the last session_ready's X-Instance-Url says: the router. The
    # instance it came from goes along in headers of the router's own.
    assert ready[0]["_instance"] == "http://127.0.0.1:8080"  # server.host:port by default
    assert ready[0]["_from"] == local(sims[2]) and ready[0]["_member"] == "node-2"


async def test_created_session_is_learned_through_its_login_webhooks(
    sims: list[SimInstance], laravel: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    client, router = await routed_hooks(start_router, hook_config(sims, laravel, tmp_path), sims)
    resp = await client.post(
        "/api/sessions", json={"session_id": "c1", "workspace_id": 1, "api_key": API_KEY}
    )
    assert resp.status == 200
    await wait_for(
        lambda: (
            [e["event"] for e in laravel.events]
            == ["qr_code_generated", "session_authenticated", "session_ready"]
        )
    )
    entry = await router.directory.lookup("c1")
    assert entry is not None and entry.status == "connected"
    assert entry.source.value == "webhook"


@pytest.mark.parametrize(
    ("kind", "status", "reason"),
    [
        ("forged", 401, "bad_signature"),
        ("wrong_secret", 401, "bad_signature"),
        # Not ASCII: compare_digest refused the str, once a 500 in plain text.
        ("non_ascii_signature", 401, "bad_signature"),
        ("stale", 401, "stale_timestamp"),
        ("future", 401, "future_timestamp"),
        ("no_timestamp", 401, "missing_headers"),
        ("no_signature", 401, "missing_headers"),
        ("garbled_timestamp", 401, "bad_timestamp"),
        ("not_json", 400, None),
        ("no_event", 400, None),
        ("oversize", 413, None),
    ],
)
async def test_bad_webhooks_are_refused_and_teach_nothing(
    sims: list[SimInstance],
    laravel: Laravel,
    start_router: StartRouter,
    tmp_path: Path,
    kind: str,
    status: int,
    reason: str | None,
) -> None:
    cfg = hook_config(sims, laravel, tmp_path, max_body_bytes=2048)
    client, router = await routed_hooks(start_router, cfg, sims)
    now = int(time.time())
    data = {"session_id": "evil", "phone_number": "1"}
    kw: dict[str, Any] = {
        "forged": {"headers": {"X-HMAC-Signature": "0" * 64}},
        "wrong_secret": {"secret": "guess"},
        "non_ascii_signature": {"headers": {"X-HMAC-Signature": "\u00e9" * 32}},
        # Margins past the 300 s window: `now` is floored to the second, and the router
        # reads its clock a moment later.
        "stale": {"ts": now - 310},
        "future": {"ts": now + 310},
        "no_timestamp": {"headers": {"X-Timestamp": None}},
        "no_signature": {"headers": {"X-HMAC-Signature": None}},
        "garbled_timestamp": {"headers": {"X-Timestamp": "12a"}},
        "not_json": {"raw": b"event=session_ready"},
        "no_event": {"raw": b'{"data":{"session_id":"evil"}}'},
        "oversize": {
            "raw": json.dumps(
                {"event": "session_ready", "data": {**data, "pad": "x" * 4000}}
            ).encode()
        },
    }[kind]
    code, body = await post_hook(client, "session_ready", data, instance_url=local(sims[1]), **kw)
    assert code == status, body
    assert body["error"] and body["message"]
    if reason:
        assert body["reason"] == reason
    assert await router.directory.lookup("evil") is None
    assert laravel.events == []


async def test_replay_and_node_retry_are_relayed_once(
    sims: list[SimInstance], laravel: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    client, router = await routed_hooks(start_router, hook_config(sims, laravel, tmp_path), sims)
    now = int(time.time())
    data = {"session_id": "r1", "message_id": "m1"}
    first = await post_hook(client, "message_received", data, ts=now)
    assert first == (200, {"status": "ok"})  # Laravel's own answer goes back to Node
    assert await post_hook(client, "message_received", data, ts=now) == (
        200,
        {"status": "duplicate"},
    )  # the very same request again: a replay
    # Node's retry: same body, re-signed with a new timestamp.
    assert (await post_hook(client, "message_received", data, ts=now + 2))[1] == {
        "status": "duplicate"
    }
    assert len(laravel.events) == 1
    # A different event is of course relayed.
    assert (await post_hook(client, "message_received", {**data, "message_id": "m2"}))[0] == 200
    assert len(laravel.events) == 2


async def test_logout_forgets_and_a_late_older_webhook_does_not_bring_it_back(
    sims: list[SimInstance], laravel: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    client, router = await routed_hooks(start_router, hook_config(sims, laravel, tmp_path), sims)
    now = int(time.time())
    await post_hook(
        client, "session_ready", {"session_id": "l1"}, ts=now - 10, instance_url=local(sims[1])
    )
    assert (await router.directory.lookup("l1")).instance == "node-1"  # type: ignore[union-attr]
    await post_hook(
        client,
        "session_disconnected",
        {"session_id": "l1", "reason": "LOGOUT"},
        ts=now - 5,
        instance_url=local(sims[1]),
    )
    assert await router.directory.lookup("l1") is None
    # A late retry of an older session_ready from another instance loses to the logout.
    await post_hook(
        client,
        "session_ready",
        {"session_id": "l1", "n": 2},
        ts=now - 8,
        instance_url=local(sims[3]),
    )
    assert await router.directory.lookup("l1") is None
    # A non-logout disconnect (network) does not forget.
    await post_hook(client, "session_ready", {"session_id": "l2"}, instance_url=local(sims[0]))
    await post_hook(
        client,
        "session_disconnected",
        {"session_id": "l2", "reason": "NAVIGATION"},
        instance_url=local(sims[0]),
    )
    assert (await router.directory.lookup("l2")).instance == "node-0"  # type: ignore[union-attr]
    assert len(laravel.events) == 5


async def test_unknown_instance_url_is_not_learned_but_still_relayed(
    sims: list[SimInstance], laravel: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    client, router = await routed_hooks(start_router, hook_config(sims, laravel, tmp_path), sims)
    code, _ = await post_hook(
        client, "session_ready", {"session_id": "u1"}, instance_url="http://localhost:9"
    )
    assert code == 200
    assert await router.directory.lookup("u1") is None
    assert router.webhooks.stats.unknown_instance == 1
    assert [e["data"]["session_id"] for e in laravel.events] == ["u1"]


@pytest.mark.parametrize("session", ["a/b", "s" * 300, "a b"])
async def test_a_session_id_no_request_may_name_is_not_learned_but_still_relayed(
    sims: list[SimInstance],
    laravel: Laravel,
    start_router: StartRouter,
    tmp_path: Path,
    session: str,
) -> None:
    """Signed (the pool's own), but an id a request naming it would get a 400 for: once it
    went into the directory. Laravel still hears the event; the directory does not."""
    client, router = await routed_hooks(start_router, hook_config(sims, laravel, tmp_path), sims)
    code, _ = await post_hook(
        client, "session_ready", {"session_id": session}, instance_url=local(sims[1])
    )
    assert code == 200
    assert await router.directory.lookup(session) is None
    assert router.webhooks.stats.bad_session_id == 1
    assert [e["data"]["session_id"] for e in laravel.events] == [session]


async def test_a_logout_forgets_a_session_id_learned_before_the_policy_refused_it(
    sims: list[SimInstance], laravel: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    """An id in the directory from before a reload tightened the id policy (put there
    directly: no webhook could put it there now): its logout still forgets it, and Laravel
    still hears of the logout, even from an instance that is not its owner."""
    client, router = await routed_hooks(start_router, hook_config(sims, laravel, tmp_path), sims)
    session = "a/b"
    assert await router.directory.observe(
        session, "node-0", Source.WEBHOOK, status=Status.CONNECTED
    )
    code, _ = await post_hook(
        client,
        "session_disconnected",
        {"session_id": session, "reason": "LOGOUT"},
        instance_url=local(sims[1]),
    )
    assert code == 200
    assert await router.directory.lookup(session) is None
    assert [e["data"]["session_id"] for e in laravel.events] == [session]
    # One the directory never had: nothing is written for it, not even a tombstone.
    stored = len(router.directory.store)  # type: ignore[arg-type]
    code, _ = await post_hook(
        client,
        "session_disconnected",
        {"session_id": "c/d", "reason": "LOGOUT"},
        instance_url=local(sims[1]),
    )
    assert code == 200 and len(router.directory.store) == stored  # type: ignore[arg-type]
    assert [e["data"]["session_id"] for e in laravel.events] == [session, "c/d"]


async def test_laravel_refusal_goes_back_to_node_and_is_not_queued(
    sims: list[SimInstance], laravel: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    client, router = await routed_hooks(start_router, hook_config(sims, laravel, tmp_path), sims)
    laravel.answer_status = 422
    code, body = await post_hook(client, "message_received", {"session_id": "x"})
    assert (code, body) == (422, {"error": "nope"})
    assert router.webhooks.backlog is not None and await router.webhooks.backlog.size() == 0


async def test_laravel_down_then_back_every_webhook_once_in_order(
    sims: list[SimInstance], laravel: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    client, router = await routed_hooks(start_router, hook_config(sims, laravel, tmp_path), sims)
    await laravel.stop()
    sessions = ["a", "b", "c"]
    for seq in range(10):
        for n, s in enumerate(sessions):
            code = await sims[n].emit("message_received", {"session_id": s, "seq": seq})
            assert code == 202  # queued: Node is told we have it
    backlog = router.webhooks.backlog
    assert backlog is not None and await backlog.size() == 30
    await wait_for(lambda: router.webhooks.deliverer.relay.failures >= 3)  # type: ignore[union-attr]
    # An event for a session with a backlog queues behind it even once Laravel is back.
    await laravel.start()
    await wait_for(lambda: len(laravel.events) == 30, timeout_s=15, what="backlog delivered")
    for s in sessions:
        assert laravel.seqs(s) == list(range(10))
    assert laravel.refused == 0
    # Laravel records an event before it answers; the backlog lets go of it on the answer.
    await wait_until(lambda: _empty(backlog), what="the backlog acked")
    # Nothing more arrives later (no second delivery).
    assert (await sims[0].emit("message_received", {"session_id": "a", "seq": 10})) == 200
    assert laravel.seqs("a") == list(range(11))


async def _empty(backlog: Any) -> bool:
    return bool(await backlog.size() == 0)


async def test_backlog_survives_a_router_restart(
    sims: list[SimInstance], laravel: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    cfg = hook_config(sims, laravel, tmp_path)
    client, router = await routed_hooks(start_router, cfg, sims)
    await laravel.stop()
    for seq in range(5):
        assert (await sims[1].emit("message_received", {"session_id": "p", "seq": seq})) == 202
    await client.close()  # the router stops with 5 webhooks pending
    await laravel.start()
    client2, router2 = await routed_hooks(start_router, cfg, sims)
    await wait_for(lambda: len(laravel.events) == 5, timeout_s=15, what="delivery after restart")
    assert laravel.seqs("p") == [0, 1, 2, 3, 4]


async def test_aged_webhook_is_resigned_for_the_receivers_window(
    sims: list[SimInstance], start_router: StartRouter, tmp_path: Path
) -> None:
    strict = Laravel(window_s=60)  # a receiver with a tighter window than the webhook's age
    cfg = hook_config(sims, strict, tmp_path, resign_after_s=30)
    client, router = await routed_hooks(start_router, cfg, sims)
    sims[0].clock = lambda: time.time() - 100  # signed 100 s ago: fine for the router (300 s)
    assert (await sims[0].emit("message_received", {"session_id": "old", "seq": 0})) == 202
    await strict.start()
    try:
        await wait_for(lambda: len(strict.events) == 1, timeout_s=15, what="re-signed delivery")
        assert (
            strict.events[0]["_raw"]
            == json.dumps(
                {"event": "message_received", "data": {"session_id": "old", "seq": 0}},
                separators=(",", ":"),
            ).encode()
        )  # the raw bytes, unchanged
    finally:
        await strict.stop()


async def test_full_backlog_answers_429_so_node_keeps_the_event(
    sims: list[SimInstance], laravel: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    cfg = hook_config(sims, laravel, tmp_path, backlog_max_items=2)
    client, router = await routed_hooks(start_router, cfg, sims)
    await laravel.stop()
    assert (await post_hook(client, "message_received", {"session_id": "f", "seq": 0}))[0] == 202
    assert (await post_hook(client, "message_received", {"session_id": "f", "seq": 1}))[0] == 202
    now = int(time.time())
    code, body = await post_hook(client, "message_received", {"session_id": "f", "seq": 2}, ts=now)
    assert code == 429 and body["error"] == "backlog_full"
    await laravel.start()
    await wait_for(lambda: len(laravel.events) == 2, timeout_s=15)
    # Node's retry of the refused one (re-signed) is taken, not called a duplicate.
    code, _ = await post_hook(client, "message_received", {"session_id": "f", "seq": 2}, ts=now + 1)
    assert code == 200
    assert laravel.seqs("f") == [0, 1, 2]


async def test_nodes_other_calls_to_laravel_pass_through(
    sims: list[SimInstance], laravel: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    client, _ = await routed_hooks(start_router, hook_config(sims, laravel, tmp_path), sims)
    resp = await client.get("/api/whatsapp/accounts/active?instance=3001")
    assert resp.status == 200 and (await resp.json())["success"] is True
    body = b'{"session_id":"s","chats":[]}'
    # chats/sync is signed as webhooks are: a forged one is refused here, and so never
    # counts against Laravel's per-IP limiter, which is the router's (laravel_budget.py).
    stamp = str(int(time.time()))
    resp = await client.post(
        "/api/whatsapp/chats/sync",
        data=body,
        headers={
            "X-Timestamp": stamp,
            "X-HMAC-Signature": "0" * 64,
            "Content-Type": "application/json",
        },
    )
    assert resp.status == 401 and (await resp.json())["reason"] == "bad_signature"
    assert laravel.other[-1][1] != "/api/whatsapp/chats/sync"  # not passed on
    signature = sign(SECRET, stamp, body)
    resp = await client.post(
        "/api/whatsapp/chats/sync",
        data=body,
        headers={
            "X-Timestamp": stamp,
            "X-HMAC-Signature": signature,
            "Content-Type": "application/json",
        },
    )
    assert resp.status == 200
    resp = await client.post("/api/whatsapp/mobile-activity", json={"session_id": "s"})
    assert resp.status == 200
    (m1, p1, _, _), (m2, p2, b2, h2), (m3, p3, _, _) = laravel.other
    assert (m1, p1) == ("GET", "/api/whatsapp/accounts/active?instance=3001")
    assert (m2, p2, b2) == ("POST", "/api/whatsapp/chats/sync", body)
    assert h2["X-HMAC-Signature"] == signature and h2["X-Timestamp"] == stamp
    assert (m3, p3) == ("POST", "/api/whatsapp/mobile-activity")
    await laravel.stop()
    resp = await client.get("/api/whatsapp/accounts/active")
    assert resp.status == 502 and (await resp.json())["error"] == "upstream_unreachable"


async def test_new_webhook_waits_behind_its_sessions_backlog(
    sims: list[SimInstance], laravel: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    cfg = hook_config(sims, laravel, tmp_path, retry_base_s=1.0, retry_max_s=1.0)
    client, router = await routed_hooks(start_router, cfg, sims)
    await laravel.stop()
    for seq in range(3):
        assert (await sims[0].emit("message_received", {"session_id": "a", "seq": seq})) == 202
    await wait_for(lambda: router.webhooks.deliverer.relay.failures >= 1)  # type: ignore[union-attr]
    await laravel.start()  # back, but the backlog's next try is up to a second away
    assert (await sims[0].emit("message_received", {"session_id": "a", "seq": 3})) == 202
    assert (await sims[1].emit("message_received", {"session_id": "z", "seq": 0})) == 200
    await wait_for(lambda: len(laravel.events) == 5, timeout_s=15)
    assert laravel.seqs("a") == [0, 1, 2, 3]


async def test_key_rotation_accepts_every_configured_secret(
    sims: list[SimInstance], laravel: Laravel, start_router: StartRouter, tmp_path: Path
) -> None:
    cfg = pool_config(
        sims, webhooks={"secrets": ["new-secret", SECRET]}, state={"dir": str(tmp_path)}
    )
    client, router = await start_router(cfg)
    for n, secret in enumerate(["new-secret", SECRET]):
        code, body = await post_hook(
            client,
            "session_ready",
            {"session_id": f"k{n}"},
            secret=secret,
            instance_url=local(sims[n]),
        )
        assert (code, body) == (200, {"status": "accepted"})  # no Laravel: learned only
        assert (await router.directory.lookup(f"k{n}")).instance == sims[n].name  # type: ignore[union-attr]
    code, body = await post_hook(client, "session_ready", {"session_id": "k9"}, secret="old")
    assert code == 401 and body["reason"] == "bad_signature"
