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
    PROXY = "proxy"  # an instance answered live traffic "not here" / "not usable here"


class Status(StrEnum):
    """What an observation saw of a session on its instance (profiles map their own
    spellings to these). Only `connected` can serve a send; `authenticated` and
    `qr_scanning` are login stages; `disconnected` and `gone` say the instance does not
    hold it usable (it said so, or its listing after a restart lacks it)."""

    CONNECTED = "connected"
    AUTHENTICATED = "authenticated"
    QR_SCANNING = "qr_scanning"
    DISCONNECTED = "disconnected"
    GONE = "gone"


LOGIN_STAGES = frozenset({Status.AUTHENTICATED, Status.QR_SCANNING})
# Statuses that mean "the instance named does not hold it usable now": not an owner.
NOT_HELD = frozenset({Status.DISCONNECTED, Status.GONE})


@dataclass(frozen=True, slots=True)
class Entry:
    """Session -> instance, as observed at `observed_at` (Unix seconds) by `source`.

    `instance` None is a tombstone: the session was forgotten at `observed_at`, and an
    older observation (a late webhook retry) must not bring it back.
    """

    instance: str | None
    observed_at: float
    source: Source
    status: str | None = None  # a Status value; None: not known (placement, admin)

    @property
    def connected(self) -> bool:
        return self.instance is not None and self.status == Status.CONNECTED

    @property
    def held(self) -> bool:
        """The named instance holds the session (in some stage), as far as known."""
        return self.instance is not None and self.status not in NOT_HELD


def newer(candidate: Entry, existing: Entry | None) -> bool:
    """Whether `candidate` is not older than `existing`. Equal times: the later arrival
    wins, as in Node, where the last `session_ready` of several restoring instances wins."""
    return existing is None or candidate.observed_at >= existing.observed_at


def may_replace(candidate: Entry, existing: Entry | None) -> bool:
    """The ownership rule every store applies atomically (the Redis Lua script mirrors it).

    Time first: an older observation never replaces a newer one (late webhook retries).
    Then status: a `connected` owner is displaced only by a newer `connected` observation
    elsewhere, by news about its own instance (which may say it lost the session), or by a
    tombstone. A login-stage claim from another instance is refused: the real pool
    restores every active account on start, sessions live elsewhere included
    (node-pool-api.md, "Around restarts"), so such a claim is a candidate, not the owner.
    """
    if not newer(candidate, existing):
        return False
    if existing is None or existing.instance is None or candidate.instance is None:
        return True
    if candidate.instance == existing.instance:
        return True
    return existing.status != Status.CONNECTED or candidate.status == Status.CONNECTED


Listener = Callable[[str, "Entry | None"], None]
# (instance, draining); (None, False): anything may have changed, read `drained()` again.
DrainListener = Callable[["str | None", bool], None]


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

    async def put(self, session: str, entry: Entry, *, only_if: str | None = None) -> bool:
        """Store `entry` if `may_replace` allows it (and, with `only_if`, only while the
        stored entry names that instance); True when it was stored. Atomic: two routers
        racing cannot let the older one win."""
        ...

    async def put_many(self, items: list[tuple[str, Entry]]) -> list[bool]:
        """`put` of each, in order, in one round trip where the store has round trips."""
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

    async def set_draining(self, instance: str, draining: bool) -> None:
        """Drain (or undrain) `instance` for every router sharing the store; each hears it
        through `on_draining`, this one included."""
        ...

    async def drained(self) -> set[str]:
        """The instances drained now."""
        ...

    def on_draining(self, callback: DrainListener) -> None: ...

    async def close(self) -> None: ...
