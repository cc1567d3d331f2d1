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

from .stores.base import Entry, Source, Store, newer

log = structlog.get_logger("wa_router.directory")


@dataclass(slots=True)
class DirectoryStats:
    cache_hits: int = 0
    store_hits: int = 0
    misses: int = 0
    stale_writes: int = 0  # observations refused because a newer one was there
    store_errors: int = 0  # store unreachable: served from the cache and discovery

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
        store.subscribe(self.on_store_change)

    async def lookup(self, session: str) -> Entry | None:
        """The live owner entry of `session`, or None (unknown or forgotten)."""
        hit = self._cache.get(session)
        if hit is not None:
            if hit[1] > self._monotonic():
                self.stats.cache_hits += 1
                return hit[0]
            del self._cache[session]
        try:
            entry = await self.store.get(session)
        except Exception as exc:
            # A shared store that is down must not stop routing: discovery finds the owner
            # and the cache keeps it until the store is back.
            self._store_failed("get", exc)
            entry = None
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

    def on_store_change(self, session: str, entry: Entry | None) -> None:
        """Another router (or this one) changed the store: keep the cache in step, so an
        ownership change is routed by every router at once, not after the cache TTL."""
        if not session:
            self._cache.clear()  # the listener lost messages: trust nothing cached
            return
        cached = self._cache.get(session)
        if entry is None or entry.instance is None:
            self.invalidate(session)
            return
        # Pub/sub and our own write's reply travel on different connections: an older
        # message may arrive after a newer write was cached. Only newer facts replace.
        # (Uncached sessions are read from the store when first asked for.)
        if cached is not None and newer(entry, cached[0]):
            self._remember(session, entry)

    def invalidate(self, session: str) -> None:
        """Drop the cached entry (the store is asked next time)."""
        self._cache.pop(session, None)

    async def counts(self) -> dict[str, int]:
        try:
            return await self.store.counts()
        except Exception as exc:
            self._store_failed("counts", exc)
            return {}

    def _store_failed(self, op: str, exc: Exception) -> None:
        self.stats.store_errors += 1
        log.warning("store_unavailable", op=op, error=type(exc).__name__)

    async def _write(self, session: str, entry: Entry) -> bool:
        try:
            applied = await self.store.put(session, entry)
        except Exception as exc:
            self._store_failed("put", exc)
            applied = True  # kept in this router's cache; the next sync writes it again
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
