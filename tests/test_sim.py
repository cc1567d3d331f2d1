"""The simulated Blazz instance, tested over real loopback sockets.

Webhooks go to a receiver that verifies them exactly like Laravel's VerifyWhatsAppHmac:
`hash_equals(hash_hmac('sha256', $ts . $rawBody, $secret), $sig)` and `|now - ts| <= 300`.
Nothing waits on a fixed sleep: `wait_for` polls a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from wa_router.sim import SimInstance, sign_webhook

KEY = "test-key"
SECRET = "test-secret"

MakeSim = Callable[..., Awaitable[SimInstance]]
ServerFactory = Callable[..., Awaitable[TestServer]]


async def wait_for(cond: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        sim = SimInstance(**{"webhook_retry_scale": 0.01, "connect_delay_s": 0.02, **kwargs})
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
    assert status == 400 and body["error"].startswith("Session not connected")
    assert body["status"] == "qr_scanning"
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
