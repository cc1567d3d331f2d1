"""What the intake remembers of accepted webhooks, beyond this process and across replicas.

Two facts, each with its own lifetime:

- *replays*: a (timestamp, signature) accepted before (for lifecycle events, from the same
  pool member: two instances sign the same bytes in the same second);
- *the last event* each member sent for each session: Node's retry of an event is the same
  body again from the same member, with nothing else from it for that session in between
  (a real repeat after a reconnect or a restart has other events before it).

A fact is written once the event is delivered or queued (`commit`), never before: a router
killed in the middle of a relay must not leave behind a memory that makes Node's retry look
like a duplicate of an event nobody has. The shared memory (the backlog's SQLite file, or
Redis when it is the store) is asked under a deadline with a breaker: a hung store costs a
webhook at most one deadline now and then; meanwhile this process's memory decides.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import structlog

from .breaker import Breaker

log = structlog.get_logger("wa_router.replay")


class SharedKV(Protocol):
    async def kv_get(self, key: bytes) -> bytes | None: ...

    async def kv_put(self, key: bytes, value: bytes, ttl_s: float) -> None: ...


class _Local:
    """key -> (value, expiry), oldest write first (one TTL per memory: expiry is O(1))."""

    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()

    def get(self, key: bytes) -> bytes | None:
        now = self._clock()
        while self._items:
            oldest, (_, expires) = next(iter(self._items.items()))
            if expires > now:
                break
            del self._items[oldest]
        hit = self._items.get(key)
        return hit[0] if hit is not None else None

    def put(self, key: bytes, value: bytes) -> None:
        self._items.pop(key, None)
        self._items[key] = (value, self._clock() + self._ttl_s)


class Memory:
    """One kind of fact (`get`/`put` by key), local first, then shared."""

    def __init__(
        self,
        ttl_s: float,
        clock: Callable[[], float],
        shared: SharedKV | None = None,
        *,
        deadline_s: float = 0.25,
        breaker_s: float = 1.0,
        breaker: Breaker | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self._local = _Local(ttl_s, clock)
        self.shared = shared
        self._breaker = breaker or Breaker(deadline_s, breaker_s, monotonic)
        self.shared_errors = 0

    async def get(self, key: bytes) -> bytes | None:
        hit = self._local.get(key)
        if hit is not None or self.shared is None or self._breaker.open:
            return hit
        try:
            async with asyncio.timeout(self._breaker.deadline_s):
                return await self.shared.kv_get(key)
        except Exception as exc:
            self._failed(exc)
            return None

    async def put(self, key: bytes, value: bytes) -> None:
        self._local.put(key, value)
        if self.shared is None or self._breaker.open:
            return
        try:
            async with asyncio.timeout(self._breaker.deadline_s):
                await self.shared.kv_put(key, value, self.ttl_s)
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        # Unreachable or hung: this process's memory decides for a moment.
        self.shared_errors += 1
        self._breaker.trip()
        log.warning("replay_memory_unavailable", error=type(exc).__name__)
