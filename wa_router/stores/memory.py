"""The in-process store: a dict. The embedded default; one router only."""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

from .base import DrainListener, Entry, Listener, may_replace


class MemoryStore:
    def __init__(
        self, *, tombstone_ttl_s: float = 600.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._entries: dict[str, Entry] = {}
        self._counts: Counter[str] = Counter()
        self._tombstone_ttl_s = tombstone_ttl_s
        self._clock = clock
        self._drained: set[str] = set()
        self._drain_listeners: list[DrainListener] = []
        self.changes = 0  # counts every change kept: a snapshot is written when it moved

    def __len__(self) -> int:
        return len(self._entries)

    async def start(self) -> None:
        return None

    def subscribe(self, callback: Listener) -> None:
        """Nothing to hear: only this process writes here, through its own Directory."""

    async def get(self, session: str) -> Entry | None:
        entry = self._entries.get(session)
        if (
            entry is not None
            and entry.instance is None
            and entry.observed_at < self._clock() - self._tombstone_ttl_s
        ):
            del self._entries[session]
            return None
        return entry

    async def get_many(self, sessions: list[str]) -> list[Entry | None]:
        return [await self.get(s) for s in sessions]

    async def put(self, session: str, entry: Entry, *, only_if: str | None = None) -> bool:
        # No await between read and write: atomic on the event loop.
        existing = self._entries.get(session)
        if only_if is not None and (existing is None or existing.instance != only_if):
            return False
        if not may_replace(entry, existing):
            return False
        if existing is not None and existing.instance is not None:
            self._counts[existing.instance] -= 1
        if entry.instance is not None:
            self._counts[entry.instance] += 1
        self._entries[session] = entry
        self.changes += 1
        return True

    async def put_many(self, items: list[tuple[str, Entry]]) -> list[bool]:
        return [await self.put(session, entry) for session, entry in items]

    async def counts(self) -> dict[str, int]:
        return {name: n for name, n in self._counts.items() if n > 0}

    async def items(self) -> AsyncIterator[tuple[str, Entry]]:
        for session, entry in list(self._entries.items()):
            if entry.instance is not None:
                yield session, entry

    async def page(
        self, *, after: str | None, limit: int, instance: str | None = None
    ) -> list[tuple[str, Entry]]:
        # O(n log limit): no sorted index to keep up on the hot path for an admin listing.
        return heapq.nsmallest(
            limit,
            (
                (k, e)
                for k, e in self._entries.items()
                if e.instance is not None
                and (after is None or k > after)
                and (instance is None or e.instance == instance)
            ),
            key=lambda kv: kv[0],
        )

    def entries(self) -> list[tuple[str, Entry]]:
        """Every entry, tombstones included while they keep late, older news out: a copy."""
        expired = self._clock() - self._tombstone_ttl_s
        return [
            (session, e)
            for session, e in self._entries.items()
            if e.instance is not None or e.observed_at >= expired
        ]

    async def set_draining(self, instance: str, draining: bool) -> None:
        if draining:
            self._drained.add(instance)
        else:
            self._drained.discard(instance)
        self.changes += 1
        for callback in list(self._drain_listeners):
            callback(instance, draining)

    async def drained(self) -> set[str]:
        return set(self._drained)

    def on_draining(self, callback: DrainListener) -> None:
        self._drain_listeners.append(callback)

    async def close(self) -> None:
        return None
