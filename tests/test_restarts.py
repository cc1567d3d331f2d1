"""Restarts without a failed send, against the simulated pool behaving like the real one
(node-pool-api.md, "Around restarts"): each instance restores every active account from
Laravel on start (sessions live elsewhere included), logs them in through `authenticated`
(sends answer 400 meanwhile) to `connected`, and the last `session_ready` wins (the older
copy drops with CONFLICT). The instances' LARAVEL_URL is the router, as deployed; the router
relays to a Laravel stand-in. A steady send load runs through it all; every send must
succeed, and none may be sent twice."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from wa_router.app import Router
from wa_router.sim import SessionFolder, SimInstance, SimLaravel
from wa_router.sim.laravel import STATUS_OF_EVENT

from .conftest import API_KEY, StartRouter, free_port, pool_config, send_body, wait_for
from .redis_server import RedisServer, redis_server_fixture, unique_prefix

redis_server = redis_server_fixture()

SECRET = "restart-secret"
SESSIONS_PER_INSTANCE = 3
READY_DELAY_S = 0.5  # the real one is ~2.5 s: shorter, same shape
# Each sender's pause between its sends: the load's pace (20 sends/s over 12 sessions
# with 0.6 s pauses), not a wait for anything.
PACE_S = 0.6
ADVERTISED = "http://wa-router.test:8080"  # the router, as Laravel reaches it


@dataclass
class Pool:
    client: TestClient[web.Request, web.Application]
    router: Router
    laravel: SimLaravel
    folder: SessionFolder
    sims: list[SimInstance]
    owner: dict[str, SimInstance]
    results: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)

    def failed(self) -> list[tuple[str, int, dict[str, Any]]]:
        return [r for r in self.results if r[1] != 200]


@pytest.fixture(params=["memory", "redis"])
async def real_pool(
    request: pytest.FixtureRequest,
    start_router: StartRouter,
    tmp_path: Path,
    redis_server: RedisServer,
) -> AsyncIterator[Pool]:
    """The pool, its Laravel and the router; the directory in process or in Redis (the
    ownership rule then runs in the store's Lua script)."""
    folder = SessionFolder(conflict_delay_s=0.3)
    laravel = SimLaravel(secret=SECRET)
    await laravel.start()
    sims = [
        SimInstance(
            name=f"node-{i}",
            port=free_port(),
            api_key=API_KEY,
            webhook_secret=SECRET,
            webhook_retry_scale=0.05,
            connect_delay_s=0.1,
            ready_delay_s=READY_DELAY_S,
            folder=folder,
            restore_retry_scale=0.2,
            restore_step_s=0.02,
        )
        for i in range(4)
    ]
    cfg = pool_config(
        sims,
        upstream={"api_key": API_KEY},
        webhooks={
            "secrets": [SECRET],
            "laravel_url": laravel.url,
            "retry_base_s": 0.05,
            "advertise_url": ADVERTISED,
        },
        state={"dir": str(tmp_path / "state")},
        health={"interval_s": 0.5, "down_interval_s": 0.1, "timeout_s": 0.3},
        sync={"interval_s": 3600},
        store={"kind": request.param, "redis_url": redis_server.url, "key_prefix": unique_prefix()},
    )
    client, router = await start_router(cfg)
    router_url = str(client.make_url("")).rstrip("/")
    for sim in sims:
        sim.laravel_url = router_url  # LARAVEL_URL: Node talks to Laravel through the router
        sim.webhook_url = router_url + "/api/whatsapp/webhooks/webjs"
        await sim.start()  # Laravel has no account yet: nothing to restore
    for sim in sims:
        await asyncio.wait_for(sim.restore_done.wait(), 10)
    owner: dict[str, SimInstance] = {}
    for i, sim in enumerate(sims):
        for k in range(SESSIONS_PER_INSTANCE):
            sid = f"s{i}{k}"
            laravel.add_account(sid)
            sim.add_session(sid, notify=True)  # connected there; its login is saved
            owner[sid] = sim
    await wait_for(
        lambda: sum(1 for e in laravel.events if e.event == "session_ready") == len(owner),
        what="every session_ready relayed to Laravel",
    )
    try:
        yield Pool(client, router, laravel, folder, sims, owner)
    finally:
        for sim in sims:
            with contextlib.suppress(Exception):
                await sim.stop()
        await laravel.stop()


async def load(pool: Pool, stop: asyncio.Event) -> None:
    """One sender per session, each send after the previous answer, until `stop`."""

    async def sender(session: str) -> None:
        while not stop.is_set():
            resp = await pool.client.post("/api/messages/send", json=send_body(session))
            pool.results.append((session, resp.status, await resp.json()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PACE_S)

    await asyncio.gather(*(sender(s) for s in pool.owner))


def all_connected_once(pool: Pool) -> bool:
    """Every session connected on exactly one running instance, and the pool settled."""
    holders = Counter(
        sid for sim in pool.sims if sim.running for sid in pool.owner if sim.holds_connected(sid)
    )
    restoring = any(not sim.restore_done.is_set() for sim in pool.sims if sim.running)
    return not restoring and all(holders[s] == 1 for s in pool.owner)


async def settle_and_check(pool: Pool, stop: asyncio.Event, runner: asyncio.Task[None]) -> None:
    await wait_for(lambda: all_connected_once(pool), 30, "the restore race to settle")
    n = len(pool.results)
    await wait_for(lambda: len(pool.results) >= n + 2 * len(pool.owner), 30, "sends after it")
    stop.set()
    await asyncio.wait_for(runner, 30)
    failed = pool.failed()
    assert failed == [], f"{len(failed)} of {len(pool.results)} sends failed: {failed[:5]}"
    # Never twice: every 200 is one message that left, and nothing else left.
    for sim in pool.sims:
        with contextlib.suppress(TimeoutError):
            await sim.wait_webhooks_idle(10)
    ids = [r[2]["message_id"] for r in pool.results]
    assert len(set(ids)) == len(ids)
    # Every message that left the pool announces itself (message_sent, relayed to Laravel):
    # none that a caller was not told about. (A killed instance loses the webhooks it had
    # not sent yet, so a few of the callers' may be missing here, never extra ones.)
    sent = {e.data["message_id"] for e in pool.laravel.events if e.event == "message_sent"}
    assert sent <= set(ids)
    assert len(sent) >= len(ids) - len(pool.owner)
    # A restarted instance repeats its lifecycle bodies byte for byte, and two instances
    # may sign the same bytes in the same second: none of that is a duplicate.
    assert pool.router.webhooks.stats.duplicates == 0
    # Laravel heard one consistent story: every account it gates sends on is `connected`,
    # and it sends through the router (Blazz sends to the last session_ready's URL).
    not_connected = lambda: {  # noqa: E731
        sid: a.status for sid, a in pool.laravel.accounts.items() if a.status != "connected"
    }
    try:
        await wait_for(lambda: not not_connected(), 20, "Laravel's accounts all connected")
    except AssertionError:
        raise AssertionError(f"Laravel's view, not connected: {not_connected()}") from None
    assert {a.assigned_instance_url for a in pool.laravel.accounts.values()} == {ADVERTISED}
    # ...and never while a message was going out: Laravel refuses to send for an account
    # it holds as not connected, so each message_sent must find its account connected.
    status = dict.fromkeys(pool.owner, "connected")
    refused_by_laravel = []
    for e in pool.laravel.events:
        sid = e.data.get("session_id")
        if e.event in STATUS_OF_EVENT and sid in status:
            status[sid] = STATUS_OF_EVENT[e.event]
        elif e.event == "message_sent" and status.get(sid) != "connected":
            refused_by_laravel.append((sid, status.get(sid)))
    assert refused_by_laravel == []
    # The pool never got a DELETE for a session on a non-holder (it would erase the login).
    assert pool.folder.deleted_by == []


async def test_one_instance_killed_and_restarted_under_load_fails_no_send(
    real_pool: Pool,
) -> None:
    pool = real_pool
    stop = asyncio.Event()
    runner = asyncio.create_task(load(pool, stop))
    await wait_for(lambda: len(pool.results) >= 2 * len(pool.owner), what="steady load")
    victim = pool.sims[1]
    await victim.stop()  # killed
    inst = pool.router.pool.get(victim.name)
    assert inst is not None
    n = len(pool.results)
    await wait_for(lambda: len(pool.results) >= n + len(pool.owner), what="load while it is down")
    await victim.start()  # restarted: restores every active account, the others' too
    await settle_and_check(pool, stop, runner)
    by_session = Counter(s for s, _, _ in pool.results)
    assert all(by_session[s] >= 4 for s in pool.owner)  # every session kept being sent to
    # The router waited for the killed instance's sessions rather than failing them.
    assert pool.router.parking.stats.outcomes["woken"] > 0
    assert pool.router.parking.stats.outcomes["timeout"] == 0


async def test_all_instances_restarted_at_once_fails_no_send(real_pool: Pool) -> None:
    pool = real_pool
    stop = asyncio.Event()
    runner = asyncio.create_task(load(pool, stop))
    await wait_for(lambda: len(pool.results) >= 2 * len(pool.owner), what="steady load")
    for sim in pool.sims:  # a server restart
        await sim.stop()
    await wait_for(
        lambda: all(i.state.value == "down" for i in pool.router.pool.instances),
        what="every instance down",
    )
    for sim in pool.sims:
        await sim.start()
    await settle_and_check(pool, stop, runner)
    assert pool.router.parking.stats.outcomes["woken"] > 0


async def test_identical_session_ready_from_two_instances_in_one_second_both_count(
    real_pool: Pool,
) -> None:
    """Same body, same second, same secret: the same signature. Only the sender differs."""
    pool = real_pool
    a, b = pool.sims[0], pool.sims[1]
    sid = "s00"
    assert pool.owner[sid] is a
    b.add_session(sid)  # b takes it over (a drops it with CONFLICT after a moment)
    stamp = str(int(a.clock()))
    a.clock = b.clock = lambda: float(stamp)
    for sim in (a, b):  # the same bytes from both: same body, same second, same secret
        ready = {"session_id": sid, "workspace_id": 1, "phone_number": sim.phone_for(sid)}
        # Relayed at once (SQLite backlog) or queued in the shared stream (Redis).
        assert await sim.emit("session_ready", {**ready, "status": "connected"}) in (200, 202)
    a_body = a.webhooks[-1].body
    assert b.webhooks[-1].body == a_body and b.webhooks[-1].signature == a.webhooks[-1].signature
    entry = await pool.router.directory.lookup(sid)
    assert entry is not None and entry.instance == b.name  # the last session_ready won
    resp = await pool.client.post("/api/messages/send", json=send_body(sid))
    assert resp.status == 200
