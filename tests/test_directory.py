"""Directory over the memory store: TTL cache, and an older fact never beats a newer one."""

from __future__ import annotations

from wa_router.directory import Directory
from wa_router.stores import MemoryStore, Source


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(ttl_s: float = 10.0, max_entries: int = 100) -> tuple[Directory, MemoryStore, Clock]:
    clock = Clock()
    store = MemoryStore(tombstone_ttl_s=60.0, clock=clock)
    return (
        Directory(
            store, cache_ttl_s=ttl_s, cache_max_entries=max_entries, monotonic=clock, wall=clock
        ),
        store,
        clock,
    )


async def test_observe_then_lookup_hits_cache() -> None:
    d, _, _ = make()
    assert await d.lookup("s1") is None
    assert await d.observe("s1", "a", Source.PLACEMENT)
    entry = await d.lookup("s1")
    assert entry is not None and entry.instance == "a" and entry.source is Source.PLACEMENT
    assert (d.stats.cache_hits, d.stats.misses) == (1, 1)


async def test_older_observation_never_overwrites_newer() -> None:
    d, store, _ = make()
    assert await d.observe("s1", "b", Source.WEBHOOK, observed_at=2000.0)
    # A late retry of an older webhook, and an older sync, both lose.
    assert not await d.observe("s1", "a", Source.WEBHOOK, observed_at=1999.0)
    assert not await d.observe("s1", "c", Source.SYNC, observed_at=1500.0)
    assert (await d.lookup("s1")).instance == "b"  # type: ignore[union-attr]
    assert (await store.get("s1")).instance == "b"  # type: ignore[union-attr]
    assert d.stats.stale_writes == 2
    # Same second: the later arrival wins (Node: the last session_ready wins).
    assert await d.observe("s1", "d", Source.WEBHOOK, observed_at=2000.0)
    assert (await d.lookup("s1")).instance == "d"  # type: ignore[union-attr]


async def test_forget_leaves_a_tombstone_that_blocks_late_facts() -> None:
    d, store, clock = make()
    await d.observe("s1", "a", Source.WEBHOOK, observed_at=990.0)
    assert await d.forget("s1", Source.WEBHOOK, observed_at=995.0)
    assert await d.lookup("s1") is None
    assert not await d.observe("s1", "a", Source.WEBHOOK, observed_at=994.0)
    assert await d.lookup("s1") is None
    assert await store.counts() == {}
    clock.t += 120  # tombstone expired: the session is simply unknown again
    assert await store.get("s1") is None


async def test_cache_expires_and_rereads_store() -> None:
    d, store, clock = make(ttl_s=5.0)
    await d.observe("s1", "a", Source.DISCOVERY)
    # Another router moved it in the shared store; this one sees it after the TTL.
    await store.put("s1", (await store.get("s1")).__class__("b", clock.t + 1, Source.WEBHOOK))  # type: ignore[union-attr]
    assert (await d.lookup("s1")).instance == "a"  # type: ignore[union-attr]
    clock.t += 6
    assert (await d.lookup("s1")).instance == "b"  # type: ignore[union-attr]
    assert d.stats.store_hits == 1


async def test_cache_is_bounded() -> None:
    d, _, _ = make(max_entries=3)
    for i in range(10):
        await d.observe(f"s{i}", "a", Source.SYNC)
    assert len(d._cache) == 3
    assert (await d.lookup("s0")).instance == "a"  # type: ignore[union-attr]  # from the store


async def test_counts_follow_moves() -> None:
    d, _, _ = make()
    await d.observe("s1", "a", Source.SYNC, observed_at=1.0)
    await d.observe("s2", "a", Source.SYNC, observed_at=1.0)
    await d.observe("s3", "b", Source.SYNC, observed_at=1.0)
    await d.observe("s1", "b", Source.WEBHOOK, observed_at=2.0)
    assert await d.counts() == {"a": 1, "b": 2}
