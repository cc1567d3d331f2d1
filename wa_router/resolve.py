"""Resolve: who should get a request now, or whether its session is expected back.

The I/O half of the policy in `retry.py`: the directory (cache, then store), placement of
a new session, a rediscovery, and what is known about the believed owner (its state, its
answers, a recent restart, a candidate logging the session in). `proxy.py` asks `first`
for every request, `look` after an attempt that `retry.look_again` says needs it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from . import retry
from .answers import no_healthy_instance
from .directory import Directory
from .discovery import ERROR, UNAUTHORIZED, Discovery, Found
from .parking import KEY_REFUSED, Parking
from .pool import Instance, Pool, State
from .retry import NOT_PROCESSED, Known, Outcome
from .singleflight import SingleFlight
from .stores.base import Entry, Source, Status

log = structlog.get_logger("wa_router.resolve")

_RECHECK_CONCURRENCY = 32  # parked sessions probed at once when no listing can be used


@dataclass(slots=True)
class Ask:
    """One request's question: its session, what its route needs, the key its probes carry
    (worked out only if a probe is sent), and what the directory said last."""

    session: str
    creates: bool
    needs_connected: bool
    key: Callable[[], str | None]
    believed: str | None = None  # the instance the directory named last
    status: str | None = None  # ...and the status it had there
    entry: Entry | None = field(default=None, repr=False)
    fresh_entry: bool = False  # `entry` was read for this step: no second read needed
    sent_at: float | None = None  # wall time of the last send: when its answer was true


class Resolver:
    def __init__(
        self,
        *,
        pool: Pool,
        directory: Directory,
        discovery: Discovery,
        parking: Parking,
        restore_window_s: float,
    ) -> None:
        self.pool = pool
        self.directory = directory
        self.discovery = discovery
        self.parking = parking
        self._restore_window_s = restore_window_s
        self._placements: SingleFlight[str, Instance | None] = SingleFlight()
        self.placements = 0
        parking.recheck = self.recheck

    def note(self, ask: Ask, entry: Entry | None) -> None:
        """What the directory said, for the steps after a first attempt."""
        ask.entry, ask.fresh_entry = entry, True
        if entry is not None:
            ask.believed, ask.status = entry.instance, entry.status

    async def first(self, ask: Ask) -> Instance | None:
        """The believed owner when it can take the request now; None: look first. (Every
        request comes here, or to `ready`: one cache lookup when its session has not moved.)"""
        entry = await self.directory.lookup(ask.session)
        self.note(ask, entry)
        return self.ready(ask.session, entry, needs_connected=ask.needs_connected)

    def ready(self, session: str, entry: Entry | None, *, needs_connected: bool) -> Instance | None:
        """The owner `entry` names when the request can go there now; None: look first."""
        if entry is None or not entry.held:
            return None  # unknown, or not usable there
        if needs_connected and (not entry.connected or self.parking.waiting(session)):
            return None  # it cannot send there now; or others wait already: queue behind
        return self._usable(entry.instance)

    async def look(
        self, ask: Ask, outcome: Outcome | None, failed: Instance | None
    ) -> tuple[Known, Found | None]:
        """Where to send now, or whether the session is expected back, after `outcome` at
        `failed` (None, None: before the first send)."""
        session = ask.session
        need_connected = ask.needs_connected or outcome is Outcome.NOT_USABLE
        if failed is None and need_connected and self.parking.waiting(session):
            return Known(expected_back=True), None  # its session is awaited: queue behind
        if failed is not None:
            if outcome in (Outcome.NOT_HERE, Outcome.NOT_USABLE):
                gone = Status.GONE if outcome is Outcome.NOT_HERE else Status.DISCONNECTED
                await self.directory.demote(session, failed.name, gone, observed_at=ask.sent_at)
            self.directory.invalidate(session)
            ask.fresh_entry = False
        excluded = failed.name if failed is not None and outcome in NOT_PROCESSED else None
        entry = ask.entry if ask.fresh_entry else await self.directory.lookup(session)
        self.note(ask, entry)
        ask.fresh_entry = False  # a later step reads the directory again
        if entry is not None and entry.held and (entry.connected or not need_connected):
            inst = self._usable(entry.instance)
            if inst is not None and inst is not failed:
                return Known(owner=inst.name), None
        if ask.creates:
            placed = await self._placements.run(session, lambda: self._place(ask))
            if placed is not None:
                return Known(owner=placed.name), None
            # Connected on an owner that is down: a second login elsewhere would fight it.
            return Known(expected_back=True), None
        found = await self.discovery.find(session, api_key=ask.key(), previous=ask.believed)
        if found.owner is not None and (
            found.connected or (not need_connected and found.owner.name != excluded)
        ):
            return Known(owner=found.owner.name), found
        if found.unauthorized:
            return Known(), found  # the caller's key was refused: say so, do not wait
        believed = self.pool.get(ask.believed) if ask.believed else None
        if (
            failed is None
            and believed is not None
            and believed.state is State.SUSPECT
            and not found.answered(believed.name)
        ):
            # Only suspect (one failed connect, say) and nobody else has the session:
            # trying it beats answering "not found" for a live session.
            return Known(owner=believed.name), found
        if self._expected_back(session, believed, found):
            return Known(expected_back=True), found
        if (
            found.owner is not None
            and found.owner.name != excluded
            and outcome is not Outcome.NOT_USABLE
        ):
            # It holds the session, not connected and not about to be (its QR not scanned
            # yet): it says so itself, and its check comes before anything is sent. Its
            # answer, not a 404 "on none of the instances asked" that reads as "gone". One
            # such answer is enough: another holder not connected either would say the
            # same (asked in turn, two of them took every attempt, and the caller a 503).
            return Known(owner=found.owner.name), found
        return Known(), found

    def _usable(self, name: str | None) -> Instance | None:
        inst = self.pool.get(name) if name is not None else None
        return inst if inst is not None and self.pool.routable(inst) else None

    def _expected_back(self, session: str, believed: Instance | None, found: Found) -> bool:
        window_s = self._restore_window_s
        cand = self.directory.candidate(session)
        fresh = cand is not None and cand.observed_at > time.time() - window_s
        return retry.expected_back(
            known=believed is not None or fresh,
            owner_state=believed.state if believed is not None else None,
            owner_answered=believed is not None and found.answered(believed.name),
            owner_restarted=believed is not None and self.pool.recently_back(believed, window_s),
            logging_in=found.logging_in
            or (fresh and cand is not None and cand.status == Status.AUTHENTICATED),
        )

    async def _place(self, ask: Ask) -> Instance | None:
        """Where a create goes: the instance holding the session, else the least loaded;
        None when the session is connected on an owner that cannot be reached now."""
        session, previous = ask.session, ask.believed
        # A create for a session that lives somewhere must go there: Node would otherwise
        # hold it twice (two Chromiums fighting over one WhatsApp login).
        found = await self.discovery.find(session, api_key=ask.key(), previous=previous)
        if found.owner is not None:
            return found.owner
        inst = self.pool.for_placement(await self.directory.counts())
        if inst is None:
            raise no_healthy_instance(session)
        if not await self.directory.observe(session, inst.name, Source.PLACEMENT):
            log.info("session_placement_refused", session=session, owner=previous)
            return None
        self.discovery.forget_negative(session)
        self.placements += 1
        log.info("session_placed", session=session, instance=inst.name, previous=previous)
        return inst

    async def recheck(self, asks: dict[str, str | None]) -> dict[str, str]:
        """For the parking's watcher: where each parked session is connected now (probes;
        the app uses one listing per instance instead when it holds the Node key)."""
        gate = asyncio.Semaphore(_RECHECK_CONCURRENCY)
        out: dict[str, str] = {}

        async def one(session: str, key: str | None) -> None:
            async with gate:
                found = await self.discovery.find(session, api_key=key, previous=None, fresh=True)
            if found.connected and found.owner is not None:
                out[session] = found.owner.name
            elif found.unauthorized and all(
                p.outcome == UNAUTHORIZED for p in found.probes if p.outcome != ERROR
            ):
                out[session] = KEY_REFUSED

        await asyncio.gather(*(one(s, k) for s, k in asks.items()))
        return out

    async def undo_placement(self, session: str, target: Instance) -> None:
        """A create the instance refused: the placement did not happen."""
        entry = await self.directory.lookup(session)
        if entry is not None and entry.source is Source.PLACEMENT and entry.instance == target.name:
            await self.directory.forget(session, Source.PLACEMENT)
