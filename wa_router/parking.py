"""Requests that wait for their session: bounded, in arrival order, woken by ownership news.

A request that was not processed and whose session is expected back (its owner is down or
restarting, or it is logging in somewhere) waits here instead of failing. It leaves the
moment the directory stores a `connected` owner for its session (a `session_ready`
webhook, a discovery, a sync: `Directory.on_connected` calls `wake`), or at its deadline.

No request polls. One watcher per parked *session* (not per request) asks the pool again
now and then, for pools without webhooks, and at once when an instance comes back
(`recheck_all`): whatever it finds reaches the waiters through the same `wake`.

    instance = await parking.wait(session, timeout_s=20.0, api_key=key)  # or raises Unparked
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("wa_router.parking")

# recheck(session, api_key) -> a routable instance where the session is connected, or None.
Recheck = Callable[[str, str | None], Awaitable[str | None]]

# Why a request left the parking (the label of wa_router_parked_total).
WOKEN = "woken"  # its session is connected somewhere: it is sent there
TIMEOUT = "timeout"  # waited its whole wait
FULL = "full"  # a cap refused it
SHUTDOWN = "shutdown"  # the router is stopping


class Unparked(Exception):
    """The request will not be sent: `reason` is TIMEOUT, FULL or SHUTDOWN."""

    def __init__(self, reason: str, detail: str, waited_s: float = 0.0) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.waited_s = waited_s


@dataclass(slots=True)
class ParkingStats:
    outcomes: Counter[str] = field(default_factory=Counter)
    rechecks: int = 0


@dataclass(slots=True)
class _Lot:
    """The waiters of one session, oldest first, and its watcher."""

    waiters: deque[asyncio.Future[str]] = field(default_factory=deque)
    api_key: str | None = None
    kick: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None


class Parking:
    def __init__(
        self,
        *,
        max_per_session: int,
        max_total: int,
        recheck_first_s: float = 0.25,
        recheck_max_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_per_session = max_per_session
        self._max_total = max_total
        self._recheck_first_s = recheck_first_s
        self._recheck_max_s = recheck_max_s
        self._clock = clock
        self._lots: dict[str, _Lot] = {}
        self._total = 0
        self._closed = False
        self.recheck: Recheck | None = None  # wired by the app (discovery through the proxy)
        self.observe_wait: Callable[[str, float], None] | None = None  # metrics.py sets it
        self.stats = ParkingStats()

    @property
    def parked(self) -> int:
        """Requests waiting now."""
        return self._total

    def waiting(self, session: str) -> bool:
        """Whether requests for `session` wait already: a newer one queues behind them."""
        return session in self._lots

    async def wait(self, session: str, *, timeout_s: float, api_key: str | None) -> str:
        """Wait until `session` is connected somewhere; the instance's name. Unparked when
        a cap refuses, the deadline passes or the router shuts down."""
        if self._closed:
            raise self._leave(Unparked(SHUTDOWN, "the router is shutting down"))
        lot = self._lots.get(session)
        if self._total >= self._max_total:
            raise self._leave(Unparked(FULL, f"{self._total} requests wait already"))
        if lot is not None and len(lot.waiters) >= self._max_per_session:
            raise self._leave(
                Unparked(FULL, f"{len(lot.waiters)} requests wait for this session already")
            )
        if lot is None:
            lot = self._lots[session] = _Lot(api_key=api_key)
            lot.watcher = asyncio.ensure_future(self._watch(session, lot))
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        lot.waiters.append(fut)
        self._total += 1
        started = self._clock()
        try:
            async with asyncio.timeout(timeout_s):
                instance = await asyncio.shield(fut)
        except TimeoutError:
            raise self._leave(
                Unparked(TIMEOUT, f"not back within {timeout_s:g} s", self._clock() - started)
            ) from None
        except Unparked as exc:
            exc.waited_s = self._clock() - started
            raise self._leave(exc) from None
        finally:
            self._remove(session, lot, fut)
        self._leave(None, WOKEN, self._clock() - started)
        return instance

    def wake(self, session: str, instance: str) -> None:
        """`session` is connected on `instance`: release its waiters, oldest first."""
        lot = self._lots.get(session)
        if lot is None:
            return
        for fut in lot.waiters:
            if not fut.done():
                fut.set_result(instance)

    def kick(self, session: str) -> None:
        """Something hints that `session` changed (`session_reconnected`): ask now."""
        lot = self._lots.get(session)
        if lot is not None:
            lot.kick.set()

    def recheck_all(self) -> None:
        """An instance came back or restarted: every parked session is asked about now."""
        for lot in self._lots.values():
            lot.kick.set()

    async def close(self) -> None:
        """Shutdown: every waiter is answered (503), none is dropped; no new one parks."""
        self._closed = True
        lots = list(self._lots.values())
        for lot in lots:
            for fut in lot.waiters:
                if not fut.done():
                    fut.set_exception(Unparked(SHUTDOWN, "the router is shutting down"))
        for lot in lots:
            if lot.watcher is not None:
                lot.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lot.watcher

    # -- internals -------------------------------------------------------------------------

    def _leave(self, exc: Unparked | None, outcome: str = "", waited_s: float = 0.0) -> Unparked:
        outcome = exc.reason if exc is not None else outcome
        waited_s = exc.waited_s if exc is not None else waited_s
        self.stats.outcomes[outcome] += 1
        if self.observe_wait is not None:
            self.observe_wait(outcome, waited_s)
        return exc if exc is not None else Unparked(outcome, "")

    def _remove(self, session: str, lot: _Lot, fut: asyncio.Future[str]) -> None:
        with contextlib.suppress(ValueError):
            lot.waiters.remove(fut)
            self._total -= 1
        if not lot.waiters and self._lots.get(session) is lot:
            del self._lots[session]
            if lot.watcher is not None and lot.watcher is not asyncio.current_task():
                lot.watcher.cancel()

    async def _watch(self, session: str, lot: _Lot) -> None:
        """Ask the pool about `session` with a growing pause (or at once when kicked) while
        requests wait for it; a connected owner found wakes them."""
        delay_s = self._recheck_first_s
        while self._lots.get(session) is lot:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await lot.kick.wait()
            lot.kick.clear()
            if self.recheck is None or self._lots.get(session) is not lot:
                continue
            self.stats.rechecks += 1
            try:
                owner = await self.recheck(session, lot.api_key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the watcher must outlive a failed probe
                log.warning("parking_recheck_failed", session=session, error=type(exc).__name__)
                owner = None
            if owner is not None:
                self.wake(session, owner)
            delay_s = min(delay_s * 2, self._recheck_max_s)


def prefer_wait_s(value: str | None) -> float | None:
    """The `wait` preference of a `Prefer` header (RFC 7240 4.3: seconds, a non-negative
    integer), None when absent or malformed (then the configured wait applies)."""
    if not value:
        return None
    for pref in value.split(","):
        token, _, rest = pref.strip().partition("=")
        if token.strip().lower() != "wait":
            continue
        seconds = rest.split(";", 1)[0].strip().strip('"')
        return float(seconds) if seconds.isdigit() else None
    return None
