"""Session -> instance: an in-process TTL cache over a store.

The cache makes the common case (a session that has not moved) cost one dict lookup; the
store is the truth shared by every router. A cached entry that turns out wrong is not a
correctness problem: the instance answers "session not here" (or cannot be reached), the
proxy invalidates and rediscovers.

Ownership knows status (`stores.base.may_replace`): a login-stage claim from another
instance does not displace a connected owner; it is kept here as a *candidate* (this
router's memory only), which tells the proxy that the session is expected back. Whoever
waits for a session hears of it through `on_connected`: every stored `connected`
observation, this router's or (through the store's pub/sub) another's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from .aio import cancel_and_wait
from .breaker import Breaker
from .stores.base import LOGIN_STAGES, Entry, Source, Status, Store, may_replace, newer

log = structlog.get_logger("wa_router.directory")

ConnectedListener = Callable[[str, str], None]
_T = TypeVar("_T")


class StoreUnavailable(Exception):
    """The store's breaker is open: not asked."""


_CANDIDATES_MAX = 10_000
_UNWRITTEN_MAX = 100_000


@dataclass(slots=True)
class DirectoryStats:
    cache_hits: int = 0
    store_hits: int = 0
    misses: int = 0
    stale_writes: int = 0  # observations refused because a newer one was there
    candidates: int = 0  # login-stage claims refused because the session is connected elsewhere
    demotions: int = 0  # an owner's own answer said it does not hold the session usable
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
        store_deadline_s: float = 0.25,
        store_breaker_s: float = 1.0,
        breaker: Breaker | None = None,
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
        # A hung or dead shared store must not hold a request: each call has a deadline,
        # and after a failure the store is left alone for a moment (a breaker), so a Redis
        # under SIGSTOP costs one deadline now and then, not one per request.
        self._breaker = breaker or Breaker(store_deadline_s, store_breaker_s, monotonic)
        # Written while the store was away: (entry, only_if), written back when it answers.
        self._unwritten: dict[str, tuple[Entry, str | None]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._candidates: dict[str, Entry] = {}
        self._connected_listeners: list[ConnectedListener] = []
        store.subscribe(self.on_store_change)

    def on_connected(self, listener: ConnectedListener) -> None:
        """`listener(session, instance)` whenever a `connected` owner is stored."""
        self._connected_listeners.append(listener)

    def cached(self, session: str) -> Entry | None:
        """The owner entry of `session` when the cache has it fresh; None: ask `lookup`."""
        hit = self._cache.get(session)
        if hit is not None and hit[1] > self._monotonic():
            self.stats.cache_hits += 1
            return hit[0]
        return None

    async def lookup(self, session: str) -> Entry | None:
        """The live owner entry of `session`, or None (unknown or forgotten)."""
        hit = self.cached(session)
        if hit is not None:
            return hit
        self._cache.pop(session, None)  # stale, if there at all
        try:
            entry = await self._guarded(self.store.get(session))
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
        status: Status | None = None,
    ) -> bool:
        """Record that `instance` holds `session` in `status`; False when the store kept what
        it had (a newer fact, or a connected owner elsewhere: then this is a candidate)."""
        entry = Entry(
            instance, self._wall() if observed_at is None else observed_at, source, status
        )
        return await self._write(session, entry)

    async def demote(
        self,
        session: str,
        instance: str,
        status: Status,
        source: Source = Source.PROXY,
        *,
        observed_at: float | None = None,
    ) -> bool:
        """Evidence that `instance` does not hold `session` usable (it answered "not found"
        or "not connected"): recorded only while the directory still names `instance`, so
        it can never move the session onto it."""
        entry = Entry(
            instance, self._wall() if observed_at is None else observed_at, source, status
        )
        try:
            applied = await self._guarded(self.store.put(session, entry, only_if=instance))
        except Exception as exc:
            self._store_failed("put", exc)
            applied = False
            self._write_back(session, entry, only_if=instance)  # other routers need it too
        cached = self._cache.get(session)
        if applied or (cached is not None and cached[0].instance == instance):
            self.invalidate(session)
        if applied:
            self.stats.demotions += 1
            log.info("session_demoted", session=session, instance=instance, status=str(status))
        return applied

    def candidate(self, session: str) -> Entry | None:
        """The latest login-stage claim refused while the session was connected elsewhere."""
        return self._candidates.get(session)

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
        if entry.connected:
            self._tell_connected(session, entry)

    def invalidate(self, session: str) -> None:
        """Drop the cached entry (the store is asked next time)."""
        self._cache.pop(session, None)

    async def counts(self) -> dict[str, int]:
        try:
            return await self._guarded(self.store.counts())
        except Exception as exc:
            self._store_failed("counts", exc)
            return {}

    def _write_back(self, session: str, entry: Entry, only_if: str | None = None) -> None:
        if session not in self._unwritten and len(self._unwritten) >= _UNWRITTEN_MAX:
            del self._unwritten[next(iter(self._unwritten))]  # the next sync has it anyway
        self._unwritten[session] = (entry, only_if)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        """Write what the store missed while it was away, once it answers again."""
        while self._unwritten:
            await asyncio.sleep(self._breaker.closes_in() + 0.01)
            while self._unwritten:
                session, item = next(iter(self._unwritten.items()))
                entry, only_if = item
                try:
                    await self._guarded(self.store.put(session, entry, only_if=only_if))
                except Exception:
                    break  # still away: wait for the breaker again
                if self._unwritten.get(session) is item:
                    del self._unwritten[session]
        log.info("store_written_back")

    async def close(self) -> None:
        if self._flusher is not None:
            await cancel_and_wait(self._flusher)

    async def _guarded(self, call: Coroutine[Any, Any, _T]) -> _T:
        """`call` under the store deadline; StoreUnavailable at once while the breaker is
        open (the caller goes on with the cache and discovery)."""
        if self._breaker.open:
            call.close()
            raise StoreUnavailable("the store failed a moment ago")
        try:
            async with asyncio.timeout(self._breaker.deadline_s):
                return await call
        except Exception:
            self._breaker.trip()
            raise

    def _store_failed(self, op: str, exc: Exception) -> None:
        self.stats.store_errors += 1
        if not isinstance(exc, StoreUnavailable):
            log.warning("store_unavailable", op=op, error=type(exc).__name__)

    async def _write(self, session: str, entry: Entry) -> bool:
        try:
            applied = await self._guarded(self.store.put(session, entry))
        except Exception as exc:
            self._store_failed("put", exc)
            applied = self._kept_meanwhile(session, entry)
        self._after_write(session, entry, applied)
        return applied

    async def observe_many(self, items: list[tuple[str, Entry]]) -> list[bool]:
        """`observe` of each prepared entry, in one store round trip (sync's batches)."""
        try:
            results = await self._guarded(self.store.put_many(items))
        except Exception as exc:
            self._store_failed("put_many", exc)
            results = [self._kept_meanwhile(s, e) for s, e in items]
        for (session, entry), applied in zip(items, results, strict=True):
            self._after_write(session, entry, applied)
        return results

    def warm(self, session: str, entry: Entry) -> None:
        """Cache what a sync found true in the store: the first request needs no read."""
        if entry.instance is not None:
            self._remember(session, entry)

    def _kept_meanwhile(self, session: str, entry: Entry) -> bool:
        # The store did not answer. Kept in this router's cache, by the same rule the store
        # applies (a restorer's claim must not displace a connected owner), and written
        # back once the store answers again (the store's own rule then decides).
        cached = self._cache.get(session)
        applied = may_replace(entry, cached[0] if cached is not None else None)
        if applied:
            self._write_back(session, entry)
        return applied

    def _after_write(self, session: str, entry: Entry, applied: bool) -> None:
        if not applied:
            if entry.status in LOGIN_STAGES and entry.instance is not None:
                self._remember_candidate(session, entry)
            else:
                self.stats.stale_writes += 1
                log.info(
                    "directory_stale_observation",
                    session=session,
                    source=entry.source.value,
                    instance=entry.instance,
                )
            self.invalidate(session)
        elif entry.instance is None:
            self._candidates.pop(session, None)
            self.invalidate(session)
        else:
            cand = self._candidates.get(session)
            if cand is not None and (cand.instance == entry.instance or entry.connected):
                del self._candidates[session]
            self._remember(session, entry)
            if entry.connected:
                self._tell_connected(session, entry)

    def _remember_candidate(self, session: str, entry: Entry) -> None:
        self.stats.candidates += 1
        log.info(
            "session_candidate",
            session=session,
            instance=entry.instance,
            status=entry.status,
            source=entry.source.value,
        )
        if session not in self._candidates and len(self._candidates) >= _CANDIDATES_MAX:
            del self._candidates[next(iter(self._candidates))]
        self._candidates[session] = entry

    def _tell_connected(self, session: str, entry: Entry) -> None:
        assert entry.instance is not None
        for listener in self._connected_listeners:
            try:
                listener(session, entry.instance)
            except Exception:
                log.exception("connected_listener_failed", session=session)

    def _remember(self, session: str, entry: Entry) -> None:
        cache = self._cache
        if session not in cache and len(cache) >= self._max:
            # Evict the oldest insertion: cheaper than LRU bookkeeping on every hit, and a
            # miss costs only one store read.
            del cache[next(iter(cache))]
        cache[session] = (entry, self._monotonic() + self._ttl_s)
