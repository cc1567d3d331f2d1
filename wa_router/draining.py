"""Draining an instance for every router at once.

An operator drains an instance before a rolling restart: no new session is placed there.
With several routers (or workers) each would place on its own, so the drained set lives in
the store and every change is published; each router applies what it hears, and reads the
whole set again at start and whenever its listener lost messages. With the memory store
this is the process's own set.
"""

from __future__ import annotations

import asyncio

import structlog

from .pool import Pool
from .stores import Store

log = structlog.get_logger("wa_router.draining")


class SharedDrain:
    def __init__(self, pool: Pool, store: Store, *, deadline_s: float = 0.25) -> None:
        self._pool = pool
        self._store = store
        self._deadline_s = deadline_s
        self._reload: asyncio.Task[None] | None = None
        # Drained by the config file (`drain: true`): kept drained whatever the store says,
        # so a store that was down when they were set, or lost them, cannot undrain them.
        self.pinned: frozenset[str] = frozenset()
        store.on_draining(self._heard)

    async def load(self) -> None:
        """Apply the store's drained set (at start, and after a listener gap)."""
        try:
            async with asyncio.timeout(self._deadline_s * 4):
                drained = await self._store.drained()
        except Exception as exc:
            log.warning("drain_state_unavailable", error=type(exc).__name__)
            return
        drained |= self.pinned
        for inst in self._pool.instances:
            self._apply(inst.name, inst.name in drained)

    async def set(self, name: str, draining: bool) -> bool:
        """Drain or undrain here at once, and for every router through the store; False
        when the store could not be told (this router only, for now)."""
        if not draining:  # an operator's undrain outweighs the file's drain (last word wins)
            self.pinned = self.pinned - {name}
        self._apply(name, draining)
        try:
            async with asyncio.timeout(self._deadline_s * 4):
                await self._store.set_draining(name, draining)
        except Exception as exc:
            log.warning("drain_state_unavailable", instance=name, error=type(exc).__name__)
            return False
        return True

    def _heard(self, name: str | None, draining: bool) -> None:
        if name is not None:
            self._apply(name, draining)
        elif self._reload is None or self._reload.done():
            self._reload = asyncio.get_running_loop().create_task(self.load())

    def _apply(self, name: str, draining: bool) -> None:
        inst = self._pool.get(name)
        if inst is None or inst.draining == draining:
            return
        inst.draining = draining
        log.warning("instance_drained" if draining else "instance_undrained", instance=name)
