"""The store interface every directory backend implements, and its value object."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class Source(StrEnum):
    """What observed an ownership fact."""

    WEBHOOK = "webhook"
    DISCOVERY = "discovery"
    PLACEMENT = "placement"
    SYNC = "sync"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Entry:
    """Session -> instance, as observed at `observed_at` (Unix seconds) by `source`.

    `instance` None is a tombstone: the session was forgotten at `observed_at`, and an
    older observation (a late webhook retry) must not bring it back.
    """

    instance: str | None
    observed_at: float
    source: Source
    status: str | None = None


def newer(candidate: Entry, existing: Entry | None) -> bool:
    """Whether `candidate` may replace `existing`. Equal times: the later arrival wins, as
    in Node, where the last `session_ready` of several restoring instances wins."""
    return existing is None or candidate.observed_at >= existing.observed_at


Listener = Callable[[str, "Entry | None"], None]


class Store(Protocol):
    async def start(self) -> None:
        """Connect, and start telling subscribers about changes."""
        ...

    def subscribe(self, callback: Listener) -> None:
        """`callback(session, entry)` for every change made by any router sharing the
        store (entry None: forgotten); `callback("", None)`: anything may have changed."""
        ...

    async def get(self, session: str) -> Entry | None:
        """The entry for `session`, tombstones included; None when never seen."""
        ...

    async def get_many(self, sessions: list[str]) -> list[Entry | None]:
        """`get` of each, in one round trip where the store has round trips."""
        ...

    async def put(self, session: str, entry: Entry) -> bool:
        """Store `entry` unless a newer observation is there; True when it was stored.
        Atomic: two routers racing cannot let the older one win."""
        ...

    async def counts(self) -> dict[str, int]:
        """Live sessions per instance name."""
        ...

    def items(self) -> AsyncIterator[tuple[str, Entry]]:
        """Every live entry (no tombstones), in no particular order."""
        ...

    async def page(
        self, *, after: str | None, limit: int, instance: str | None = None
    ) -> list[tuple[str, Entry]]:
        """Live entries with session ids above `after`, in id order, at most `limit`
        (the admin API's cursor pagination); only `instance`'s when given."""
        ...

    async def close(self) -> None: ...
