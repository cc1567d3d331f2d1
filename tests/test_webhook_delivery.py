"""Webhooks across restarts and replicas: replays refused after a restart and by another
router, one stable X-Webhook-Id per event on every attempt, and no second copy sent while
a slow Laravel may still be processing the first (order kept)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from wa_router.sim import SimInstance

from .conftest import StartRouter, free_port, pool_config, sign_webhook, signed_webhook, wait_for
from .redis_server import RedisServer, redis_server_fixture, unique_prefix

redis_server = redis_server_fixture()
SECRET = "delivery-secret"
HOOK = "/api/whatsapp/webhooks/webjs"


class Receiver:
    """Laravel's webhook route: records every arrival (with its X-Webhook-Id), answers
    `plan` in turn (a status, or a delay in seconds before a 200), then 200."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.arrivals: list[tuple[str, str, float]] = []  # (seq, X-Webhook-Id, time)
        self.finished: list[str] = []  # seqs whose handling ended (answer sent)
        self.plan: list[int | float] = []
        self._runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        return await self._hook_of(request, json.loads(await request.read()))

    async def _hook_of(self, request: web.Request, doc: Any) -> web.Response:
        seq = str(doc["data"].get("seq"))
        self.arrivals.append((seq, request.headers.get("X-Webhook-Id", ""), time.monotonic()))
        step = self.plan.pop(0) if self.plan else 200
        try:
            if isinstance(step, float):
                await asyncio.sleep(step)  # Laravel busy with it (a slow receiver)
                return web.json_response({"status": "ok"})
            return web.json_response({"status": "ok" if step < 300 else "down"}, status=step)
        finally:
            self.finished.append(seq)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(HOOK, self._hook)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def signed(seq: int, port: int, session: str = "s1") -> tuple[bytes, dict[str, str]]:
    return signed_webhook(SECRET, "message_received", {"session_id": session, "seq": seq}, port)


def config(sims: list[SimInstance], receiver: Receiver, state: Path, **extra: Any) -> Any:
    # The stand-in has no webhook limiter, and these tests send faster than Laravel's
    # 1,000 a minute: the router's count of it is off (test_laravel_budget.py has it on).
    wh = {
        "secrets": [SECRET],
        "laravel_url": receiver.url,
        "retry_base_s": 0.05,
        "laravel_max_per_minute": None,
    }
    wh.update(extra.pop("webhooks", {}))
    return pool_config(
        sims, webhooks=wh, state={"dir": str(state)}, sync={"interval_s": 3600}, **extra
    )


async def test_a_replay_is_refused_after_a_restart_of_the_router(
    sims: list[SimInstance], receiver: Receiver, start_router: StartRouter, tmp_path: Path
) -> None:
    body, headers = signed(1, sims[0].port)
    client, _ = await start_router(config(sims, receiver, tmp_path))
    resp = await client.post(HOOK, data=body, headers=headers)
    assert resp.status == 200 and len(receiver.arrivals) == 1
    await client.close()  # the router stops; its backlog file stays
    again, _ = await start_router(config(sims, receiver, tmp_path))
    resp = await again.post(HOOK, data=body, headers=headers)
    assert resp.status == 200 and (await resp.json())["status"] == "duplicate"
    assert len(receiver.arrivals) == 1


async def test_a_replay_to_another_router_on_the_same_redis_is_refused(
    sims: list[SimInstance],
    receiver: Receiver,
    start_router: StartRouter,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    store = {"kind": "redis", "redis_url": redis_server.url, "key_prefix": unique_prefix()}
    a, _ = await start_router(config(sims, receiver, tmp_path / "a", store=store))
    b, _ = await start_router(config(sims, receiver, tmp_path / "b", store=store))
    body, headers = signed(1, sims[0].port)
    # Through the shared stream backlog (the Redis store's default): accepted, then sent.
    assert (await (await a.post(HOOK, data=body, headers=headers)).json())["status"] == "queued"
    await wait_for(lambda: len(receiver.arrivals) == 1, what="the delivery")
    resp = await b.post(HOOK, data=body, headers=headers)
    assert (await resp.json())["status"] == "duplicate"
    body2, headers2 = signed(2, sims[0].port)  # a new event after it: only that one arrives
    assert (await (await b.post(HOOK, data=body2, headers=headers2)).json())["status"] == "queued"
    await wait_for(lambda: len(receiver.arrivals) == 2, what="the second delivery")
    assert [seq for seq, _, _ in receiver.arrivals] == ["1", "2"]


async def test_every_attempt_of_an_event_carries_its_one_webhook_id(
    sims: list[SimInstance], receiver: Receiver, start_router: StartRouter, tmp_path: Path
) -> None:
    client, router = await start_router(config(sims, receiver, tmp_path))
    receiver.plan = [503]  # Laravel down for the first attempt: queued, delivered later
    body, headers = signed(1, sims[0].port)
    resp = await client.post(HOOK, data=body, headers=headers)
    assert resp.status == 202
    await wait_for(lambda: len(receiver.arrivals) == 2, what="the backlog's delivery")
    body2, headers2 = signed(2, sims[0].port)
    assert (await client.post(HOOK, data=body2, headers=headers2)).status == 200
    (s1, id1, _), (s1b, id1b, _), (s2, id2, _) = receiver.arrivals
    assert (s1, s1b, s2) == ("1", "1", "2")
    assert id1 == id1b and id1 != id2 and len(id1) == 32


async def test_a_slow_laravel_never_gets_a_second_copy_while_it_works_on_the_first(
    sims: list[SimInstance], receiver: Receiver, start_router: StartRouter, tmp_path: Path
) -> None:
    cfg = config(sims, receiver, tmp_path, webhooks={"relay_timeout_s": 0.3, "inflight_s": 1.5})
    client, router = await start_router(cfg)
    receiver.plan = [1.0]  # busy 1 s with event 1: over the relay timeout
    body1, headers1 = signed(1, sims[0].port)
    body2, headers2 = signed(2, sims[0].port)
    resp = await client.post(HOOK, data=body1, headers=headers1)
    assert resp.status == 202  # no answer in time: kept, to be delivered again
    resp = await client.post(HOOK, data=body2, headers=headers2)
    assert resp.status == 202  # behind event 1: its session's order holds
    await wait_for(lambda: receiver.finished == ["1"], 5, "Laravel done with the first copy")
    assert [a[0] for a in receiver.arrivals] == ["1"]  # nothing else while it worked
    await wait_for(lambda: len(receiver.arrivals) == 3, 10, "the later deliveries")
    seqs = [a[0] for a in receiver.arrivals]
    ids = [a[1] for a in receiver.arrivals]
    # At least once, in order, and the unavoidable second copy says it is the same event.
    assert seqs == ["1", "1", "2"] and ids[0] == ids[1] != ids[2]


def lifecycle(
    event: str, port: int, session: str = "s1", ts: int | None = None, **data: Any
) -> tuple[bytes, dict[str, str]]:
    return signed_webhook(
        SECRET, event, {"session_id": session, "workspace_id": 1, **data}, port, ts=ts
    )


class Events(Receiver):
    """The receiver, keeping each arrival's event name and its origin member."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    async def _hook(self, request: web.Request) -> web.Response:
        doc = json.loads(await request.read())
        self.events.append((doc["event"], request.headers.get("X-Wa-Router-Instance", "")))
        return web.json_response({"status": "ok"})


@pytest.fixture
async def events() -> AsyncIterator[Events]:
    r = Events()
    await r.start()
    yield r
    await r.stop()


async def test_a_real_reconnect_repeating_its_ready_is_not_a_retry(
    sims: list[SimInstance], events: Events, start_router: StartRouter, tmp_path: Path
) -> None:
    client, router = await start_router(config(sims, events, tmp_path))  # type: ignore[arg-type]
    port = sims[0].port
    ready = {"phone_number": "628", "status": "connected"}
    now = int(time.time())
    for n, (event, data) in enumerate(
        (
            ("session_ready", ready),
            ("session_disconnected", {"reason": "NAVIGATION"}),
            ("session_ready", ready),  # the same bytes again: a new event, not Node's retry
        )
    ):
        body, headers = lifecycle(event, port, ts=now + n, **data)
        resp = await client.post(HOOK, data=body, headers=headers)
        assert (await resp.json())["status"] != "duplicate", event
    assert [e for e, _ in events.events] == [
        "session_ready",
        "session_disconnected",
        "session_ready",
    ]
    entry = await router.directory.lookup("s1")
    assert entry is not None and entry.connected and entry.instance == "node-0"
    # Node's own retry of that last one (re-signed, nothing in between) is one event.
    body, headers = lifecycle("session_ready", port, ts=now + 3, **ready)
    resp = await client.post(HOOK, data=body, headers=headers)
    assert (await resp.json())["status"] == "duplicate" and len(events.events) == 3


async def test_a_replay_naming_another_instance_is_still_a_replay(
    sims: list[SimInstance], receiver: Receiver, start_router: StartRouter, tmp_path: Path
) -> None:
    client, _ = await start_router(config(sims, receiver, tmp_path))
    body, headers = signed(1, sims[0].port)
    assert (await client.post(HOOK, data=body, headers=headers)).status == 200
    for other in (sims[1].port, sims[2].port, 1):
        forged = {**headers, "X-Instance-Url": f"http://localhost:{other}"}
        resp = await client.post(HOOK, data=body, headers=forged)
        assert (await resp.json())["status"] == "duplicate"
    assert len(receiver.arrivals) == 1


async def test_what_a_restorer_held_waits_for_its_own_ready_only(
    sims: list[SimInstance], events: Events, start_router: StartRouter, tmp_path: Path
) -> None:
    client, router = await start_router(config(sims, events, tmp_path))  # type: ignore[arg-type]
    a, b = sims[0].port, sims[1].port
    ready = {"phone_number": "628", "status": "connected"}
    for event, port, data in (
        ("session_ready", a, ready),  # connected on node-0
        ("session_authenticated", b, {}),  # node-1 restores it: held
        ("session_reconnected", b, {}),  # node-1 again, still not the owner
        ("session_error", b, {"error": "x"}),
    ):
        body, headers = lifecycle(event, port, **data)
        assert (await client.post(HOOK, data=body, headers=headers)).status == 200
    # Laravel never heard node-1's login stage while node-0 held the session connected.
    assert ("session_authenticated", "node-1") not in events.events
    body, headers = lifecycle("session_ready", b, **ready)  # node-1 wins: then, in order
    assert (await client.post(HOOK, data=body, headers=headers)).status == 200
    assert events.events[-2:] == [("session_authenticated", "node-1"), ("session_ready", "node-1")]


async def test_a_relay_cut_off_by_a_crash_leaves_nodes_retry_welcome(
    sims: list[SimInstance], receiver: Receiver, start_router: StartRouter, tmp_path: Path
) -> None:
    cfg = config(sims, receiver, tmp_path, server={"shutdown_grace_s": 0})
    client, _ = await start_router(cfg)
    receiver.plan = [5.0]  # Laravel slow: the relay is in flight when the router goes
    body, headers = signed(1, sims[0].port)
    in_flight = asyncio.create_task(client.post(HOOK, data=body, headers=headers))
    await wait_for(lambda: len(receiver.arrivals) == 1, what="the relay at Laravel")
    await client.close()  # the router stops with the relay unanswered
    in_flight.cancel()
    await asyncio.gather(in_flight, return_exceptions=True)
    again, _ = await start_router(config(sims, receiver, tmp_path))
    ts = str(int(time.time()) + 1)  # Node's retry: the same body, re-signed
    retry = {**headers, "X-Timestamp": ts, "X-HMAC-Signature": sign_webhook(SECRET, ts, body)}
    resp = await again.post(HOOK, data=body, headers=retry)
    assert (await resp.json())["status"] == "ok"  # not a "duplicate" of an event nobody has
    assert len(receiver.arrivals) == 2


class Deliveries(Receiver):
    """The receiver, keeping (session, seq, X-Webhook-Id) of every delivery that ended
    with its 200, and answering with `plan` as Receiver does."""

    def __init__(self) -> None:
        super().__init__()
        self.done: list[tuple[str, str, str]] = []

    async def _hook(self, request: web.Request) -> web.Response:
        doc = json.loads(await request.read())
        resp = await super()._hook_of(request, doc)
        if resp.status == 200:
            data = doc["data"]
            self.done.append(
                (data["session_id"], str(data["seq"]), request.headers["X-Webhook-Id"])
            )
        return resp


async def test_a_router_killed_mid_delivery_redelivers_at_most_one_event_per_session(
    sims: list[SimInstance], tmp_path: Path
) -> None:
    import signal
    from collections import Counter

    import aiohttp
    import yaml

    from .test_lifecycle import router_process, wait_healthy

    laravel = Deliveries()
    await laravel.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    raw = {
        "instances": [{"name": s.name, "url": s.url} for s in sims],
        "server": {"host": "127.0.0.1", "port": port},
        "webhooks": {"secrets": [SECRET], "laravel_url": laravel.url, "retry_base_s": 0.05},
        "state": {"dir": str(tmp_path / "state")},
    }
    cfg = tmp_path / "router.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    sessions = [f"k{n}" for n in range(4)]
    laravel.plan = [503] * 10_000  # Laravel down: every event waits in the backlog
    try:
        async with aiohttp.ClientSession() as http:
            async with router_process(cfg, tmp_path / "first") as proc:
                await wait_healthy(proc, base, tmp_path / "first")
                for seq in range(4):
                    for s in sessions:
                        body, headers = signed(seq, sims[0].port, session=s)
                        async with http.post(base + HOOK, data=body, headers=headers) as r:
                            assert r.status in (200, 202), await r.text()
                # Laravel back, slow: each session's oldest event is in flight when the
                # router is killed.
                laravel.plan = [2.0] * 4
                await wait_for(
                    lambda: len(laravel.arrivals) > len(laravel.finished),
                    20,
                    "a delivery in flight",
                )
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
            async with router_process(cfg, tmp_path / "second") as proc:
                await wait_healthy(proc, base, tmp_path / "second")
                every = {(s, str(q)) for s in sessions for q in range(4)}
                await wait_for(
                    lambda: {(s, q) for s, q, _ in laravel.done} >= every, 20, "all delivered"
                )
    finally:
        await laravel.stop()
    copies = Counter((s, q) for s, q, _ in laravel.done)
    assert set(copies) == every  # none lost
    for s in sessions:
        extra = sum(n - 1 for (sess, _), n in copies.items() if sess == s)
        assert extra <= 1, (s, copies)  # at most the one that was in flight
        firsts = [q for sess, q, _ in laravel.done if sess == s]
        assert sorted(set(firsts), key=firsts.index) == ["0", "1", "2", "3"]  # in order
    ids: dict[tuple[str, str], set[str]] = {}
    for s, q, i in laravel.done:
        ids.setdefault((s, q), set()).add(i)
    assert all(len(v) == 1 for v in ids.values())  # a second copy says it is the same event
