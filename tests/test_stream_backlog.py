"""The webhook backlog in Redis Streams: several routers (and workers) on one Redis take
intake and deliver, every event once and in order per session, through a dead router, a
hung Redis and a long Laravel outage. Real redis-server, routers on loopback sockets, a
Laravel stand-in that counts arrivals by X-Webhook-Id."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from wa_router.backlog import SqliteBacklog
from wa_router.sim import SimInstance
from wa_router.stream_backlog import StreamBacklog, shard_of

from .conftest import API_KEY, StartRouter, free_port, wait_for, wait_until
from .redis_server import RedisServer, redis_server_fixture, unique_prefix
from .test_lifecycle import router_process, wait_healthy
from .test_webhook_delivery import HOOK, SECRET, Deliveries, config, signed

redis_server = redis_server_fixture()
TOKEN = "a-token-of-16-chars-or-more"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def laravel() -> Any:
    stand_in = Deliveries()
    await stand_in.start()
    yield stand_in
    await stand_in.stop()


def stream_config(
    sims: list[SimInstance], laravel: Deliveries, state: Path, url: str, prefix: str, **wh: Any
) -> Any:
    store = {"kind": "redis", "redis_url": url, "key_prefix": prefix}
    return config(sims, laravel, state, store=store, webhooks=wh, admin={"token": TOKEN})


def check_once_in_order(laravel: Deliveries, sent: dict[str, list[int]]) -> None:
    """Every event sent arrived exactly once, and each session's in the order sent."""
    copies = Counter((s, q) for s, q, _ in laravel.done)
    expected = {(s, str(q)) for s, seqs in sent.items() for q in seqs}
    assert set(copies) == expected, f"lost: {sorted(expected - set(copies))[:5]}"
    assert all(n == 1 for n in copies.values()), [k for k, n in copies.items() if n > 1][:5]
    for s, seqs in sent.items():
        got = [q for sess, q, _ in laravel.done if sess == s]
        assert got == [str(q) for q in seqs], (s, got)


async def post(http: aiohttp.ClientSession, base: str, seq: int, port: int, session: str) -> int:
    body, headers = signed(seq, port, session=session)
    async with http.post(base + HOOK, data=body, headers=headers) as resp:
        assert resp.status in (200, 202), await resp.text()
        return resp.status


# -- the streams themselves ---------------------------------------------------------------


async def test_the_stream_counts_bounds_and_acknowledges_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    b = StreamBacklog(
        redis_server.url,
        SqliteBacklog(tmp_path / "spool.sqlite3"),
        key_prefix=unique_prefix(),
        shards=4,
        max_items=3,
    )
    await b.open()
    try:
        ids = [
            await b.append(session="s1", path=HOOK, body=b"{}", headers=[("A", "1")], timestamp=1)
            for _ in range(3)
        ]
        assert all(isinstance(i, str) for i in ids)
        # Full: nothing stored (the intake answers Node 429, which Node retries).
        assert await b.append(session="s2", path=HOOK, body=b"{}", headers=[], timestamp=1) is None
        assert (await b.size(), await b.pending("s1"), await b.pending("s2")) == (3, 3, 0)
        shard = shard_of("s1", 4)
        await b.ensure_group(shard)
        items = await b.read(shard, "c1", 10, 10)
        assert [i.id for i in items] == ids and items[0].headers == (("A", "1"),)
        assert await b.ack(shard, items[0]) is True
        assert await b.ack(shard, items[0]) is False  # a second ack changes no count
        assert (await b.size(), await b.pending("s1")) == (2, 2)
        # Another consumer takes over what c1 read and never acknowledged, oldest first.
        claimed = await b.claim(shard, "c2")
        assert [i.id for i in claimed] == ids[1:]
    finally:
        await b.close()


# -- several routers ----------------------------------------------------------------------


async def test_two_routers_on_one_redis_deliver_every_event_once_in_order(
    sims: list[SimInstance],
    laravel: Deliveries,
    start_router: StartRouter,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    prefix = unique_prefix()
    (a, ra), (b, rb) = [
        await start_router(stream_config(sims, laravel, tmp_path / n, redis_server.url, prefix))
        for n in ("a", "b")
    ]
    sessions = [f"t{n}" for n in range(8)]
    sent: dict[str, list[int]] = {s: [] for s in sessions}
    for seq in range(6):
        for i, s in enumerate(sessions):
            client = (a, b)[(seq + i) % 2]  # each session's events alternate between routers
            body, headers = signed(seq, sims[0].port, session=s)
            resp = await client.post(HOOK, data=body, headers=headers)
            assert resp.status == 202 and (await resp.json())["status"] == "queued"
            sent[s].append(seq)
    await wait_for(lambda: len(laravel.done) >= 48, 10, "every event delivered")
    check_once_in_order(laravel, sent)
    # The shards end up shared between the two (each takes its share of the 16).
    relays = [r.webhooks.deliverer for r in (ra, rb)]
    await wait_for(
        lambda: all(len(d.held) == 8 for d in relays),  # type: ignore[union-attr]
        15,
        "the shards split between the routers",
    )
    assert not set(relays[0].held) & set(relays[1].held)  # type: ignore[union-attr]
    text = await (await a.get("/metrics")).text()
    assert "wa_router_webhook_shards_held 8.0" in text and "wa_router_webhook_spooled 0.0" in text


async def test_a_router_killed_holding_pending_events_leaves_them_to_the_other(
    sims: list[SimInstance],
    laravel: Deliveries,
    start_router: StartRouter,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    prefix = unique_prefix()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    wh = {
        "secrets": [SECRET],
        "laravel_url": laravel.url,
        "retry_base_s": 0.05,
        "retry_max_s": 0.2,
        "relay_timeout_s": 1.0,
        "claim_after_s": 2.0,
    }
    raw = {
        "instances": [{"name": s.name, "url": s.url} for s in sims],
        "server": {"host": "127.0.0.1", "port": port},
        "store": {"kind": "redis", "redis_url": redis_server.url, "key_prefix": prefix},
        "webhooks": wh,
        "state": {"dir": str(tmp_path / "a-state")},
    }
    cfg = tmp_path / "a.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    sessions = [f"k{n}" for n in range(4)]
    sent: dict[str, list[int]] = {s: list(range(5)) for s in sessions}
    laravel.plan = [503] * 100_000  # Laravel down: A reads every event and holds it pending
    async with aiohttp.ClientSession() as http, router_process(cfg, tmp_path / "a") as proc:
        await wait_healthy(proc, base, tmp_path / "a")
        for seq in range(5):
            for s in sessions:
                assert await post(http, base, seq, sims[0].port, s) == 202
        r = aioredis.Redis.from_url(redis_server.url)
        try:

            async def read_by_a() -> bool:
                total = 0
                for n in range(16):
                    key = f"{prefix}wh:{n}"
                    if await r.exists(key):
                        total += int((await r.xpending(key, "relay"))["pending"])
                return total == 20

            await wait_until(read_by_a, 10, "A holding all 20 events pending")
        finally:
            await r.aclose()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    laravel.plan = []  # Laravel back; B, started now, finds A's leases lapse and claims
    before = len(laravel.done)
    assert before == 0
    _, rb = await start_router(
        stream_config(
            sims,
            laravel,
            tmp_path / "b",
            redis_server.url,
            prefix,
            relay_timeout_s=1.0,
            claim_after_s=2.0,
            retry_base_s=0.05,
        )
    )
    await wait_for(lambda: len(laravel.done) >= 20, 15, "B delivering what A left")
    check_once_in_order(laravel, sent)


async def test_a_drain_on_one_router_drains_the_instance_on_every_router(
    sims: list[SimInstance],
    laravel: Deliveries,
    start_router: StartRouter,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    prefix = unique_prefix()
    (a, ra), (b, rb) = [
        await start_router(stream_config(sims, laravel, tmp_path / n, redis_server.url, prefix))
        for n in ("a", "b")
    ]
    resp = await a.post("/admin/instances/node-1/drain", headers=AUTH)
    assert (await resp.json()) == {"instance": "node-1", "draining": True, "shared": True}
    await wait_for(lambda: rb.pool.get("node-1").draining, 5, "B hearing of the drain")  # type: ignore[union-attr]
    # A router started later reads it from the store.
    c, rc = await start_router(
        stream_config(sims, laravel, tmp_path / "c", redis_server.url, prefix)
    )
    assert rc.pool.get("node-1").draining  # type: ignore[union-attr]
    # Creates on B avoid it.
    for n in range(6):
        resp = await b.post(
            "/api/sessions", json={"session_id": f"new{n}", "workspace_id": 1, "api_key": API_KEY}
        )
        assert resp.status in (200, 201), await resp.text()
    assert "node-1" not in {(await rb.directory.lookup(f"new{n}")).instance for n in range(6)}  # type: ignore[union-attr]
    await b.post("/admin/instances/node-1/undrain", headers=AUTH)
    await wait_for(lambda: not ra.pool.get("node-1").draining, 5, "A hearing of the undrain")  # type: ignore[union-attr]


# -- Redis hung ---------------------------------------------------------------------------


async def test_a_hung_redis_answers_webhooks_within_a_second_and_loses_none(
    sims: list[SimInstance],
    laravel: Deliveries,
    start_router: StartRouter,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    prefix = unique_prefix()
    client, router = await start_router(
        stream_config(sims, laravel, tmp_path, redis_server.url, prefix)
    )
    sessions = ["h1", "h2", "h3"]
    sent: dict[str, list[int]] = {s: [] for s in sessions}
    body, headers = signed(0, sims[0].port, session="h1")
    assert (await client.post(HOOK, data=body, headers=headers)).status == 202
    sent["h1"].append(0)
    await wait_for(lambda: len(laravel.done) == 1, 5, "the first delivery")
    quick = aiohttp.ClientTimeout(total=1.0)
    redis_server.pause()  # SIGSTOP: the port stays open, nothing is answered
    paused = time.monotonic()
    try:
        seq = 1
        while time.monotonic() - paused < 10.0:  # 10 s of Redis hung, webhooks coming in
            for s in sessions:
                body, headers = signed(seq, sims[0].port, session=s)
                started = time.monotonic()
                resp = await client.post(HOOK, data=body, headers=headers, timeout=quick)
                assert resp.status == 202, await resp.text()
                assert time.monotonic() - started < 1.0
                sent[s].append(seq)
            seq += 1
            await asyncio.sleep(0.5)  # the load's pace, not a wait for a condition
        backlog = router.webhooks.backlog
        assert isinstance(backlog, StreamBacklog) and backlog.spooled > 0
    finally:
        redis_server.resume()
    total = sum(len(v) for v in sent.values())
    await wait_for(lambda: len(laravel.done) >= total, 30, "every spooled event delivered")
    check_once_in_order(laravel, sent)
    assert backlog.spooled == 0 and backlog.moved > 0


# -- a long Laravel outage under load -----------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite, one router", "redis, two routers"])
async def test_laravel_down_60_s_under_load_then_every_event_once_in_order(
    kind: str,
    sims: list[SimInstance],
    laravel: Deliveries,
    start_router: StartRouter,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    wh = {"retry_base_s": 0.2, "retry_max_s": 2.0}
    if kind.startswith("sqlite"):
        routers = [(await start_router(config(sims, laravel, tmp_path, webhooks=wh)))[0]]
    else:
        prefix = unique_prefix()
        routers = [
            (
                await start_router(
                    stream_config(sims, laravel, tmp_path / n, redis_server.url, prefix, **wh)
                )
            )[0]
            for n in ("a", "b")
        ]
    sessions = [f"o{n}" for n in range(10)]
    sent: dict[str, list[int]] = {s: [] for s in sessions}
    laravel.plan = [503] * 1_000_000
    began = time.monotonic()
    seq = 0
    while time.monotonic() - began < 60.0:  # ~20 events/s for 60 s, Laravel down
        for i, s in enumerate(sessions):
            client = routers[(seq + i) % len(routers)]
            body, headers = signed(seq, sims[i % 4].port, session=s)
            resp = await client.post(HOOK, data=body, headers=headers)
            assert resp.status == 202, await resp.text()
            sent[s].append(seq)
        seq += 1
        await asyncio.sleep(0.5)  # the load's pace
    assert not laravel.done
    laravel.plan = []  # Laravel back
    total = sum(len(v) for v in sent.values())
    await wait_for(lambda: len(laravel.done) >= total, 60, "the backlog emptied")
    check_once_in_order(laravel, sent)


# -- --workers 2 --------------------------------------------------------------------------


async def test_two_workers_relay_webhooks_through_the_streams(
    sims: list[SimInstance], laravel: Deliveries, tmp_path: Path, redis_server: RedisServer
) -> None:
    prefix = unique_prefix()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    raw = {
        "instances": [{"name": s.name, "url": s.url} for s in sims],
        "server": {"host": "127.0.0.1", "port": port},
        "store": {"kind": "redis", "redis_url": redis_server.url, "key_prefix": prefix},
        "webhooks": {"secrets": [SECRET], "laravel_url": laravel.url, "retry_base_s": 0.05},
        "state": {"dir": str(tmp_path / "state")},
    }
    cfg = tmp_path / "w.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    sessions = [f"w{n}" for n in range(8)]
    sent: dict[str, list[int]] = {s: list(range(5)) for s in sessions}
    r = aioredis.Redis.from_url(redis_server.url)
    workers = router_process(cfg, tmp_path / "w", "--workers", "2")
    try:
        async with aiohttp.ClientSession() as http, workers as proc:
            await wait_healthy(proc, base, tmp_path / "w")

            async def both_deliver() -> bool:
                return int(await r.zcard(f"{prefix}wh:consumers")) == 2

            await wait_until(both_deliver, 15, "both workers delivering")
            for seq in range(5):
                for s in sessions:
                    assert await post(http, base, seq, sims[0].port, s) == 202
            await wait_for(lambda: len(laravel.done) >= 40, 15, "every event delivered")
    finally:
        await r.aclose()
    check_once_in_order(laravel, sent)


# -- the relay's own rules ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mine", "owners", "live", "take", "give"),
    [
        (0, [None] * 16, ["me"], 16, 0),  # alone: all of them
        (16, ["me"] * 16, ["me", "b"], 0, 8),  # b joined with none: half goes back
        (8, ["me"] * 8 + ["b"] * 8, ["me", "b"], 0, 0),  # balanced
        (6, ["me"] * 6 + ["b"] * 5 + ["c"] * 5, ["me", "b", "c"], 0, 0),  # 16 / 3
        (0, ["b"] * 8 + [None] * 8, ["me", "b"], 8, 0),  # a dead holder's shards are free
        # A stale heartbeat (a router just killed) counts until it lapses: what is handed
        # to it stays free a round, and is taken as free (a claim_after_s of churn at most).
        (16, ["me"] * 16, ["me", "b", "stale"], 0, 10),
    ],
)
def test_the_shards_are_shared_out(
    mine: int, owners: list[str | None], live: list[str], take: int, give: int
) -> None:
    from wa_router.stream_relay import rebalance

    assert rebalance(mine, 16, owners, live, "me") == (take, give)


async def relay_for(
    laravel: Deliveries, backlog: StreamBacklog, **kw: Any
) -> tuple[Any, Any, asyncio.Task[None]]:
    from wa_router.delivery import Relay, laravel_instance
    from wa_router.forward import AiohttpForwarder
    from wa_router.stream_relay import StreamRelay

    forwarder = AiohttpForwarder(
        connect_timeout_s=1.0, keepalive_s=2.0, limit_per_host=16, pool_wait_s=1.0
    )
    await forwarder.start()
    relay = Relay(
        forwarder,
        laravel_instance(laravel.url),
        secret=SECRET,
        resign_after_s=200,
        timeout_s=kw.pop("timeout_s", 1.0),
        retry_base_s=0.05,
        retry_max_s=0.2,
        inflight_s=kw.pop("inflight_s", 2.0),
    )
    streams = StreamRelay(backlog, relay, claim_after_s=kw.pop("claim_after_s", 2.0))
    return streams, forwarder, asyncio.create_task(streams.run())


async def stream_of(redis_server: RedisServer, tmp_path: Path, prefix: str) -> StreamBacklog:
    b = StreamBacklog(
        redis_server.url,
        SqliteBacklog(tmp_path / f"{unique_prefix()}.sqlite3"),
        key_prefix=prefix,
        shards=2,
    )
    await b.open()
    return b


async def append(b: StreamBacklog, session: str, seq: int) -> None:
    body, headers = signed(seq, 3001, session=session)
    relayed = [(k, v) for k, v in headers.items()] + [("X-Webhook-Id", f"{session}-{seq}")]
    assert await b.append(session=session, path=HOOK, body=body, headers=relayed, timestamp=1)


async def test_a_read_whose_reply_was_lost_still_delivers_everything_in_order(
    laravel: Deliveries, redis_server: RedisServer, tmp_path: Path
) -> None:
    b = await stream_of(redis_server, tmp_path, unique_prefix())
    real_read = b.read
    lost = []

    async def read_losing_one_reply(*args: Any) -> list[Any]:
        items = await real_read(*args)
        if items and not lost:  # Redis handed them to us; the reply never arrived
            lost.append(items)
            raise ConnectionError("reply lost")
        return items

    b.read = read_losing_one_reply  # type: ignore[method-assign]
    streams, forwarder, task = await relay_for(laravel, b)
    try:
        for seq in range(5):
            await append(b, "s1", seq)
        await wait_for(lambda: len(laravel.done) >= 5, 10, "every entry delivered")
        assert lost, "the reply was never lost: the test proves nothing"

        async def emptied() -> bool:
            return await b.stream_size() == 0  # Redis's own count (`size` may fall back)

        # Laravel counts a delivery done before the relay has read its answer and taken it
        # off the stream: the last one leaves a moment later. Once none is left, nothing
        # more can be sent, so what Laravel got is final.
        await wait_until(emptied, 10, "every delivered entry off the stream")
        check_once_in_order(laravel, {"s1": list(range(5))})
    finally:
        streams.close()
        await task
        await forwarder.close()
        await b.close()


async def test_a_closed_relay_gives_its_shards_back_and_sends_nothing_after(
    laravel: Deliveries, redis_server: RedisServer, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    b = await stream_of(redis_server, tmp_path, prefix)
    streams, forwarder, task = await relay_for(laravel, b)
    await wait_for(lambda: len(streams.held) == 2, 5, "both shards taken")
    laravel.plan = [0.5] * 4  # slow: deliveries are in flight when it closes
    for seq in range(3):
        for s in ("a", "b", "c"):
            await append(b, s, seq)
    await wait_for(lambda: len(laravel.arrivals) >= 2, 5, "deliveries in flight")
    streams.close()
    await asyncio.wait_for(task, 10)  # ends by itself: no cancel needed
    arrived = len(laravel.arrivals)
    assert arrived == len(laravel.finished)  # what was in flight ended first
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await r.mget([f"{prefix}wh:{n}:lease" for n in range(2)]) == [None, None]
        assert await r.zcard(f"{prefix}wh:consumers") == 0
    finally:
        await r.aclose()
    await forwarder.close()
    # Another relay takes over what is left, and sends each once.
    again, forwarder2, task2 = await relay_for(laravel, b)
    try:
        await wait_for(lambda: len(laravel.done) >= 9, 10, "the rest delivered by the next")
        check_once_in_order(laravel, {s: list(range(3)) for s in ("a", "b", "c")})
    finally:
        again.close()
        await task2
        await forwarder2.close()
        await b.close()


async def test_a_timed_out_delivery_is_not_sent_again_by_the_next_holder_too_soon(
    laravel: Deliveries, redis_server: RedisServer, tmp_path: Path
) -> None:
    b = await stream_of(redis_server, tmp_path, unique_prefix())
    laravel.plan = [2.0]  # longer than the relay timeout: the outcome is unknown
    first, forwarder, task = await relay_for(laravel, b, timeout_s=0.5, inflight_s=3.0)
    await append(b, "t", 0)
    await wait_for(lambda: first.relay.failures == 1, 5, "the delivery timed out")
    timed_out = time.monotonic()
    first.close()  # handed over while Laravel may still be working on it
    await task
    await forwarder.close()
    second, forwarder2, task2 = await relay_for(laravel, b, timeout_s=0.5, inflight_s=3.0)
    try:
        # (The first copy's own 200 came after the router had given up on it.)
        await wait_for(lambda: len(laravel.arrivals) >= 2, 10, "sent again by the next holder")
        (_, first_id, _), (_, again_id, sent_again) = laravel.arrivals
        assert first_id == again_id  # the same event, as the receiver can tell
        assert sent_again - timed_out >= 2.5  # the hold (3 s from the timeout) was kept
    finally:
        second.close()
        await task2
        await forwarder2.close()
        await b.close()


async def test_a_spool_left_by_a_worker_that_is_gone_is_adopted(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Four workers become two: what worker 3 spooled while Redis was away is not lost."""
    orphan = SqliteBacklog(tmp_path / "webhooks-spool-3.sqlite3")
    await orphan.open()
    for seq in range(3):
        body, headers = signed(seq, 3001, session="o")
        hdrs = [*headers.items(), ("X-Webhook-Id", f"o-{seq}")]
        await orphan.append(session="o", path=HOOK, body=body, headers=hdrs, timestamp=1)
    await orphan.close()
    live = _held_spool(tmp_path / "webhooks-spool-1.sqlite3")  # a running worker's: not taken
    b = StreamBacklog(
        redis_server.url,
        SqliteBacklog(tmp_path / "webhooks-spool-0.sqlite3"),
        key_prefix=unique_prefix(),
        shards=2,
    )
    await b.open()
    try:
        assert b.spooled == 3
        assert await b.move_spool() == 3
        assert await b.size() == 3 and await b.pending("o") == 3
        assert (tmp_path / "webhooks-spool-1.sqlite3").exists() and live is not None
    finally:
        await b.close()
        live.close()


def _held_spool(path: Path) -> Any:
    from wa_router.stream_backlog import _lock

    path.touch()
    return _lock(path)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_laravel_back_is_noticed_without_waiting_out_the_backoff(
    kind: str,
    sims: list[SimInstance],
    laravel: Deliveries,
    start_router: StartRouter,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    """One session backing off (10 s base, growing): while everything backs off, one
    waiting session is tried every 2 s, so Laravel's return costs at most that, not the
    15-30 s of the third backoff."""
    wh = {"retry_base_s": 10.0, "retry_max_s": 60.0}
    if kind == "sqlite":
        cfg = config(sims, laravel, tmp_path, webhooks=wh)
    else:
        cfg = stream_config(sims, laravel, tmp_path, redis_server.url, unique_prefix(), **wh)
    client, _ = await start_router(cfg)
    laravel.plan = [503] * 1_000
    body, headers = signed(0, sims[0].port, session="p")
    assert (await client.post(HOOK, data=body, headers=headers)).status == 202
    await asyncio.sleep(11.0)  # the outage's length (the scenario, not a wait for a state)
    laravel.plan = []
    await wait_for(lambda: len(laravel.done) == 1, 3.5, "delivered soon after Laravel's return")
    assert len(laravel.arrivals) >= 3  # it was tried meanwhile (the probe), and refused
