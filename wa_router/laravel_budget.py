"""How much the router may send to Laravel now: its webhook limiter, kept clear of.

Laravel's `VerifyWhatsAppHmac` allows 1,000 webhooks a minute per client IP, and every hit,
a refused one included, re-arms the minute (node-pool-api.md, "Laravel's own limits").
Behind the router every webhook comes from the router's IP. A router that went past the
limit and kept retrying would keep re-arming it: Laravel would refuse every webhook for as
long as the router tried, and the backlog would only grow. So the router counts what it
sends: at most `per_window` sends since it was last silent for a whole `window_s`; once a
429 came, nothing at all for `window_s` (or the answer's Retry-After, if longer). What is
not sent now waits in the backlog, in order; nothing is dropped.

`LaravelBudget` is one process's count, pure but for the clock: `wait_s()` says how long
to hold off (0: send now), `sent()` counts a send (`refund()` takes back one that never
reached Laravel), `throttled()` records a 429. What sends to Laravel uses the `Budget`
face (`take`, `give_back`, `pause`): this one's, or the one kept in Redis for every
worker and router on the key prefix (`shared_budget.py`), since Laravel counts them all
as one IP's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

# A Retry-After longer than this is taken as this: a wrong one must not stop relaying for
# good (the backlog would only grow), and Laravel's own window is a minute.
MAX_PAUSE_S = 600.0


class Budget(Protocol):
    throttles: int  # 429s Laravel answered (this process saw)
    deferred: int  # times a send was held back here (a waiting webhook each time it is tried)

    async def take(self) -> float:
        """0: a send may go now, and is counted; else how long to hold off (not counted)."""
        ...

    async def give_back(self) -> None:
        """The send taken never reached Laravel's limiter (`LaravelBudget.refund`)."""
        ...

    async def pause(self, retry_after_s: float | None) -> float:
        """Laravel answered 429: nothing for a window at least; the pause, in s."""
        ...


class LaravelBudget:
    def __init__(
        self,
        per_window: int | None,
        *,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_window = per_window  # None: no count kept; a 429 still closes the window
        self.window_s = window_s
        self._clock = clock
        self._count = 0  # sends since the last silence of a whole window
        self._last = float("-inf")  # the last send
        self._closed_until = float("-inf")  # after a 429
        self.throttles = 0  # 429s Laravel answered
        self.deferred = 0  # sends held back here (read by metrics)

    def wait_s(self) -> float:
        """0 when a send may go now; else how long until one may."""
        now = self._clock()
        if now < self._closed_until:
            return self._closed_until - now
        if self.per_window is None or now - self._last >= self.window_s:
            return 0.0  # a whole window of silence: Laravel's count has gone
        if self._count < self.per_window:
            return 0.0
        return self._last + self.window_s - now

    async def take(self) -> float:
        wait = self.wait_s()
        if wait > 0:
            self.deferred += 1
            return wait
        self.sent()
        return 0.0

    async def give_back(self) -> None:
        self.refund()

    async def pause(self, retry_after_s: float | None) -> float:
        return self.throttled(retry_after_s)

    def sent(self) -> None:
        now = self._clock()
        if now - self._last >= self.window_s:
            self._count = 0
        self._count += 1
        self._last = now

    def refund(self) -> None:
        """A send that never reached Laravel's middleware: no answer at all, or a gateway's
        502/503/504 (PHP down behind its web server). A Laravel outage must not use up the
        allowance its recovery needs; if one did count, the 429 pause still catches it."""
        if self._count > 0:
            self._count -= 1

    def throttled(self, retry_after_s: float | None) -> float:
        """Laravel answered 429: silence for a whole window at least. The pause, in s."""
        now = self._clock()
        pause = pause_s(self.window_s, retry_after_s)
        self._closed_until = max(self._closed_until, now + pause)
        self.throttles += 1
        return self._closed_until - now


def retry_after(value: str | None) -> float | None:
    """A Retry-After in seconds (RFC 9110 10.2.3); an HTTP date or junk: None (the
    window's own length is then waited)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


def pause_s(window_s: float, retry_after_s: float | None) -> float:
    """A 429's pause: a whole window at least, its Retry-After if longer (up to a cap)."""
    return max(window_s, min(retry_after_s or 0.0, MAX_PAUSE_S))


__all__ = ["MAX_PAUSE_S", "Budget", "LaravelBudget", "pause_s", "retry_after"]
