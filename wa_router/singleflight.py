"""At most one run of a coroutine per key; every caller that asks meanwhile shares its result.

The run is a task of its own, so a caller that goes away (its request cancelled) does not
cancel the work the others wait for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Task[V]] = {}
        self.started = 0  # runs started: a herd of callers for one key counts once

    def __len__(self) -> int:
        return len(self._flights)

    async def run(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        task = self._flights.get(key)
        if task is None:
            self.started += 1
            task = asyncio.ensure_future(fn())
            self._flights[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return await asyncio.shield(task)

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # marks it retrieved even when every waiter went away
