"""One breaker per Redis deployment, shared by every part that talks to it.

The directory, the webhook replay memory and the webhook streams all call the same Redis.
When one of them sees it miss its deadline, the others skip it too for `breaker_s`: a
webhook pays at most one deadline in a hang, not one per part (Node gives up at 5 s, the
issue's bound is 1 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    def __init__(
        self,
        deadline_s: float = 0.25,
        breaker_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deadline_s = deadline_s
        self.breaker_s = breaker_s
        self._monotonic = monotonic
        self._down_until = 0.0

    @property
    def open(self) -> bool:
        """True while calls are skipped (the store failed a moment ago)."""
        return self._monotonic() < self._down_until

    def trip(self) -> None:
        self._down_until = self._monotonic() + self.breaker_s

    def closes_in(self) -> float:
        return max(self._down_until - self._monotonic(), 0.0)
