"""Requests that wait for their session: bounded, in arrival order, woken by ownership news.

A request that was not processed and whose session is expected back (its owner is down or
restarting, or it is logging in somewhere) waits here instead of failing. It leaves the
moment the directory stores a `connected` owner for its session (a `session_ready`
webhook, a discovery, a sync: `Directory.on_connected` calls `wake`), or at its deadline.

No request polls. One watcher for all parked sessions (not one per request, nor per
session) asks the pool about them now and then, for pools without webhooks, and at once
when an instance comes back (`recheck_all`): `recheck` gets every parked session at once
(the app answers it with one session listing per instance where it can), and whatever it
finds reaches the waiters through the same `wake`.

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

# recheck({session: probe key}) -> {session: a routable instance where it is connected now,
# or KEY_REFUSED when the instances refused that key}; sessions not found are left out.
Recheck = Callable[[dict[str, str | None]], Awaitable[dict[str, str]]]
KEY_REFUSED = ""
_KEYS_PER_SESSION = 4  # distinct caller keys a session's recheck may try in turn

# Why a request left the parking (the label of wa_router_parked_total).
WOKEN = "woken"  # its session is connected somewhere: it is sent there
TIMEOUT = "timeout"  # waited its whole wait
FULL = "full"  # a cap refused it
SHUTDOWN = "shutdown"  # the router is stopping
ABANDONED = "abandoned"  # its caller went away (`abandon`, or cancelled): never sent


class Unparked(Exception):
    """The request will not be sent: `reason` is TIMEOUT, FULL, SHUTDOWN or ABANDONED."""

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
    """The waiters of one session, oldest first, and the keys its recheck may use (a
    caller's wrong key must not keep the others' requests from being found)."""

    waiters: deque[asyncio.Future[str]] = field(default_factory=deque)
    keys: list[str | None] = field(default_factory=list)

    def add_key(self, key: str | None) -> None:
        if key not in self.keys and len(self.keys) < _KEYS_PER_SESSION:
            self.keys.append(key)


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
        self._tasks: dict[asyncio.Task[object], asyncio.Future[str]] = {}  # awaiting `wait`
        self._closed = False
        self._kick = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self.recheck: Recheck | None = None  # wired by the app (discovery through the proxy)
        self.observe_wait: Callable[[str, float], None] | None = None  # metrics.py sets it
        self.stats = ParkingStats()

    @property
    def parked(self) -> int:
        """Requests waiting now."""
        return self._total

    def abandon(self, task: asyncio.Task[object]) -> bool:
        """`task`'s caller went away while its request waits here, sent nowhere yet: the
        wait ends with Unparked(ABANDONED), so it is never sent later to nobody (a caller
        that retries would have it sent twice). Whether `task` was waiting."""
        fut = self._tasks.get(task)
        if fut is None or fut.done():
            return False
        fut.set_exception(Unparked(ABANDONED, "the caller went away"))
        return True

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
            lot = self._lots[session] = _Lot()
        lot.add_key(api_key)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        lot.waiters.append(fut)
        self._total += 1
        started = self._clock()
        task = asyncio.current_task()
        if task is not None:
            self._tasks[task] = fut
        try:
            async with asyncio.timeout(timeout_s):
                instance = await asyncio.shield(fut)
        except asyncio.CancelledError:
            self._leave(None, ABANDONED, self._clock() - started)  # counted, then gone
            raise
        except TimeoutError:
            raise self._leave(
                Unparked(TIMEOUT, f"not back within {timeout_s:g} s", self._clock() - started)
            ) from None
        except Unparked as exc:
            exc.waited_s = self._clock() - started
            raise self._leave(exc) from None
        finally:
            if task is not None:
                self._tasks.pop(task, None)
            self._remove(session, lot, fut)
        self._leave(None, WOKEN, self._clock() - started)
        return instance

    def wake(self, session: str, instance: str) -> None:
        """`session` is connected on `instance`: release its waiters, oldest first. The lot
        goes with them, so a request that arrives now is not queued behind a lot that
        nothing will wake again."""
        lot = self._lots.pop(session, None)
        if lot is None:
            return
        for fut in lot.waiters:
            if not fut.done():
                fut.set_result(instance)

    def kick(self, session: str) -> None:
        """Something hints that `session` changed (`session_reconnected`): ask now."""
        if session in self._lots:
            self._kick.set()

    def recheck_all(self) -> None:
        """An instance came back or restarted: the parked sessions are asked about now."""
        if self._lots:
            self._kick.set()

    async def close(self) -> None:
        """Shutdown: every waiter is answered (503), none is dropped; no new one parks."""
        self._closed = True
        for lot in self._lots.values():
            for fut in lot.waiters:
                if not fut.done():
                    fut.set_exception(Unparked(SHUTDOWN, "the router is shutting down"))
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

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

    async def _watch(self) -> None:
        """While requests wait, ask the pool about their sessions with a growing pause (or at
        once when kicked); a connected owner found wakes them. Ends when nobody waits."""
        delay_s = self._recheck_first_s
        while self._lots:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._kick.wait()
            self._kick.clear()
            lots = {s: lot for s, lot in self._lots.items() if lot.keys}
            if self.recheck is None or not lots:
                continue
            self.stats.rechecks += 1
            try:
                found = await self.recheck({s: lot.keys[0] for s, lot in lots.items()})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the watcher must outlive a failed round
                log.warning("parking_recheck_failed", error=type(exc).__name__)
                found = {}
            for session, owner in found.items():
                if owner != KEY_REFUSED:
                    self.wake(session, owner)
                elif session in lots:
                    lots[session].keys.pop(0)  # that caller's key: try the next one
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
