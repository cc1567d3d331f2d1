"""Resolve: who should get a request now, or whether its session is expected back.

The I/O half of the policy in `retry.py`: the directory (cache, then store), placement of
a new session, a rediscovery, and what is known about the believed owner (its state, its
answers, a recent restart, a candidate logging the session in). `proxy.py` asks `first`
for every request, `look` after an attempt that `retry.look_again` says needs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from . import retry
from .answers import no_healthy_instance
from .directory import Directory
from .discovery import Discovery, Found
from .parking import Parking
from .pool import Instance, Pool, State
from .retry import NOT_PROCESSED, Known, Outcome
from .singleflight import SingleFlight
from .stores.base import Source, Status

log = structlog.get_logger("wa_router.resolve")


@dataclass(slots=True)
class Ask:
    """One request's question: its session, whether it creates it, the key its probes
    carry (worked out only if a probe is sent), and the owner the directory named last."""

    session: str
    creates: bool
    key: Callable[[], str | None]
    believed: str | None = None


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
        self._placements: SingleFlight[str, Instance] = SingleFlight()
        self.placements = 0
        parking.recheck = self.recheck

    async def first(self, ask: Ask) -> Instance | None:
        """The believed owner when it can take the request now; None: look first. (Every
        request comes here: one cache lookup when its session has not moved.)"""
        entry = await self.directory.lookup(ask.session)
        if entry is not None:
            ask.believed = entry.instance
        if entry is None or not entry.held or self.parking.waiting(ask.session):
            return None  # unknown, not usable there, or others wait already: queue behind
        assert entry.instance is not None
        inst = self.pool.get(entry.instance)
        return inst if inst is not None and self.pool.routable(inst) else None

    async def look(
        self, ask: Ask, outcome: Outcome | None, failed: Instance | None
    ) -> tuple[Known, Found | None]:
        """Where to send now, or whether the session is expected back, after `outcome` at
        `failed` (None, None: before the first send)."""
        session = ask.session
        if failed is None and self.parking.waiting(session) and not ask.creates:
            return Known(expected_back=True), None  # its session is awaited: queue behind
        if failed is not None:
            if outcome in (Outcome.NOT_HERE, Outcome.NOT_USABLE):
                gone = Status.GONE if outcome is Outcome.NOT_HERE else Status.DISCONNECTED
                await self.directory.demote(session, failed.name, gone)
            self.directory.invalidate(session)
        # After "not connected" only a connected owner helps; elsewhere any holder (a status
        # read of a session logging in must reach the instance logging it in).
        need_connected = outcome is Outcome.NOT_USABLE
        excluded = failed.name if failed is not None and outcome in NOT_PROCESSED else None
        entry = await self.directory.lookup(session)
        if entry is not None:
            ask.believed = entry.instance
            if entry.held and (entry.connected or not need_connected):
                inst = self._usable(entry.instance)
                if inst is not None and inst is not failed:
                    return Known(owner=inst.name), None
        if ask.creates:
            placed = await self._placements.run(session, lambda: self._place(ask))
            return Known(owner=placed.name), None
        found = await self.discovery.find(session, api_key=ask.key(), previous=ask.believed)
        if found.owner is not None and (
            found.connected or (not need_connected and found.owner.name != excluded)
        ):
            return Known(owner=found.owner.name), found
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
        return Known(expected_back=self._expected_back(session, believed, found)), found

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

    async def _place(self, ask: Ask) -> Instance:
        session, previous = ask.session, ask.believed
        # A create for a session that lives somewhere must go there: Node would otherwise
        # hold it twice (two Chromiums fighting over one WhatsApp login).
        found = await self.discovery.find(session, api_key=ask.key(), previous=previous)
        if found.owner is not None:
            return found.owner
        inst = self.pool.for_placement(await self.directory.counts())
        if inst is None:
            raise no_healthy_instance(session)
        await self.directory.observe(session, inst.name, Source.PLACEMENT)
        self.discovery.forget_negative(session)
        self.placements += 1
        log.info("session_placed", session=session, instance=inst.name, previous=previous)
        return inst

    async def recheck(self, session: str, api_key: str | None) -> str | None:
        """For a parked session's watcher: a routable instance where it is connected now."""
        found = await self.discovery.find(session, api_key=api_key, previous=None, fresh=True)
        return found.owner.name if found.connected and found.owner is not None else None

    async def undo_placement(self, session: str, target: Instance) -> None:
        """A create the instance refused: the placement did not happen."""
        entry = await self.directory.lookup(session)
        if entry is not None and entry.source is Source.PLACEMENT and entry.instance == target.name:
            await self.directory.forget(session, Source.PLACEMENT)
