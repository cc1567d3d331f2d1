"""What the operator's side may see of a running router, and the few things it may do.

The admin API, the status page's data and the metrics collector get these, not the whole
`Router`: a `RouterView` only reads (counters, states, the directory's entries), and
`Control` holds the admin API's actions (forget, rediscover, sync, drain). Neither can
reach the proxy, the forwarder or the config's setters, so a change in the wiring cannot
silently become a way for a status read to change routing, and these modules import no
part of the wiring (`runtime.py` builds both from the `Router`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .config import Config
from .directory import DirectoryStats
from .discovery import DiscoveryStats, Found
from .inflight import InFlight
from .parking import ParkingStats
from .pool import Instance
from .proxy import ProxyStats
from .stores.base import Entry
from .sync import SyncReport
from .webhooks import WebhookStats


class PoolView(Protocol):
    @property
    def instances(self) -> Sequence[Instance]: ...

    def get(self, name: str) -> Instance | None: ...


class EntriesView(Protocol):
    """The store's reads: the entries as every replica sees them (not the cache, and not
    counted as lookups)."""

    async def get(self, session: str) -> Entry | None: ...

    async def page(
        self, *, after: str | None, limit: int, instance: str | None = None
    ) -> list[tuple[str, Entry]]: ...


@dataclass(frozen=True, slots=True)
class DeliveryReading:
    """The webhook backlog's delivery counters, read now."""

    delivered: int
    failed: int
    refused: int
    shards_held: int | None  # Redis Stream backlog only
    spooled: int | None  # Redis Stream backlog only
    throttled: int = 0  # 429s from Laravel's webhook limiter
    held_back: int = 0  # sends held back so as not to reach it (laravel_budget.py)


@dataclass(frozen=True, slots=True)
class RouterView:
    """Read-only: each field is a counter object, a read-only collection or a reader."""

    pool: PoolView
    entries: EntriesView
    counts: Callable[[], Awaitable[dict[str, int]]]  # sessions per instance
    directory: DirectoryStats
    discovery: DiscoveryStats
    proxy: ProxyStats
    placements: Callable[[], int]  # new sessions placed on an instance
    parking: ParkingStats
    parked: Callable[[], int]  # requests waiting now
    webhooks: WebhookStats
    backlog_size: Callable[[], Awaitable[int]] | None  # None: no backlog configured
    delivery: Callable[[], DeliveryReading | None]
    last_sync: Callable[[], SyncReport | None]
    sync_runs: Callable[[], int]
    inflight: InFlight
    warm: Callable[[], bool]  # the first sync is done (or gave up)
    config: Callable[[], Config]  # the running one: a SIGHUP may replace it


class Control(Protocol):
    """The admin API's actions on the router."""

    def session_id(self, raw: str, where: str) -> str:
        """`raw` checked as a session id (RequestRejected 400 when it is not one)."""
        ...

    async def forget(self, session: str) -> tuple[str | None, bool]:
        """Drop the session's entry: (the instance it named, whether the store took it)."""
        ...

    async def rediscover(self, session: str) -> tuple[Found, str | None]:
        """A fresh scan for the session: (what it found, the instance believed before)."""
        ...

    async def sync(self, dry_run: bool) -> SyncReport: ...

    async def set_draining(self, name: str, draining: bool) -> bool:
        """Whether the store could be told (every router sharing it drains it too)."""
        ...
