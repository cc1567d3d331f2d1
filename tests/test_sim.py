"""The simulated Blazz instance, tested over real loopback sockets.

Webhooks go to a receiver that verifies them exactly like Laravel's VerifyWhatsAppHmac:
`hash_equals(hash_hmac('sha256', $ts . $rawBody, $secret), $sig)` and `|now - ts| <= 300`.
Around restarts the sims talk to a `SimLaravel` (webhooks, accounts/active) and share a
`SessionFolder`, as Blazz's PM2 pool does: restore on start, the authenticated window,
identical lifecycle bodies, the CONFLICT takeover, DELETE on a non-holder.
Nothing waits on a fixed sleep: `wait_for` polls a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from wa_router.sim import SessionFolder, SimInstance, SimLaravel, sign_webhook

from .conftest import free_port, wait_for

KEY = "test-key"
SECRET = "test-secret"

MakeSim = Callable[..., Awaitable[SimInstance]]
ServerFactory = Callable[..., Awaitable[TestServer]]


def stepping_clock() -> Callable[[], float]:
    """Each call one second later: a retry 10 ms later still gets a new X-Timestamp."""
    base = time.time()
    counter = itertools.count()
    return lambda: base + next(counter)


@dataclass
class Hit:
    raw: bytes
    headers: dict[str, str]
    valid: bool

    @property
    def event(self) -> Any:
        return json.loads(self.raw)["event"]

    @property
    def data(self) -> Any:
        return json.loads(self.raw)["data"]


class Receiver:
    """Laravel's webhook endpoint: verifies, records, answers scripted statuses (then 200)."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.hits: list[Hit] = []
        self.script: list[int] = []
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()  # the raw bytes, never re-serialised JSON
        ts = request.headers.get("X-Timestamp", "")
        sig = request.headers.get("X-HMAC-Signature", "")
        expected = hmac.new(self.secret.encode(), ts.encode() + raw, hashlib.sha256).hexdigest()
        valid = (
            ts.isdigit()
            and hmac.compare_digest(expected, sig)
            and abs(time.time() - int(ts)) <= 300
        )
        self.hits.append(Hit(raw, dict(request.headers), valid))
        if not valid:
            return web.json_response({"error": "Invalid signature"}, status=401)
        status = self.script.pop(0) if self.script else 200
        return web.json_response({"ok": status < 300}, status=status)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/whatsapp/webhooks/webjs", self.handle)
        return app

    def url_for(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/api/whatsapp/webhooks/webjs"

    @property
    def url(self) -> str:
        assert self.server is not None and self.server.port is not None
        return self.url_for(self.server.port)

    def events(self) -> list[str]:
        return [h.event for h in self.hits]


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    sims: list[SimInstance] = []

    async def make(**kwargs: Any) -> SimInstance:
        defaults = {"webhook_retry_scale": 0.01, "connect_delay_s": 0.02, "ready_delay_s": 0.02}
        sim = SimInstance(**{**defaults, **kwargs})
        await sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.stop()


@pytest.fixture
async def receiver(aiohttp_server: ServerFactory) -> Receiver:
    rec = Receiver()
    rec.server = await aiohttp_server(rec.app())
    return rec


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, url, **kwargs) as resp:
        return resp.status, await resp.json()


# -- HTTP API ---------------------------------------------------------------------------


async def test_auth_query_for_get_body_for_post_header_ignored(
    make_sim: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    sim.add_session("s1")
    invalid = {"error": "Invalid API key"}
    assert await call(http, "GET", f"{sim.url}/api/sessions") == (401, invalid)
    assert await call(http, "GET", f"{sim.url}/api/sessions?api_key=nope") == (401, invalid)
    # Node ignores X-API-Key: the header alone is a 401, for GET and POST alike.
    hdr = {"X-API-Key": KEY}
    assert await call(http, "GET", f"{sim.url}/api/sessions", headers=hdr) == (401, invalid)
    send = {"session_id": "s1", "recipient_phone": "6281", "message": "hi", "type": "text"}
    status, _ = await call(http, "POST", f"{sim.url}/api/messages/send", json=send, headers=hdr)
    assert status == 401
    assert (await call(http, "POST", f"{sim.url}/api/messages/send", json=send))[0] == 401
    status, _ = await call(
        http, "POST", f"{sim.url}/api/messages/send", json={**send, "api_key": KEY}
    )
    assert status == 200
    assert (await call(http, "GET", f"{sim.url}/api/sessions?api_key={KEY}"))[0] == 200
    assert (await call(http, "DELETE", f"{sim.url}/api/sessions/s1"))[0] == 401
    # Bad JSON is Express's 400, before any key check.
    status, body = await call(
        http,
        "POST",
        f"{sim.url}/api/sessions",
        data=b"{nope",
        headers={"Content-Type": "application/json"},
    )
    assert status == 400 and "error" in body


@pytest.mark.parametrize(("header_bytes", "status"), [(12 * 1024, 200), (20 * 1024, 431)])
async def test_a_head_is_taken_up_to_node_s_16_kib(
    make_sim: MakeSim, http: aiohttp.ClientSession, header_bytes: int, status: int
) -> None:
    """Node takes a head of up to 16 KiB (aiohttp alone refuses a line over 8 KiB) and
    answers 431 past it: a router forwarding a large head sees what the real pool says."""
    sim = await make_sim()
    headers = {"X-Big": "x" * header_bytes}
    async with http.get(f"{sim.url}/api/sessions?api_key={KEY}", headers=headers) as resp:
        assert resp.status == status
    assert len(sim.received) == (1 if status == 200 else 0)


async def test_session_not_found_is_not_endpoint_not_found(
    make_sim: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    q = f"?api_key={KEY}"
    assert await call(http, "GET", f"{sim.url}/api/sessions/ghost/status{q}") == (
        404,
        {"error": "Session not found"},
    )
    status, body = await call(
        http,
        "POST",
        f"{sim.url}/api/messages/send",
        json={"session_id": "ghost", "recipient_phone": "1", "message": "m", "api_key": KEY},
    )
    assert (status, body) == (404, {"error": "Session not found"})
    for method, path in [
        ("GET", "/nope"),
        ("GET", "/api/sessions/x/bogus"),
        ("PATCH", "/api/sessions"),
    ]:
        status, body = await call(http, method, f"{sim.url}{path}{q}")
        assert status == 404 and body["error"] == "Endpoint not found" and body["path"] == path


async def test_create_goes_qr_scanning_then_connected(
    make_sim: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    create = {"session_id": "s1", "workspace_id": 7, "api_key": KEY}
    assert await call(http, "POST", f"{sim.url}/api/sessions", json=create) == (
        200,
        {"success": True, "session_id": "s1", "status": "qr_scanning"},
    )
    statuses: list[str] = []

    async def poll() -> str:
        _, body = await call(http, "GET", f"{sim.url}/api/sessions/s1/status?api_key={KEY}")
        statuses.append(body["status"])
        return str(body["status"])

    deadline = time.monotonic() + 3
    while await poll() != "connected":
        assert time.monotonic() < deadline
    assert statuses[0] == "qr_scanning"
    _, body = await call(http, "GET", f"{sim.url}/api/sessions/s1/status?api_key={KEY}")
    assert body["workspace_id"] == 7 and body["phone_number"] and body["connected_at"]
    assert set(body) == {
        "session_id",
        "status",
        "phone_number",
        "workspace_id",
        "connected_at",
        "last_activity",
    }

    _, listing = await call(http, "GET", f"{sim.url}/api/sessions?api_key={KEY}")
    assert listing["success"] is True and listing["total"] == 1
    assert listing["sessions"][0]["session_id"] == "s1"
    assert set(listing["sessions"][0]) == {
        "session_id",
        "workspace_id",
        "status",
        "phone_number",
        "connected_at",
    }
    # A second create answers the current status, it does not reset the session.
    status, body = await call(http, "POST", f"{sim.url}/api/sessions", json=create)
    assert status == 200 and body["status"] == "connected"
    status, _ = await call(http, "POST", f"{sim.url}/api/sessions", json={"api_key": KEY})
    assert status == 400


async def test_send_ids_unique_and_not_connected_is_400(
    make_sim: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    sim.add_session("s1")
    sim.add_session("s2", status="qr_scanning")
    msg = {
        "session_id": "s1",
        "workspace_id": 1,
        "recipient_phone": "628111",
        "message": "hi",
        "type": "text",
    }
    ids = set()
    for _ in range(3):
        status, body = await call(
            http, "POST", f"{sim.url}/api/messages/send", json={**msg, "api_key": KEY}
        )
        assert status == 200 and body["success"] is True and "timestamp" in body
        ids.add(body["message_id"])
    assert len(ids) == 3
    status, body = await call(
        http,
        "POST",
        f"{sim.url}/api/messages/send",
        json={**msg, "session_id": "s2", "api_key": KEY},
    )
    assert (status, body) == (400, {"error": "Session not connected. Please check session status."})
    status, body = await call(
        http,
        "POST",
        f"{sim.url}/api/messages/send-media",
        json={**msg, "api_key": KEY, "type": "image"},
    )
    assert status == 200 and body["message_id"] not in ids
    bulk = {
        "session_id": "s1",
        "api_key": KEY,
        "messages": [{"recipient_phone": "1", "message": "a"}, {}],
    }
    status, body = await call(http, "POST", f"{sim.url}/api/messages/bulk-send", json=bulk)
    assert status == 200 and (body["total"], body["sent"], body["failed"]) == (2, 1, 1)
    _, body = await call(http, "GET", f"{sim.url}/api/messages/s2/validate?api_key={KEY}")
    assert (body["success"], body["session_id"], body["can_send"]) == (True, "s2", False)


async def test_delete_is_idempotent_and_emits_logout(
    make_sim: MakeSim, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    sim = await make_sim(webhook_url=receiver.url)
    sim.add_session("s1")
    for _ in range(2):
        status, body = await call(
            http, "DELETE", f"{sim.url}/api/sessions/s1", json={"workspace_id": 1, "api_key": KEY}
        )
        assert status == 200 and body["success"] is True
    assert "s1" not in sim.sessions
    await sim.wait_webhooks_idle()
    assert receiver.events() == ["session_disconnected"]
    assert receiver.hits[0].data == {"session_id": "s1", "workspace_id": 1, "reason": "LOGOUT"}


async def test_metadata_reconnect_restore(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    sim.add_session("s1")
    url = f"{sim.url}/api/sessions/s1"
    status, body = await call(
        http, "PUT", f"{url}/metadata", json={"api_key": KEY, "metadata": {"a": 1}}
    )
    assert status == 200 and body["metadata"] == {"a": 1}
    assert (await call(http, "GET", f"{url}/metadata?api_key={KEY}"))[1]["metadata"] == {"a": 1}
    status, body = await call(http, "POST", f"{url}/reconnect", json={"api_key": KEY})
    assert status == 200 and sim.sessions["s1"].status == "qr_scanning"
    await wait_for(lambda: sim.sessions["s1"].status == "connected")
    ghost = f"{sim.url}/api/sessions/ghost"
    assert (await call(http, "POST", f"{ghost}/regenerate-qr", json={"api_key": KEY}))[0] == 404
    assert (await call(http, "POST", f"{ghost}/restore", json={"api_key": KEY, "workspace_id": 3}))[
        0
    ] == 200
    await wait_for(lambda: sim.sessions["ghost"].status == "connected")
    assert sim.sessions["ghost"].workspace_id == 3


async def test_health_and_unhealthy(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    sim.add_session("s1")
    sim.add_session("s2", status="disconnected")
    status, body = await call(http, "GET", f"{sim.url}/health")
    assert status == 200 and body["status"] == "healthy"
    assert body["sessions"] == {"total": 2, "connected": 1, "disconnected": 1}
    assert {"uptime", "memory", "timestamp"} <= set(body)
    for path in ("/health/ready", "/health/live", "/health/detailed", "/health/metrics"):
        assert (await call(http, "GET", f"{sim.url}{path}"))[0] == 200
    sim.unhealthy = True
    status, body = await call(http, "GET", f"{sim.url}/health")
    assert status == 500 and body["status"] == "unhealthy"
    assert (await call(http, "GET", f"{sim.url}/health/ready"))[0] == 503
    assert (await call(http, "GET", f"{sim.url}/health/live"))[0] == 200


async def test_received_records_on_arrival_and_count(
    make_sim: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    sim.add_session("s1")
    sim.route_delay_s["/api/messages/send"] = 0.3
    body = {"session_id": "s1", "recipient_phone": "1", "message": "m", "api_key": KEY}
    task = asyncio.create_task(
        call(http, "POST", f"{sim.url}/api/messages/send?x=1", json=body, headers={"x-trace": "t1"})
    )
    await wait_for(lambda: sim.count("POST", "/api/messages/send") == 1)
    assert not task.done()  # recorded before the delay, on arrival
    got = sim.received[0]
    assert (got.method, got.path, got.query, got.json) == (
        "POST",
        "/api/messages/send",
        {"x": "1"},
        body,
    )
    assert got.headers["X-Trace"] == "t1"  # case-insensitive lookup
    assert (await task)[0] == 200
    await call(http, "GET", f"{sim.url}/health")
    assert sim.count() == 2 and sim.count("get") == 1 and sim.count(path="/health") == 1
    sim.reset_counters()
    assert sim.count() == 0 and sim.webhooks == []


# -- crash and restart ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hang", "delay"])
async def test_stop_aborts_in_flight_and_refuses_new_connects(
    make_sim: MakeSim, http: aiohttp.ClientSession, mode: str
) -> None:
    sim = await make_sim()
    if mode == "hang":
        sim.hang = True
    else:
        sim.delay_s = 30.0
    task = asyncio.create_task(call(http, "GET", f"{sim.url}/health"))
    await wait_for(lambda: sim.count(path="/health") == 1)
    started = time.monotonic()
    await sim.stop()
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await task
    assert time.monotonic() - started < 2
    assert not sim.running
    with pytest.raises(aiohttp.ClientConnectorError):
        await call(http, "GET", f"{sim.url}/health")
    await sim.stop()  # idempotent


async def test_restart_keeps_port(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    port = sim.port
    assert port != 0 and sim.url == f"http://127.0.0.1:{port}"
    sim.add_session("s1")
    await sim.restart(keep_sessions=True)
    assert sim.port == port and "s1" in sim.sessions
    assert (await call(http, "GET", f"{sim.url}/api/sessions/s1/status?api_key={KEY}"))[0] == 200
    await sim.restart()
    assert sim.port == port and sim.sessions == {}
    assert (await call(http, "GET", f"{sim.url}/health"))[0] == 200


# -- webhooks ---------------------------------------------------------------------------


def test_sign_webhook_matches_laravel() -> None:
    body = b'{"event":"session_ready","data":{"session_id":"s1"}}'
    expected = hmac.new(b"k", b"1700000000" + body, hashlib.sha256).hexdigest()
    assert sign_webhook("k", "1700000000", body) == expected
    assert expected == expected.lower() and len(expected) == 64


async def test_create_sends_signed_lifecycle_webhooks(
    make_sim: MakeSim, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    sim = await make_sim(webhook_url=receiver.url)
    create = {"session_id": "s1", "workspace_id": 2, "api_key": KEY}
    assert (await call(http, "POST", f"{sim.url}/api/sessions", json=create))[0] == 200
    await wait_for(lambda: "session_ready" in receiver.events())
    assert receiver.events() == ["qr_code_generated", "session_authenticated", "session_ready"]
    assert all(h.valid for h in receiver.hits)
    ready = receiver.hits[-1]
    assert ready.headers["X-Instance-Url"] == f"http://localhost:{sim.port}"
    assert ready.headers["Content-Type"] == "application/json"
    assert ready.data["session_id"] == "s1" and ready.data["phone_number"]
    assert ready.raw == json.dumps(json.loads(ready.raw), separators=(",", ":")).encode()
    assert receiver.hits[0].data["qr_code"]
    await sim.wait_webhooks_idle()
    assert [(w.event, w.status, w.attempt) for w in sim.webhooks][-1] == ("session_ready", 200, 1)


async def test_emits_are_ordered_and_move_session_announces_new_owner(
    make_sim: MakeSim, receiver: Receiver
) -> None:
    url = receiver.url
    a, b = await make_sim(webhook_url=url), await make_sim(webhook_url=url)
    for i in range(5):
        a.notify("message_received", {"session_id": "s1", "n": i})
    await a.wait_webhooks_idle()
    assert [h.data["n"] for h in receiver.hits] == list(range(5))
    a.add_session("s1", phone_number="62800")
    await a.move_session("s1", b, notify=True)
    assert "s1" not in a.sessions and b.sessions["s1"].status == "connected"
    last = receiver.hits[-1]
    assert last.event == "session_ready" and last.data["phone_number"] == "62800"
    assert last.headers["X-Instance-Url"] == f"http://localhost:{b.port}"
    assert await a.emit("connection_test", None) == 200
    assert receiver.hits[-1].data == {}


async def test_webhook_429_retried_resigned_same_body(
    make_sim: MakeSim, receiver: Receiver
) -> None:
    sim = await make_sim(webhook_url=receiver.url)
    sim.clock = stepping_clock()
    receiver.script = [429, 429]
    assert await sim.emit("session_ready", {"session_id": "s1"}) == 200
    assert [w.status for w in sim.webhooks] == [429, 429, 200]
    assert [w.attempt for w in sim.webhooks] == [1, 2, 3]
    assert all(h.valid for h in receiver.hits) and len(receiver.hits) == 3
    assert len({h.raw for h in receiver.hits}) == 1
    stamps = [int(h.headers["X-Timestamp"]) for h in receiver.hits]
    assert stamps == sorted(set(stamps))  # a new timestamp (and signature) per attempt

    receiver.script = [429] * 4
    sim.reset_counters()
    assert await sim.emit("message_sent", {"session_id": "s1"}) == 429
    assert [w.status for w in sim.webhooks] == [429] * 4  # 3 retries, then Node gives up


@pytest.mark.parametrize("final", [401, 500, 503])
async def test_webhook_401_and_5xx_not_retried(
    make_sim: MakeSim, receiver: Receiver, final: int
) -> None:
    sim = await make_sim(webhook_url=receiver.url)
    receiver.script = [final]
    assert await sim.emit("session_ready", {"session_id": "s1"}) == final
    assert len(sim.webhooks) == 1 and len(receiver.hits) == 1


async def test_webhook_bad_secret_is_rejected_once(make_sim: MakeSim, receiver: Receiver) -> None:
    sim = await make_sim(webhook_url=receiver.url, webhook_secret="wrong")
    assert await sim.emit("session_ready", {"session_id": "s1"}) == 401
    assert [h.valid for h in receiver.hits] == [False]


async def test_webhook_refused_retried_until_receiver_is_up(
    make_sim: MakeSim, aiohttp_server: ServerFactory
) -> None:
    port = free_port()
    rec = Receiver()
    sim = await make_sim(webhook_url=rec.url_for(port), webhook_retry_scale=0.05)
    sim.clock = stepping_clock()
    sending = asyncio.create_task(sim.emit("session_ready", {"session_id": "s1"}))
    await wait_for(lambda: len(sim.webhooks) >= 1)
    assert sim.webhooks[0].status is None and sim.webhooks[0].failure == "refused"
    rec.server = await aiohttp_server(rec.app(), port=port)
    assert await sending == 200
    assert sim.webhooks[-1].status == 200 and 2 <= len(sim.webhooks) <= 4
    assert len(rec.hits) == 1 and rec.hits[0].valid
    assert len({w.body for w in sim.webhooks}) == 1
    assert len({w.timestamp for w in sim.webhooks}) == len(sim.webhooks)


async def test_webhook_never_delivered_is_none(make_sim: MakeSim) -> None:
    sim = await make_sim(webhook_url=f"http://127.0.0.1:{free_port()}/hook")
    assert await sim.emit("session_ready", {"session_id": "s1"}) is None
    assert [w.failure for w in sim.webhooks] == ["refused"] * 4
    nowhere = await make_sim()
    assert await nowhere.emit("session_ready", {"session_id": "s1"}) is None
    assert nowhere.webhooks == []


async def test_stop_cancels_pending_webhooks(make_sim: MakeSim, receiver: Receiver) -> None:
    sim = await make_sim(webhook_url=receiver.url, webhook_retry_scale=10)
    receiver.script = [429]
    sending = asyncio.create_task(sim.emit("session_ready", {"session_id": "s1"}))
    await wait_for(lambda: len(sim.webhooks) == 1)  # now sleeping 10 s before its retry
    await sim.stop()
    assert await asyncio.wait_for(sending, 1) is None
    await sim.wait_webhooks_idle(timeout_s=0.1)


# -- around restarts: SimLaravel, restore on start, the shared folder -------------------


@pytest.fixture
async def laravel() -> AsyncIterator[SimLaravel]:
    async with SimLaravel(secret=SECRET) as lv:
        yield lv


@pytest.fixture
def folder() -> SessionFolder:
    return SessionFolder(conflict_delay_s=0.2)


async def restoring(
    make_sim: MakeSim, laravel: SimLaravel, folder: SessionFolder, **kw: Any
) -> SimInstance:
    """A sim whose LARAVEL_URL is `laravel` (webhooks and accounts/active), on `folder`."""
    args: dict[str, Any] = {
        "laravel_url": laravel.url,
        "folder": folder,
        "restore_retry_scale": 0.05,
        "restore_step_s": 0.0,
        **kw,
    }
    return await make_sim(**args)


def signed(
    event: str, data: dict[str, Any], ts: float | None = None
) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"event": event, "data": data}, separators=(",", ":")).encode()
    stamp = str(int(time.time() if ts is None else ts))
    return body, {
        "Content-Type": "application/json",
        "X-Timestamp": stamp,
        "X-HMAC-Signature": sign_webhook(SECRET, stamp, body),
        "X-Instance-Url": "http://localhost:3001",
    }


async def send(http: aiohttp.ClientSession, sim: SimInstance, session: str) -> tuple[int, Any]:
    body = {"session_id": session, "recipient_phone": "6281", "message": "m", "api_key": KEY}
    return await call(http, "POST", f"{sim.url}/api/messages/send", json=body)


def lifecycle_events(laravel: SimLaravel, sim: SimInstance, session: str) -> list[str]:
    here = f"http://localhost:{sim.port}"
    return [
        e.event
        for e in laravel.events
        if e.instance_url == here and e.data.get("session_id") == session
    ]


async def test_sim_laravel_verifies_signatures_and_keeps_the_account_table(
    laravel: SimLaravel, http: aiohttp.ClientSession
) -> None:
    hook = f"{laravel.url}/api/whatsapp/webhooks/webjs"
    body, headers = signed("qr_code_generated", {"session_id": "s1", "workspace_id": 3})
    assert await call(http, "POST", hook, data=body, headers=headers) == (200, {"success": True})
    assert laravel.accounts["s1"].status == "qr_scanning"
    assert laravel.accounts["s1"].workspace_id == 3
    event = laravel.events[0]
    assert (event.event, event.data["session_id"], event.raw) == ("qr_code_generated", "s1", body)
    assert event.instance_url == "http://localhost:3001" and event.received_at > 0

    refused = [
        {**headers, "X-HMAC-Signature": "0" * 64},  # wrong signature
        signed("session_ready", {"session_id": "s1"}, ts=time.time() - 301)[1],  # too old
        signed("session_ready", {"session_id": "s1"}, ts=time.time() + 301)[1],  # too new
        {"Content-Type": "application/json"},  # no headers at all
    ]
    for bad in refused:
        status, doc = await call(http, "POST", hook, data=body, headers=bad)
        assert (status, doc) == (401, {"error": "Invalid signature"})
    # The signature covers the raw bytes: the same JSON re-serialised does not verify.
    spaced = json.dumps(json.loads(body)).encode()
    assert (await call(http, "POST", hook, data=spaced, headers=headers))[0] == 401
    assert laravel.refused == 5 and len(laravel.events) == 1
    assert laravel.refusals[:4] == [
        "invalid_signature",
        "timestamp_expired",
        "timestamp_expired",
        "missing_headers",
    ]

    for event_name, data, status in [
        ("session_authenticated", {"session_id": "s1", "workspace_id": 3}, "authenticated"),
        ("session_ready", {"session_id": "s1", "phone_number": "62811"}, "connected"),
    ]:
        body, headers = signed(event_name, data)
        assert (await call(http, "POST", hook, data=body, headers=headers))[0] == 200
        assert laravel.accounts["s1"].status == status
    assert laravel.accounts["s1"].assigned_instance_url == "http://localhost:3001"
    assert laravel.accounts["s1"].phone_number == "62811"

    laravel.add_account("s2", status="authenticated", workspace_id=2, phone_number="62822")
    laravel.add_account("s3", status="disconnected")
    laravel.add_account("s4", status="qr_scanning")
    status, doc = await call(http, "GET", f"{laravel.url}/api/whatsapp/accounts/active")
    assert status == 200 and doc["success"] is True and doc["count"] == 2
    assert [(s["session_id"], s["status"]) for s in doc["sessions"]] == [
        ("s1", "connected"),
        ("s2", "authenticated"),
    ]
    assert doc["sessions"][1] == {
        "id": laravel.accounts["s2"].id,
        "session_id": "s2",
        "workspace_id": 2,
        "phone_number": "62822",
        "status": "authenticated",
        "provider_type": "webjs",
    }
    laravel.accounts_status = 503
    assert (await call(http, "GET", f"{laravel.url}/api/whatsapp/accounts/active"))[0] == 503
    assert laravel.accounts_calls == 2

    body, headers = signed("session_disconnected", {"session_id": "s1", "reason": "LOGOUT"})
    laravel.answer_status = 500  # Laravel down to its database: not processed
    assert (await call(http, "POST", hook, data=body, headers=headers))[0] == 500
    assert laravel.failed == 1 and laravel.accounts["s1"].status == "connected"
    laravel.answer_status = 200
    assert (await call(http, "POST", hook, data=body, headers=headers))[0] == 200
    assert laravel.accounts["s1"].status == "disconnected"

    mark = f"{laravel.url}/api/whatsapp/sessions/s1/mark-disconnected"
    assert (await call(http, "POST", mark, json={"workspace_id": 1}))[0] == 404
    sync = f"{laravel.url}/api/whatsapp/chats/sync"
    assert await call(http, "POST", sync, json={"chats": []}) == (200, {"success": True})
    assert [(c.path, c.status) for c in laravel.calls] == [
        ("/api/whatsapp/sessions/s1/mark-disconnected", 404),
        ("/api/whatsapp/chats/sync", 200),
    ]
    assert laravel.calls[1].json == {"chats": []}


async def test_restore_on_start_restores_every_active_account_even_live_elsewhere(
    make_sim: MakeSim, laravel: SimLaravel, folder: SessionFolder
) -> None:
    laravel.add_account("s1")  # live on `live` right now
    laravel.add_account("s2", status="authenticated", workspace_id=2)
    laravel.add_account("s3", status="disconnected")
    laravel.add_account("s4", status="qr_scanning")
    folder.save_login("s2")
    live = await make_sim(folder=folder)
    live.add_session("s1")  # connected there: its login is in the folder now
    assert folder.has_login("s1") and folder.connected_on("s1") is live

    node = await restoring(make_sim, laravel, folder)
    assert node.webhook_url == f"{laravel.url}/api/whatsapp/webhooks/webjs"
    await asyncio.wait_for(node.restore_done.wait(), 5)
    assert node.restore_outcome == "done" and laravel.accounts_calls == 1
    assert node.restored == ["s1", "s2"]  # s1 too, although `live` holds it
    assert node.sessions["s2"].workspace_id == 2
    await wait_for(lambda: all(node.sessions[s].status == "connected" for s in ("s1", "s2")))
    await node.wait_webhooks_idle()
    # A saved login: no QR, authenticated, then ready.
    for s in ("s1", "s2"):
        assert lifecycle_events(laravel, node, s) == ["session_authenticated", "session_ready"]
    assert laravel.accounts["s1"].assigned_instance_url == f"http://localhost:{node.port}"

    # It skips only what it holds itself: a restart that keeps memory restores nothing...
    await node.restart(keep_sessions=True)
    await asyncio.wait_for(node.restore_done.wait(), 5)
    assert node.restored == [] and laravel.accounts_calls == 2
    # ...a crash and a start (an empty process) restores both again.
    await node.stop()
    await node.start()
    await asyncio.wait_for(node.restore_done.wait(), 5)
    assert node.restored == ["s1", "s2"] and laravel.accounts_calls == 3


async def test_authenticated_window_answers_400_then_200(
    make_sim: MakeSim, laravel: SimLaravel, folder: SessionFolder, http: aiohttp.ClientSession
) -> None:
    laravel.add_account("s1")
    folder.save_login("s1")
    node = await restoring(make_sim, laravel, folder, ready_delay_s=0.3)
    await wait_for(lambda: "s1" in node.sessions and node.sessions["s1"].status == "authenticated")
    status, body = await send(http, node, "s1")
    assert (status, body) == (400, {"error": "Session not connected. Please check session status."})
    _, state = await call(http, "GET", f"{node.url}/api/sessions/s1/status?api_key={KEY}")
    assert state["status"] == "authenticated"
    await wait_for(lambda: node.sessions["s1"].status == "connected")
    status, body = await send(http, node, "s1")
    assert status == 200 and body["message_id"]
    await node.wait_webhooks_idle()
    authenticated, ready = (
        laravel.events_named("session_authenticated"),
        laravel.events_named("session_ready"),
    )
    assert len(authenticated) == len(ready) == 1
    assert ready[0].received_at - authenticated[0].received_at >= 0.25


async def test_lifecycle_bodies_are_identical_across_instances_and_restarts(
    make_sim: MakeSim, laravel: SimLaravel, folder: SessionFolder
) -> None:
    laravel.add_account("s1", workspace_id=4, phone_number="62899")
    folder.save_login("s1")
    folder.conflict_delay_s = 30.0  # keep both copies for this test
    a = await restoring(make_sim, laravel, folder)
    b = await restoring(make_sim, laravel, folder)
    await wait_for(lambda: len(laravel.events_named("session_ready")) == 2)
    ready = laravel.events_named("session_ready")
    assert ready[0].raw == ready[1].raw  # byte-identical: only X-Instance-Url differs
    assert {e.instance_url for e in ready} == {
        f"http://localhost:{a.port}",
        f"http://localhost:{b.port}",
    }
    assert ready[0].data == {
        "session_id": "s1",
        "workspace_id": 4,
        "phone_number": "62899",  # Laravel's phone, so a restorer says the same
        "status": "connected",
    }
    authenticated = laravel.events_named("session_authenticated")
    assert len(authenticated) == 2 and authenticated[0].raw == authenticated[1].raw
    # Same body, same second, same secret: the same signature.
    stamp = ready[0].headers["X-Timestamp"]
    assert sign_webhook(SECRET, stamp, ready[1].raw) == ready[0].headers["X-HMAC-Signature"]
    # A restarted instance repeats itself byte for byte.
    await a.restart()
    await wait_for(lambda: len(laravel.events_named("session_ready")) == 3)
    assert laravel.events_named("session_ready")[2].raw == ready[0].raw


async def test_last_connected_copy_takes_over_after_a_conflict(
    make_sim: MakeSim, laravel: SimLaravel, folder: SessionFolder, http: aiohttp.ClientSession
) -> None:
    old = await restoring(make_sim, laravel, folder, restore_on_start=False)
    old.add_session("s1", workspace_id=5)
    laravel.add_account("s1", workspace_id=5)
    new = await restoring(make_sim, laravel, folder)
    await wait_for(lambda: "s1" in new.sessions and new.sessions["s1"].status == "connected")
    # Both connected for now: a sync sees the duplicate.
    assert old.sessions["s1"].status == "connected"
    assert folder.connected_on("s1") is new
    await wait_for(lambda: old.sessions["s1"].status == "disconnected")
    assert new.sessions["s1"].status == "connected"
    status, body = await send(http, old, "s1")
    assert status == 400 and body["error"].startswith("Session not connected")
    _, state = await call(http, "GET", f"{old.url}/api/sessions/s1/status?api_key={KEY}")
    assert state["status"] == "disconnected"
    assert (await send(http, new, "s1"))[0] == 200
    await old.wait_webhooks_idle()
    dropped = [e for e in laravel.events if e.event == "session_disconnected"]
    assert len(dropped) == 1 and dropped[0].instance_url == f"http://localhost:{old.port}"
    assert dropped[0].data == {"session_id": "s1", "workspace_id": 5, "reason": "CONFLICT"}
    # AutoReconnect's reconnect that is not: announced, and the copy stays disconnected.
    hint = [e for e in laravel.events if e.event == "session_reconnected"]
    assert [(e.instance_url, e.data) for e in hint] == [
        (f"http://localhost:{old.port}", {"session_id": "s1", "workspace_id": 5})
    ]
    assert old.sessions["s1"].status == "disconnected"
    # Blazz's Laravel takes any disconnect at its word: its copy now says disconnected,
    # although `new` holds the session (the router is the one that knows better).
    assert laravel.accounts["s1"].status == "disconnected"
    assert laravel.accounts["s1"].assigned_instance_url == f"http://localhost:{new.port}"

    # The dropped copy connecting again takes the session back the same way.
    old.add_session("s1", workspace_id=5)
    await wait_for(lambda: new.sessions["s1"].status == "disconnected")
    assert old.sessions["s1"].status == "connected"


async def test_restore_retries_when_laravel_fails_then_gives_up(
    make_sim: MakeSim, laravel: SimLaravel, folder: SessionFolder
) -> None:
    laravel.add_account("s1")
    folder.save_login("s1")
    laravel.accounts_status = 500
    node = await restoring(make_sim, laravel, folder, restore_retry_scale=0.2)
    await wait_for(lambda: laravel.accounts_calls == 1)
    assert not node.restore_done.is_set()
    laravel.accounts_status = 200  # Laravel is back before the retry (after 0.2 s)
    await asyncio.wait_for(node.restore_done.wait(), 5)
    assert laravel.accounts_calls == 2 and node.restored == ["s1"]

    laravel.accounts_status = 500
    await node.restart()
    await asyncio.wait_for(node.restore_done.wait(), 5)
    assert node.restore_outcome == "gave_up" and node.restored == []
    assert laravel.accounts_calls == 5  # tried, then after 1 s and 2 s (scaled), then gave up

    # A stop (crash) ends a restore that is waiting for its retry.
    node.restore_retry_scale = 30.0
    await node.restart()
    await wait_for(lambda: laravel.accounts_calls == 6)
    await node.stop()
    assert node.restore_outcome == "cancelled" and node.restore_done.is_set()

    nowhere = await make_sim(
        laravel_url=f"http://127.0.0.1:{free_port()}", restore_retry_scale=0.01
    )
    await asyncio.wait_for(nowhere.restore_done.wait(), 5)
    assert nowhere.restore_outcome == "gave_up" and nowhere.restore_fetches == 3


async def test_restore_without_saved_login_stays_qr_scanning(
    make_sim: MakeSim, laravel: SimLaravel, folder: SessionFolder
) -> None:
    laravel.add_account("nologin")
    laravel.add_account("saved")
    folder.save_login("saved")
    node = await restoring(make_sim, laravel, folder)
    await wait_for(
        lambda: "saved" in node.sessions and node.sessions["saved"].status == "connected"
    )
    # Long after "saved" logged in from disk, "nologin" still waits for a scan.
    assert node.sessions["nologin"].status == "qr_scanning"
    assert not node.lifecycle.connecting("nologin")
    await node.wait_webhooks_idle()
    assert lifecycle_events(laravel, node, "nologin") == ["qr_code_generated"]
    assert laravel.accounts["nologin"].status == "qr_scanning"  # out of the active list now


async def test_delete_on_a_non_holder_removes_the_saved_login(
    make_sim: MakeSim, laravel: SimLaravel, folder: SessionFolder, http: aiohttp.ClientSession
) -> None:
    owner = await make_sim(folder=folder)
    other = await make_sim(folder=folder)
    owner.add_session("s1")
    assert folder.has_login("s1")
    delete = {"workspace_id": 1, "api_key": KEY}
    status, body = await call(http, "DELETE", f"{other.url}/api/sessions/s1", json=delete)
    assert status == 200 and body["success"] is True  # Node answers success all the same
    assert not folder.has_login("s1")
    assert folder.deleted_by == [("s1", other.name)]
    assert owner.sessions["s1"].status == "connected"  # the live client runs on, for now

    # The damage shows at the owner's next restart: no login, a QR nobody scans.
    laravel.add_account("s1")
    owner.laravel_url = laravel.url
    await owner.restart()
    await asyncio.wait_for(owner.restore_done.wait(), 5)
    assert owner.restored == ["s1"] and owner.sessions["s1"].status == "qr_scanning"

    # A DELETE on the holder is a logout: the login goes too, but that is not a deletion
    # behind the owner's back.
    other.add_session("s2")
    assert (await call(http, "DELETE", f"{other.url}/api/sessions/s2", json=delete))[0] == 200
    assert not folder.has_login("s2") and "s2" not in other.sessions
    assert folder.logged_out_by == [("s2", other.name)]
    assert folder.deleted_by == [("s1", other.name)]


async def test_uptime_resets_at_each_start(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    await wait_for(lambda: time.monotonic() - sim.started_monotonic > 0.2)
    assert (await call(http, "GET", f"{sim.url}/health"))[1]["uptime"] >= 0.2
    await sim.stop()
    await sim.start()
    assert (await call(http, "GET", f"{sim.url}/health"))[1]["uptime"] < 0.2


async def test_start_after_stop_begins_empty(make_sim: MakeSim) -> None:
    sim = await make_sim()
    sim.add_session("s1")
    await sim.stop()
    assert "s1" in sim.sessions  # still there to look at while it is down
    await sim.start()
    assert sim.sessions == {}


async def test_pause_answers_nothing_until_resume(
    make_sim: MakeSim, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    sim = await make_sim(webhook_url=receiver.url)
    clock = await make_sim(webhook_url=receiver.url)  # not paused: shows time has passed
    sim.pause()
    assert sim.paused
    health = asyncio.create_task(call(http, "GET", f"{sim.url}/health"))
    create = {"session_id": "s1", "api_key": KEY}
    creating = asyncio.create_task(call(http, "POST", f"{sim.url}/api/sessions", json=create))
    await wait_for(lambda: sim.count() == 2)  # the connections were accepted
    sim.notify("message_received", {"session_id": "s0"})
    # Meanwhile an instance that is not paused answers, connects a session, sends webhooks.
    assert (await call(http, "POST", f"{clock.url}/api/sessions", json=create))[0] == 200
    await wait_for(lambda: clock.sessions["s1"].status == "connected")
    await clock.wait_webhooks_idle()
    assert not health.done() and not creating.done()
    assert sim.webhooks == [] and "s1" not in sim.sessions
    sim.resume()
    assert (await health)[0] == 200 and (await creating)[0] == 200
    await wait_for(lambda: sim.sessions["s1"].status == "connected")
    await sim.wait_webhooks_idle()
    assert sim.webhooks[0].event == "message_received"

    # Paused timers wait too: a session in its authenticated window stays there.
    sim.ready_delay_s = clock.ready_delay_s = 0.1
    sim.add_session("s2", status="qr_scanning")
    sim.lifecycle.schedule_connect("s2")
    await wait_for(lambda: sim.sessions["s2"].status == "authenticated")
    sim.pause()
    clock.add_session("s2", status="qr_scanning")
    clock.lifecycle.schedule_connect("s2")  # a whole connect, longer than the ready delay
    await wait_for(lambda: clock.sessions["s2"].status == "connected")
    assert sim.sessions["s2"].status == "authenticated"
    sim.resume()
    await wait_for(lambda: sim.sessions["s2"].status == "connected")
    sim.pause()
    await sim.stop()  # a paused process can still be killed
    assert not sim.running
