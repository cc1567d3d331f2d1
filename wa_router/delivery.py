"""Relaying webhooks to Laravel, now or later.

`post_within` makes one attempt, within Laravel's limiter, and says what it means
(`delivered`, `final`: Laravel refused it for good, `retry`: try again later). `Deliverer`
empties the durable backlog in the background: the oldest webhook of each session first
(per-session order), exponential backoff with jitter per session while Laravel is down, no
limit on age. A webhook whose timestamp has aged past Laravel's window is re-signed with a
fresh one, or Laravel would refuse a webhook that only waited for it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog
from multidict import CIMultiDict
from yarl import URL

from .backlog import Pending, Queue
from .errors import SentNoAnswer, UpstreamError
from .forward import Forwarder, UpstreamRequest, fetch
from .laravel_budget import Budget, LaravelBudget, retry_after
from .pool import Instance
from .signing import SIGNATURE, TIMESTAMP, sign

log = structlog.get_logger("wa_router.delivery")

_BATCH = 256
_CONCURRENCY = 16
_IDLE_WAIT_S = 30.0
# Backing-off sessions are woken by a success at most this often: one event Laravel keeps
# refusing (5xx) while it takes the others is then tried once a second, not on every one.
_WAKE_EVERY_S = 1.0
# While every session backs off from a Laravel outage, one of them is tried this often.
_PROBE_S = 2.0
# A web server's answers for a PHP behind it that is down: Laravel's limiter never ran.
_GATEWAY = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class RelayResult:
    verdict: str  # delivered | final | retry
    status: int | None
    body: bytes = b""
    content_type: str = "application/json"
    detail: str = ""
    unknown: bool = False  # sent, no answer: Laravel may still be processing it
    retry_after_s: float | None = None  # a 429's Retry-After
    pause_s: float = 0.0  # a 429's: how long nothing more goes to Laravel


def verdict_for(status: int) -> str:
    """408/425/429 and 5xx may pass later; another 4xx is Laravel's final word."""
    if status < 400:
        return "delivered"
    if status >= 500 or status in (408, 425, 429):
        return "retry"
    return "final"


def laravel_instance(url: str) -> Instance:
    """Laravel as a forwarding target (the forwarder's one seam serves it too)."""
    return Instance(name="laravel", url=URL(url), base=url.rstrip("/"))


async def post_within(
    budget: Budget,
    forwarder: Forwarder,
    laravel: Instance,
    path: str,
    body: bytes,
    headers: Sequence[tuple[str, str]],
    timeout_s: float,
) -> RelayResult | float:
    """One attempt when Laravel's limiter leaves room (`laravel_budget.py`), and what it
    means; else, and nothing sent, how long to hold off. A 429 pauses the budget
    (`pause_s` says how long)."""
    wait = await budget.take()
    if wait > 0:
        return wait
    req = UpstreamRequest("POST", path, CIMultiDict(headers), body, timeout_s)
    try:
        answer = await fetch(forwarder, laravel, req, timeout_s)
    except UpstreamError as exc:
        unknown = isinstance(exc, SentNoAnswer)
        if not unknown:
            await budget.give_back()  # not reached (a timeout did reach it)
        return RelayResult("retry", None, detail=exc.detail, unknown=unknown)
    after = retry_after(answer.headers.get("Retry-After")) if answer.status == 429 else None
    return RelayResult(
        verdict_for(answer.status),
        answer.status,
        answer.body,
        answer.headers.get("Content-Type", "application/json"),
        detail=f"HTTP {answer.status}",
        retry_after_s=after,
        pause_s=await settle(budget, answer.status, after),
    )


async def settle(budget: Budget, status: int, retry_after_s: float | None) -> float:
    """What Laravel's answer to a counted send says of its limiter: a 429 pauses it (the
    pause, in s; 0 otherwise), a gateway's 5xx never reached it (given back)."""
    if status == 429:
        pause = await budget.pause(retry_after_s)
        log.warning("laravel_throttled", pause_s=round(pause, 1), throttles=budget.throttles)
        return pause
    if status in _GATEWAY:
        await budget.give_back()
    return 0.0


def resign(
    headers: Sequence[tuple[str, str]], body: bytes, secret: str, now: int
) -> list[tuple[str, str]]:
    ts = str(now)
    sig = sign(secret, ts, body)
    out = [(k, v) for k, v in headers if k.lower() not in (TIMESTAMP.lower(), SIGNATURE.lower())]
    return [*out, (TIMESTAMP, ts), (SIGNATURE, sig)]


def backoff_s(attempts: int, base_s: float, max_s: float, rand: float) -> float:
    """Full-jitter-ish exponential backoff: between half and all of base * 2^(n-1)."""
    ceiling = min(max_s, base_s * float(2 ** max(0, attempts - 1)))
    return float(ceiling * (0.5 + rand / 2))


class Delivering(Protocol):
    """What the intake and the metrics see of a backlog's delivery."""

    @property
    def relay(self) -> Relay:
        """Its attempts, and their counts (what the metrics read)."""
        ...

    def wake(self) -> None: ...

    def hold(self, session: str) -> None: ...

    async def run(self) -> None: ...

    def close(self) -> None:
        """Ask `run()` to end by itself (it may still be cancelled after)."""
        ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt at a backlog item settled."""

    done: bool  # delivered, or refused for good: remove it from the backlog
    delay_s: float  # not done: how long its session waits before the next try
    result: RelayResult
    sent: bool = True  # False: held back by Laravel's limiter, not an attempt


class Relay:
    """One delivery attempt of a waiting webhook, with the policy around it (re-signing an
    aged one, backoff, the in-flight hold after a timeout). Both backlogs deliver with it:
    the SQLite one (`Deliverer`) and the Redis Stream one (`stream_relay.py`)."""

    def __init__(
        self,
        forwarder: Forwarder,
        laravel: Instance,
        *,
        secret: str,
        resign_after_s: float,
        timeout_s: float,
        retry_base_s: float,
        retry_max_s: float,
        inflight_s: float = 60.0,
        wall: Callable[[], float] = time.time,
        budget: Budget | None = None,
    ) -> None:
        self._forwarder = forwarder
        self.budget: Budget = budget or LaravelBudget(None)
        self._laravel = laravel
        self.secret = secret
        self._resign_after_s = resign_after_s
        self.timeout_s = timeout_s
        self._base_s = retry_base_s
        self._max_s = retry_max_s
        self.inflight_s = inflight_s
        self._wall = wall
        self.delivered = 0
        self.dropped = 0
        self.failures = 0

    async def attempt(self, item: Pending) -> Outcome:
        headers: Sequence[tuple[str, str]] = item.headers
        now = self._wall()
        if now - item.timestamp > self._resign_after_s and self.secret:
            headers = resign(headers, item.body, self.secret, int(now))
        result = await post_within(
            self.budget,
            self._forwarder,
            self._laravel,
            item.path,
            item.body,
            headers,
            self.timeout_s,
        )
        if isinstance(result, float):
            # Held back, not tried: it goes once Laravel's limiter has room again.
            held = RelayResult("retry", None, detail="laravel_limit")
            return Outcome(False, result, held, sent=False)
        if result.verdict == "retry":
            self.failures += 1
            delay = backoff_s(item.attempts + 1, self._base_s, self._max_s, random.random())
            if result.unknown:
                delay = max(delay, self.inflight_s)
            delay = max(delay, result.pause_s)
            log.info(
                "webhook_delivery_failed",
                id=item.id,
                session=item.session,
                attempts=item.attempts + 1,
                retry_in_s=round(delay, 2),
                detail=result.detail,
            )
            return Outcome(False, delay, result)
        if result.verdict == "delivered":
            self.delivered += 1
            log.info(
                "webhook_delivered",
                id=item.id,
                session=item.session,
                attempts=item.attempts + 1,
                waited_s=round(now - item.enqueued_at, 1),
            )
        else:
            self.dropped += 1
            log.error(
                "webhook_refused_by_laravel", id=item.id, session=item.session, status=result.status
            )
        return Outcome(True, 0.0, result)


class Deliverer:
    """Empties the SQLite backlog: each session's oldest item first, sessions in parallel."""

    def __init__(
        self,
        backlog: Queue,
        relay: Relay,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backlog = backlog
        self.relay = relay
        self._monotonic = monotonic
        self._wake = asyncio.Event()
        self._closing = False
        self._not_before: dict[str, float] = {}  # session -> monotonic time of next try
        # Sessions whose wait is an in-flight hold (a timeout), not a backoff: kept even
        # when Laravel answers again.
        self._inflight: set[str] = set()
        self._woken_at = float("-inf")
        self._last_attempt = float("-inf")

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """`run()` returns after the round in flight (the SQLite file keeps the rest)."""
        self._closing = True
        self._wake.set()

    def hold(self, session: str) -> None:
        """A delivery of `session`'s oldest event timed out: it may still be running at
        Laravel, so nothing of that session is sent before `inflight_s` have passed (a
        second copy racing the first would also overtake the order)."""
        self._not_before[session] = self._monotonic() + self.relay.inflight_s
        self._inflight.add(session)

    async def run(self) -> None:
        while not self._closing:
            self._wake.clear()
            heads = await self._backlog.heads(_BATCH)
            now = self._monotonic()
            due = [h for h in heads if self._not_before.get(h.session, 0.0) <= now]
            if due:
                sem = asyncio.Semaphore(_CONCURRENCY)
                await asyncio.gather(*(self._one(h, sem) for h in due))
                continue
            waits = [
                self._not_before[h.session] - now for h in heads if h.session in self._not_before
            ]
            probe = self._probe_candidate(heads, now)
            if probe is not None:
                self._not_before[probe] = now  # one session asks whether Laravel is back
                continue
            timeout = min(waits) if waits else _IDLE_WAIT_S
            if waits:
                timeout = min(timeout, max(0.0, self._last_attempt + _PROBE_S - now))
            try:
                async with asyncio.timeout(max(0.0, timeout)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _probe_candidate(self, heads: list[Pending], now: float) -> str | None:
        """While every waiting session backs off, one of them (the one due soonest) is
        tried every `_PROBE_S`: Laravel's return is noticed within that, not at the end of
        backoffs that grow to retry_max_s. In-flight holds are never probed."""
        if now - self._last_attempt < _PROBE_S:
            return None
        waiting = [
            h.session
            for h in heads
            if h.session in self._not_before and h.session not in self._inflight
        ]
        return min(waiting, key=self._not_before.__getitem__, default=None)

    async def _one(self, item: Pending, sem: asyncio.Semaphore) -> None:
        async with sem:
            self._last_attempt = self._monotonic()
            outcome = await self.relay.attempt(item)
            if not outcome.done:
                if outcome.sent:
                    await self._backlog.attempted(item.id)
                self._not_before[item.session] = self._monotonic() + outcome.delay_s
                if outcome.result.unknown:
                    self._inflight.add(item.session)
                return
            await self._backlog.ack(item.id)
            self._not_before.pop(item.session, None)
            self._inflight.discard(item.session)
            now = self._monotonic()
            if self._not_before and now - self._woken_at >= _WAKE_EVERY_S:
                self._woken_at = now
                self._laravel_answers()

    def _laravel_answers(self) -> None:
        """Laravel took one: the sessions backing off from its outage go now, rather than
        each at the end of its own backoff (up to retry_max_s after Laravel is back)."""
        for session in [s for s in self._not_before if s not in self._inflight]:
            del self._not_before[session]
        self._wake.set()
