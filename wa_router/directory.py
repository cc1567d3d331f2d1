"""Session -> instance: an in-process TTL cache over a store.

The cache makes the common case (a session that has not moved) cost one dict lookup; the
store is the truth shared by every router. A cached entry that turns out wrong is not a
correctness problem: the instance answers "session not here" (or cannot be reached), the
proxy invalidates and rediscovers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from .stores.base import Entry, Source, Store

log = structlog.get_logger("wa_router.directory")


@dataclass(slots=True)
class DirectoryStats:
    cache_hits: int = 0
    store_hits: int = 0
    misses: int = 0
    stale_writes: int = 0  # observations refused because a newer one was there

    @property
    def hit_ratio(self) -> float:
        total = self.cache_hits + self.store_hits + self.misses
        return self.cache_hits / total if total else 0.0


class Directory:
    def __init__(
        self,
        store: Store,
        *,
        cache_ttl_s: float,
        cache_max_entries: int,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.stats = DirectoryStats()
        self._ttl_s = cache_ttl_s
        self._max = cache_max_entries
        self._monotonic = monotonic
        self._wall = wall
        self._cache: dict[str, tuple[Entry, float]] = {}

    async def lookup(self, session: str) -> Entry | None:
        """The live owner entry of `session`, or None (unknown or forgotten)."""
        hit = self._cache.get(session)
        if hit is not None:
            if hit[1] > self._monotonic():
                self.stats.cache_hits += 1
                return hit[0]
            del self._cache[session]
        entry = await self.store.get(session)
        if entry is None or entry.instance is None:
            self.stats.misses += 1
            return None
        self.stats.store_hits += 1
        self._remember(session, entry)
        return entry

    async def observe(
        self,
        session: str,
        instance: str,
        source: Source,
        *,
        observed_at: float | None = None,
        status: str | None = None,
    ) -> bool:
        """Record that `instance` owns `session`; False when a newer fact was already there."""
        entry = Entry(
            instance, self._wall() if observed_at is None else observed_at, source, status
        )
        return await self._write(session, entry)

    async def forget(
        self, session: str, source: Source, *, observed_at: float | None = None
    ) -> bool:
        entry = Entry(None, self._wall() if observed_at is None else observed_at, source)
        return await self._write(session, entry)

    def invalidate(self, session: str) -> None:
        """Drop the cached entry (the store is asked next time)."""
        self._cache.pop(session, None)

    async def counts(self) -> dict[str, int]:
        return await self.store.counts()

    async def _write(self, session: str, entry: Entry) -> bool:
        applied = await self.store.put(session, entry)
        if not applied:
            self.stats.stale_writes += 1
            log.info(
                "directory_stale_observation",
                session=session,
                source=entry.source.value,
                instance=entry.instance,
            )
            self.invalidate(session)
        elif entry.instance is None:
            self.invalidate(session)
        else:
            self._remember(session, entry)
        return applied

    def _remember(self, session: str, entry: Entry) -> None:
        cache = self._cache
        if session not in cache and len(cache) >= self._max:
            # Evict the oldest insertion: cheaper than LRU bookkeeping on every hit, and a
            # miss costs only one store read.
            del cache[next(iter(cache))]
        cache[session] = (entry, self._monotonic() + self._ttl_s)
