"""Replay and retry memory that outlives the process and is shared by replicas.

A webhook seen once must be refused as a replay by this router after a restart and by
every other router: the keys go to the backlog's SQLite file (one router) or to Redis (when
Redis is the store), behind this router's own in-process memory. The shared memory is
asked under a short deadline: a hung store never holds a webhook for long (Node gives up at
5 s); then the local memory alone decides, which is what one router without it would do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import structlog

from .events import SeenSet

log = structlog.get_logger("wa_router.replay")

DEADLINE_S = 0.25


class SharedSeen(Protocol):
    async def remember(self, key: bytes, ttl_s: float) -> bool:
        """Record `key` for `ttl_s`; False when it was there already."""
        ...

    async def forget(self, key: bytes) -> None: ...


class Seen:
    """`add(key)`: first time within `ttl_s` here or anywhere the shared memory reaches."""

    def __init__(
        self, ttl_s: float, clock: Callable[[], float], shared: SharedSeen | None = None
    ) -> None:
        self._ttl_s = ttl_s
        self._local = SeenSet(ttl_s, clock)
        self.shared = shared
        self.shared_errors = 0

    async def add(self, key: bytes) -> bool:
        if not self._local.add(key):
            return False
        if self.shared is None:
            return True
        try:
            async with asyncio.timeout(DEADLINE_S):
                return await self.shared.remember(key, self._ttl_s)
        except Exception as exc:  # unreachable or hung: this router's memory decides
            self.shared_errors += 1
            log.warning("replay_memory_unavailable", error=type(exc).__name__)
            return True

    async def discard(self, key: bytes) -> None:
        self._local.discard(key)
        if self.shared is not None:
            try:
                async with asyncio.timeout(DEADLINE_S):
                    await self.shared.forget(key)
            except Exception as exc:
                self.shared_errors += 1
                log.warning("replay_memory_unavailable", error=type(exc).__name__)
