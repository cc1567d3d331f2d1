"""The requests being answered now, so a shutdown can wait for them (for its grace only).

Two kinds: handler tasks (aiohttp's, and the lean front's connection workers while they
answer), and express exchanges (`express.py`), which have no task of their own: they are
answered from the connections' callbacks. A shutdown waits for both; at the end of its grace
it cancels the tasks and cuts the exchanges (each answers its caller 503 `shutting_down`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol


class Quick(Protocol):
    """A request answered without a task of its own."""

    def finished(self) -> asyncio.Future[None]:
        """A future that is done when the request is (made when first asked for)."""
        ...

    def cut(self) -> None:
        """Answer the caller now that the shutdown's grace is over."""
        ...


class InFlight:
    __slots__ = ("quick", "tasks")

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[object]] = set()
        self.quick: set[Quick] = set()

    def add(self, task: asyncio.Task[object]) -> None:
        self.tasks.add(task)

    def discard(self, task: asyncio.Task[object]) -> None:
        self.tasks.discard(task)

    def __len__(self) -> int:
        return len(self.tasks) + len(self.quick)

    def __contains__(self, item: object) -> bool:
        return item in self.tasks

    def _waits(self) -> dict[asyncio.Future[Any], Quick | None]:
        # A done task has nothing left to wait for (asyncio.wait would return it at once,
        # and the drain ask again until its grace is over).
        waits: dict[asyncio.Future[Any], Quick | None] = dict.fromkeys(
            t for t in self.tasks if not t.done()
        )
        for q in self.quick:
            waits[q.finished()] = q
        return waits

    async def drain(self, grace_s: float, *, on_late: Callable[[], None]) -> int:
        """Wait up to `grace_s` for what is in flight now; then `on_late()`, and cancel
        (tasks) or cut (express exchanges) what is left. Returns how many were left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        waits = self._waits()
        late: set[asyncio.Future[Any]] = set(waits)
        # Again until nothing is left: a request handed from the express lane to a task
        # while we waited is in flight still.
        while waits and (left := deadline - loop.time()) > 0:
            _, late = await asyncio.wait(waits, timeout=left)
            if late:
                break
            waits = self._waits()
            late = set(waits)
        if not late:
            return 0
        on_late()
        for fut in late:
            quick = waits[fut]
            if quick is None:
                fut.cancel()
            else:
                quick.cut()
        await asyncio.wait(late, timeout=1.0)
        return len(late)


__all__ = ["InFlight", "Quick"]
