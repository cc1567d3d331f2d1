"""RedisStore against a real redis-server: MemoryStore's semantics, plus what sharing adds
(atomic compare-and-set between routers, change notifications, surviving a restart)."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.conftest import wait_for
from tests.redis_server import (
    RedisServer,
    redis_server_fixture,
    started_redis_server,
    unique_prefix,
)
from tests.test_decide import OWNERSHIP
from wa_router.stores import Entry, MemoryStore, Source
from wa_router.stores.base import Status
from wa_router.stores.redis import (
    RedisStore,
    decode_change,
    decode_entry,
    encode_change,
    encode_entry,
)

redis_server = redis_server_fixture()

Changes = list[tuple[str, Entry | None]]
MakeStore = Callable[..., Awaitable[RedisStore]]


@pytest.fixture
async def make_store(redis_server: RedisServer) -> AsyncIterator[MakeStore]:
    """Started RedisStores, closed after the test; all share one prefix unless told."""
    prefix = unique_prefix()
    stores: list[RedisStore] = []

    async def make(url: str | None = None, **kwargs: Any) -> RedisStore:
        kwargs.setdefault("key_prefix", prefix)
        store = RedisStore(url or redis_server.url, **kwargs)
        stores.append(store)
        await store.start()
        return store

    yield make
    for store in stores:
        await store.close()


def recorder(store: RedisStore) -> Changes:
    changes: Changes = []
    store.subscribe(lambda session, entry: changes.append((session, entry)))
    return changes


ODD_ID = ("Aa0_.:@+=-" * 13)[:128]


@pytest.mark.parametrize(
    "entry",
    [
        Entry("node-1", 1712345678.1234567, Source.WEBHOOK, "connected"),
        Entry("node-2", 0.1 + 0.2, Source.DISCOVERY),
        Entry("node-3", 1e-7, Source.SYNC, ""),
        Entry(None, 1712345678.9999998, Source.ADMIN),
    ],
)
async def test_round_trip_is_exact(make_store: MakeStore, entry: Entry) -> None:
    store = await make_store()
    assert await store.get(ODD_ID) is None
    assert await store.put(ODD_ID, entry)
    assert await store.get(ODD_ID) == entry
    assert decode_change(encode_change(ODD_ID, entry)) == (ODD_ID, entry)
    assert decode_entry(encode_entry(entry)) == entry


async def test_status_is_replaced_not_merged(make_store: MakeStore) -> None:
    store = await make_store()
    await store.put("s1", Entry("a", 1.0, Source.WEBHOOK, "connected"))
    await store.put("s1", Entry("a", 2.0, Source.SYNC))
    assert await store.get("s1") == Entry("a", 2.0, Source.SYNC)


async def test_older_never_overwrites_newer(make_store: MakeStore) -> None:
    store = await make_store()
    assert await store.put("s1", Entry("b", 2000.5, Source.WEBHOOK))
    assert not await store.put("s1", Entry("a", 2000.4999999, Source.WEBHOOK))
    assert not await store.put("s1", Entry("c", 1500.0, Source.SYNC))
    assert await store.get("s1") == Entry("b", 2000.5, Source.WEBHOOK)
    # Same time: the later arrival wins, as in newer().
    assert await store.put("s1", Entry("d", 2000.5, Source.WEBHOOK, "connected"))
    assert await store.get("s1") == Entry("d", 2000.5, Source.WEBHOOK, "connected")
    assert await store.counts() == {"d": 1}
    # Exact comparison, not rounded in Lua: one ulp older loses, one ulp newer wins.
    t = 1712345678.123456
    assert await store.put("s2", Entry("a", t, Source.WEBHOOK))
    assert not await store.put("s2", Entry("b", math.nextafter(t, 0.0), Source.WEBHOOK))
    assert await store.put("s2", Entry("c", math.nextafter(t, math.inf), Source.WEBHOOK))
    assert not await store.put("s2", Entry("d", t, Source.WEBHOOK))
    assert await store.get("s2") == Entry("c", math.nextafter(t, math.inf), Source.WEBHOOK)


async def test_tombstone_blocks_late_facts_then_expires(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    store = await make_store(tombstone_ttl_s=0.3)
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await store.put("s1", Entry("a", 990.0, Source.WEBHOOK))
        assert await store.put("s1", Entry(None, 995.0, Source.WEBHOOK))
        assert await store.get("s1") == Entry(None, 995.0, Source.WEBHOOK)
        assert not await store.put("s1", Entry("a", 994.0, Source.WEBHOOK))
        assert await store.counts() == {}
        assert [s async for s, _ in store.items()] == []
        assert await raw.pttl(f"{store.key_prefix}s:s1") > 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while await store.get("s1") is not None:
            assert loop.time() < deadline, "the tombstone never expired"
            await asyncio.sleep(0.02)
        # Unknown again: any observation is accepted, and a live entry never expires.
        assert await store.put("s1", Entry("b", 1.0, Source.SYNC))
        assert await raw.pttl(f"{store.key_prefix}s:s1") == -1
        # A newer live fact over a fresh tombstone clears its TTL too.
        await store.put("s2", Entry(None, 5.0, Source.ADMIN))
        await store.put("s2", Entry("c", 6.0, Source.WEBHOOK))
        assert await raw.pttl(f"{store.key_prefix}s:s2") == -1
        assert await store.counts() == {"b": 1, "c": 1}
        # Nothing outside the prefixes the tests chose.
        assert all(str(k).startswith("t-") for k in await raw.keys("*"))
    finally:
        await raw.aclose()


async def test_counts_follow_moves_and_forgets(make_store: MakeStore) -> None:
    store = await make_store()
    await store.put("s1", Entry("a", 1.0, Source.SYNC))
    await store.put("s2", Entry("a", 1.0, Source.SYNC))
    await store.put("s3", Entry("b", 1.0, Source.SYNC))
    await store.put("s1", Entry("b", 2.0, Source.WEBHOOK))
    assert await store.counts() == {"a": 1, "b": 2}
    await store.put("s1", Entry("b", 3.0, Source.WEBHOOK))  # same owner again: no double count
    assert await store.counts() == {"a": 1, "b": 2}
    await store.put("s2", Entry(None, 3.0, Source.WEBHOOK))
    await store.put("s2", Entry(None, 4.0, Source.WEBHOOK))  # forgetting twice: still 0
    assert await store.counts() == {"b": 2}
    await store.put("s2", Entry("a", 5.0, Source.DISCOVERY))
    assert not await store.put("s3", Entry("a", 0.5, Source.SYNC))  # refused: no change
    assert await store.counts() == {"a": 1, "b": 2}


async def test_items_and_page_match_memory_store(make_store: MakeStore) -> None:
    store = await make_store()
    oracle = MemoryStore()
    rng = random.Random(7)
    sessions = [f"{rng.choice('abcXYZ')}{i:04d}.{rng.randrange(99)}@c.us" for i in range(250)]
    for i, session in enumerate(sessions):
        entry = Entry(rng.choice(["n1", "n2", "n3"]), 100.0 + i, Source.SYNC, "connected")
        for s in (store, oracle):
            await s.put(session, entry)
    for session in sessions[::7]:  # some forgotten: never listed
        for s in (store, oracle):
            await s.put(session, Entry(None, 1000.0, Source.WEBHOOK))

    assert await store.counts() == await oracle.counts()
    listed = [item async for item in store.items()]
    assert sorted(listed) == sorted([item async for item in oracle.items()])
    assert len(listed) == 250 - len(sessions[::7])

    for after in (None, "", "X", sessions[10], sessions[-1], "~"):
        for limit in (0, 1, 7, 100, 1000):
            for instance in (None, "n2", "nobody"):
                got = await store.page(after=after, limit=limit, instance=instance)
                want = await oracle.page(after=after, limit=limit, instance=instance)
                assert got == want, (after, limit, instance)

    # Walking with the cursor visits every live entry once, in id order.
    walked: list[tuple[str, Entry]] = []
    cursor: str | None = None
    while page := await store.page(after=cursor, limit=33, instance="n1"):
        walked.extend(page)
        cursor = page[-1][0]
    assert walked == sorted((s, e) for s, e in listed if e.instance == "n1")


async def test_a_put_on_one_router_reaches_the_others(make_store: MakeStore) -> None:
    one, two = await make_store(), await make_store()
    seen_one, seen_two = recorder(one), recorder(two)
    entry = Entry("node-1", 1712345678.25, Source.WEBHOOK, "connected")
    assert await one.put("s1", entry)
    await wait_for(lambda: len(seen_two) == 1, what="the other router's callback")
    await wait_for(lambda: len(seen_one) == 1, what="the writer's own callback")
    assert seen_two == seen_one == [("s1", entry)]
    # A refused put publishes nothing; a forget arrives as None.
    assert not await two.put("s1", Entry("node-2", 1.0, Source.SYNC))
    assert await two.put("s1", Entry(None, 1712345679.0, Source.WEBHOOK))
    await wait_for(lambda: len(seen_one) == 2, what="the forget")
    assert seen_one[1] == ("s1", None)
    # Another prefix is another directory: its changes are not ours.
    other = await make_store(key_prefix=unique_prefix())
    await other.put("s1", Entry("x", 1e10, Source.SYNC))
    assert await one.put("s9", Entry("y", 1.0, Source.SYNC))
    await wait_for(lambda: len(seen_two) == 3, what="s9")
    assert [s for s, _ in seen_two] == ["s1", "s1", "s9"]


async def test_racing_routers_never_let_an_older_observation_win(make_store: MakeStore) -> None:
    one, two, watcher = await make_store(), await make_store(), await make_store()
    seen = recorder(watcher)
    rng = random.Random(11)
    sessions = [f"race-{i}" for i in range(3)]
    puts: list[Awaitable[bool]] = []
    expected: dict[str, Entry] = {}
    for session in sessions:
        stamps = [1_700_000_000.0 + rng.random() * 100 for _ in range(200)]
        entries = [Entry(f"n{i % 5}", t, Source.WEBHOOK) for i, t in enumerate(stamps)]
        expected[session] = max(entries, key=lambda e: e.observed_at)
        for i, entry in enumerate(entries):
            puts.append((one if i % 2 else two).put(session, entry))
    order = list(range(len(puts)))
    rng.shuffle(order)
    results = await asyncio.gather(*(puts[i] for i in order))
    assert any(results) and not all(results)

    for session in sessions:
        assert await one.get(session) == expected[session]
        assert await two.get(session) == expected[session]
    winners = [e.instance for e in expected.values()]
    assert await one.counts() == {n: winners.count(n) for n in set(winners) if n is not None}
    # Every change published (in the order Redis applied them) was at least as new as the
    # one before it: no interleaving ever stored an older fact over a newer one.
    applied = sum(results)
    await wait_for(lambda: len(seen) == applied, what="all published changes")
    for session in sessions:
        stamps_seen = [e.observed_at for s, e in seen if s == session and e is not None]
        assert stamps_seen == sorted(stamps_seen)
        assert stamps_seen[-1] == expected[session].observed_at


async def test_listener_survives_a_redis_restart(make_store: MakeStore) -> None:
    server = started_redis_server()  # its own: the module's server stays up for the others
    try:
        store = await make_store(server.url)
        writer = await make_store(server.url)
        seen = recorder(store)
        await writer.put("s1", Entry("a", 1.0, Source.SYNC))
        await wait_for(lambda: seen == [("s1", Entry("a", 1.0, Source.SYNC))], what="s1")

        server.stop()
        with pytest.raises(RedisConnectionError):  # the caller decides; never swallowed
            await store.get("s1")
        server.start()  # same port, empty (no persistence)

        await wait_for(lambda: ("", None) in seen, timeout_s=8.0, what="the reset signal")
        entry = Entry("b", 2.0, Source.WEBHOOK, "connected")
        assert await writer.put("s2", entry)  # the script is reloaded on NOSCRIPT
        await wait_for(lambda: seen[-1] == ("s2", entry), what="a change after the restart")
        assert seen.count(("", None)) == 1
        assert await store.get("s2") == entry
    finally:
        server.close()


async def test_close_is_idempotent_and_start_twice_is_harmless(make_store: MakeStore) -> None:
    store = await make_store()
    await store.start()
    await store.close()
    await store.close()
    never_started = RedisStore("redis://127.0.0.1:1/0")
    await never_started.close()


async def test_get_many_matches_get_for_each(make_store: MakeStore) -> None:
    redis_store = await make_store()
    memory = MemoryStore()
    for i in range(300):
        entry = Entry(f"node-{i % 3}" if i % 7 else None, 1000.0 + i, Source.SYNC, "connected")
        for store in (redis_store, memory):
            assert await store.put(f"g{i}", entry)
    ids = [f"g{i}" for i in range(0, 300, 2)] + ["never-seen"]
    for store in (redis_store, memory):
        assert await store.get_many(ids) == [await store.get(s) for s in ids]
        assert await store.get_many([]) == []


@pytest.mark.parametrize(("candidate", "existing", "stored"), OWNERSHIP)
async def test_both_stores_apply_the_ownership_rule(
    make_store: MakeStore, candidate: Entry, existing: Entry | None, stored: bool
) -> None:
    """The Lua script mirrors `may_replace` exactly; so does the memory store."""
    memory = MemoryStore(clock=lambda: 3.0)  # the table's times are "now"
    for store in (await make_store(key_prefix=unique_prefix()), memory):
        if existing is not None:
            assert await store.put("s", existing)
        assert await store.put("s", candidate) is stored, type(store).__name__
        assert await store.get("s") == (candidate if stored else existing)


async def test_only_if_writes_only_while_the_entry_names_that_instance(
    make_store: MakeStore,
) -> None:
    for store in (await make_store(key_prefix=unique_prefix()), MemoryStore()):
        gone = Entry("node-a", 3.0, Source.PROXY, Status.GONE)
        assert not await store.put("s", gone, only_if="node-a")  # nothing stored yet
        await store.put("s", Entry("node-b", 1.0, Source.WEBHOOK, Status.CONNECTED))
        assert not await store.put("s", gone, only_if="node-a")  # names node-b: untouched
        assert (await store.get("s")).instance == "node-b"  # type: ignore[union-attr]
        gone_b = Entry("node-b", 3.0, Source.PROXY, Status.GONE)
        assert await store.put("s", gone_b, only_if="node-b")
        assert await store.get("s") == gone_b
        assert (await store.counts()) == {"node-b": 1}  # still placed there (known)


async def test_the_store_finds_its_master_through_a_real_sentinel(
    redis_server: RedisServer,
) -> None:
    from tests.redis_server import SentinelServer

    sentinel = SentinelServer(redis_server)
    sentinel.start()
    try:
        # The URL gives only credentials and db: its host is nowhere.
        store = RedisStore(
            "redis://127.0.0.1:1/0",
            key_prefix=unique_prefix(),
            sentinels=(("127.0.0.1", sentinel.port),),
            sentinel_master=sentinel.name,
        )
        await store.start()
        try:
            changes = recorder(store)
            assert await store.put("s1", Entry("node-1", 1.0, Source.WEBHOOK, "connected"))
            assert await store.get("s1") == Entry("node-1", 1.0, Source.WEBHOOK, "connected")
            await wait_for(lambda: bool(changes), what="the change through pub/sub")
            assert changes[0][0] == "s1"
            assert await store.kv_get(b"k") is None
            await store.kv_put(b"k", b"\x00v", 5.0)
            assert await store.kv_get(b"k") == b"\x00v"
        finally:
            await store.close()
    finally:
        sentinel.stop()


@pytest.mark.parametrize(("candidate", "existing", "stored"), OWNERSHIP)
async def test_a_batch_applies_the_same_rule_item_by_item(
    make_store: MakeStore, candidate: Entry, existing: Entry | None, stored: bool
) -> None:
    memory = MemoryStore(clock=lambda: 3.0)
    for store in (await make_store(key_prefix=unique_prefix()), memory):
        items = [("other", Entry("node-z", 1.0, Source.SYNC, Status.CONNECTED))]
        if existing is not None:
            await store.put("s", existing)
        assert await store.put_many([*items, ("s", candidate)]) == [True, stored]
        assert await store.get("s") == (candidate if stored else existing)
        assert await store.get("other") == items[0][1]


async def test_a_first_sync_into_redis_writes_in_batches(
    redis_server: RedisServer, sims_for_sync: Any
) -> None:
    """One script call per batch of sessions, not one per session."""
    from wa_router.app import build_router
    from wa_router.config import config_from_dict

    sims = sims_for_sync
    for i in range(600):
        sims[i % 2].add_session(f"b{i}")
    cfg = config_from_dict(
        {
            "instances": [{"name": s.name, "url": s.url} for s in sims],
            "store": {
                "kind": "redis",
                "redis_url": redis_server.url,
                "key_prefix": unique_prefix(),
            },
            "upstream": {"api_key": "test-key"},
        }
    )
    router = build_router(cfg)
    await router.store.start()
    await router.forwarder.start()
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:

        async def evalsha_calls() -> int:
            stats = await client.info("commandstats")
            return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

        before = await evalsha_calls()
        report = await router.syncer.run()
        assert len(report.learned) == 600
        assert await evalsha_calls() - before <= 3  # 600 sessions in batches of 256
        assert (await router.store.counts()) == {"node-0": 300, "node-1": 300}
        # ...and the cache is warm with what the next sync verifies.
        router.directory.on_store_change("", None)  # "anything may have changed": all dropped
        report = await router.syncer.run()
        assert report.verified == 600
        hits = router.directory.stats.cache_hits
        assert (await router.directory.lookup("b7")) is not None
        assert router.directory.stats.cache_hits == hits + 1
    finally:
        await client.aclose()
        await router.forwarder.close()
        await router.directory.close()
        await router.store.close()


@pytest.fixture
async def sims_for_sync() -> AsyncIterator[list[Any]]:
    from wa_router.sim import SimInstance

    nodes = [SimInstance(name=f"node-{i}", api_key="test-key", ready_delay_s=0.0) for i in range(2)]
    for n in nodes:
        await n.start()
    yield nodes
    for n in nodes:
        await n.stop()
