"""Parallel, single-flight rediscovery of the instance that owns a session.

The caller code this replaces asked the instances one after another with 5 s timeouts. Here
every routable instance is asked at once (short per-probe timeout); a `connected` answer
wins at once, a weaker owning status (`qr_scanning`) only when nobody says `connected`.
However many requests wait on one session, one scan runs (single flight), and a session
that is nowhere is remembered as such for a moment (negative cache), so a herd of requests
for a lost session cannot turn into a herd of probes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import structlog

from .directory import Directory
from .errors import NotReached, UpstreamError, says_down
from .forward import Forwarder, fetch
from .pool import Instance, Pool, State
from .profiles import Profile
from .singleflight import SingleFlight
from .stores.base import Source, Status

log = structlog.get_logger("wa_router.discovery")

OWNER = "owner"
ABSENT = "absent"  # answered: not here, or here but not in an owning status
UNAUTHORIZED = "unauthorized"
ERROR = "error"  # no usable answer: unreachable, timeout, 5xx, unexpected body

_NEGATIVE_CACHE_MAX = 10_000
# Owning statuses, best first: `connected` outranks the login stages.
_RANK = {Status.CONNECTED: 0, Status.AUTHENTICATED: 1, Status.QR_SCANNING: 2}


@dataclass(frozen=True, slots=True)
class Probe:
    instance: str
    outcome: str
    status: Status | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Found:
    owner: Instance | None
    status: Status | None
    probes: tuple[Probe, ...]
    cached: bool = False  # answered from the negative cache, nothing asked now
    skipped: tuple[str, ...] = ()  # suspect instances not asked (they may hold it)

    @property
    def asked(self) -> list[str]:
        return [p.instance for p in self.probes]

    @property
    def connected(self) -> bool:
        return self.owner is not None and self.status is Status.CONNECTED

    @property
    def logging_in(self) -> bool:
        """Some instance is logging the session in (it restores it: back in seconds)."""
        return any(p.status is Status.AUTHENTICATED for p in self.probes)

    def answered(self, instance: str) -> bool:
        return any(p.instance == instance and p.outcome != ERROR for p in self.probes)

    @property
    def unreachable(self) -> list[str]:
        return [p.instance for p in self.probes if p.outcome == ERROR] + list(self.skipped)

    @property
    def unauthorized(self) -> bool:
        return any(p.outcome == UNAUTHORIZED for p in self.probes)


@dataclass(slots=True)
class DiscoveryStats:
    scans: int = 0
    probes: int = 0
    found: int = 0
    not_found: int = 0
    negative_hits: int = 0


class Discovery:
    def __init__(
        self,
        *,
        pool: Pool,
        profile: Profile,
        forwarder: Forwarder,
        directory: Directory,
        probe_timeout_s: float,
        negative_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._profile = profile
        self._forwarder = forwarder
        self._directory = directory
        self._probe_timeout_s = probe_timeout_s
        self._negative_ttl_s = negative_ttl_s
        self._clock = clock
        self._negative: dict[str, tuple[float, Found]] = {}
        self._flights: SingleFlight[tuple[str, str | None], Found] = SingleFlight()
        self.stats = DiscoveryStats()

    async def find(
        self, session: str, *, api_key: str | None, previous: str | None, fresh: bool = False
    ) -> Found:
        """Who owns `session` now. `previous` is the instance believed before (told that it
        lost the session when it says so); `api_key` authenticates the probes (the flight is
        shared only by callers with the same key, so one caller's wrong key cannot fail
        another's request); `fresh` skips the negative cache (a parked session's watcher)."""
        neg = None if fresh else self._negative.get(session)
        if neg is not None:
            if neg[0] > self._clock():
                self.stats.negative_hits += 1
                return Found(None, None, neg[1].probes, cached=True)
            del self._negative[session]
        return await self._flights.run(
            (session, api_key), lambda: self._scan(session, api_key, previous)
        )

    def forget_negative(self, session: str) -> None:
        """A session just appeared (webhook, create): stop answering "nowhere" for it."""
        self._negative.pop(session, None)

    async def _scan(self, session: str, api_key: str | None, previous: str | None) -> Found:
        candidates = self._pool.discoverable()
        skipped = tuple(
            i.name for i in self._pool.instances if i not in candidates and i.state is State.SUSPECT
        )
        if not candidates:
            return Found(None, None, (), skipped=skipped)
        self.stats.scans += 1
        self.stats.probes += len(candidates)
        started_at = time.time()  # what the probes say is true as of their start
        tasks = [asyncio.ensure_future(self._probe(i, session, api_key)) for i in candidates]
        probes: list[Probe] = []
        best: Probe | None = None
        best_rank = len(_RANK)
        try:
            for next_done in asyncio.as_completed(tasks):
                probe = await next_done
                probes.append(probe)
                if probe.outcome != OWNER:
                    continue
                rank = _RANK.get(probe.status, len(_RANK)) if probe.status else len(_RANK)
                if rank < best_rank:
                    best, best_rank = probe, rank
                if rank == 0:
                    break  # nothing outranks `connected`: do not wait for slower instances
        finally:
            for t in tasks:
                t.cancel()
        # Instances that were not waited for are still named as asked.
        answered = {p.instance for p in probes}
        probes += [
            Probe(i.name, ERROR, detail="not waited for")
            for i in candidates
            if i.name not in answered
        ]
        for p in probes:
            if p.instance == previous and p.outcome == ABSENT:
                # The believed owner says it lost the session: evidence, so a login-stage
                # claim elsewhere may now take its place.
                await self._directory.demote(
                    session, p.instance, p.status or Status.GONE, observed_at=started_at
                )
        if best is None:
            found = Found(None, None, tuple(probes), skipped=skipped)
            self.stats.not_found += 1
            # "Nowhere" is only known when every instance that could hold it said so.
            if not skipped and all(p.outcome == ABSENT for p in probes):
                self._remember_absent(session, found)
            log.warning(
                "session_not_found",
                session=session,
                previous=previous,
                asked=found.asked,
                unreachable=found.unreachable,
            )
            return found
        owner = self._pool.get(best.instance)
        assert owner is not None
        self.stats.found += 1
        if best.status is not None:
            await self._directory.observe(session, owner.name, Source.DISCOVERY, status=best.status)
        log.info(
            "session_rediscovered",
            session=session,
            old=previous,
            new=owner.name,
            status=best.status,
        )
        return Found(owner, best.status, tuple(probes))

    async def holds(self, inst: Instance, session: str, api_key: str | None) -> bool | None:
        """Whether `inst` holds `session` in memory, whatever its status (asked now): None
        when it did not answer. A refused key counts as holding: the instance refuses the
        request that follows with the same key, before it touches anything."""
        probe = await self._probe(inst, session, api_key)
        if probe.outcome == ERROR:
            return None
        if probe.outcome == ABSENT:
            return probe.status is Status.DISCONNECTED  # answered 200 with that status
        return True

    def _remember_absent(self, session: str, found: Found) -> None:
        if len(self._negative) >= _NEGATIVE_CACHE_MAX:
            now = self._clock()
            self._negative = {k: v for k, v in self._negative.items() if v[0] > now}
            if len(self._negative) >= _NEGATIVE_CACHE_MAX:
                self._negative.clear()
        self._negative[session] = (self._clock() + self._negative_ttl_s, found)

    async def _probe(self, inst: Instance, session: str, api_key: str | None) -> Probe:
        path = self._profile.status_path_for(quote(session, safe=""))
        req = self._profile.get_request(path, api_key, self._probe_timeout_s)
        try:
            answer = await fetch(self._forwarder, inst, req, self._probe_timeout_s)
        except NotReached as exc:
            if says_down(exc):
                self._pool.mark_suspect(inst, exc.detail)
            return Probe(inst.name, ERROR, detail=exc.detail)
        except UpstreamError as exc:
            return Probe(inst.name, ERROR, detail=exc.detail)
        self._pool.mark_healthy(inst)
        return self._judge(inst.name, answer.status, answer.body)

    def _judge(self, name: str, http_status: int, body: bytes) -> Probe:
        if http_status in (401, 403):
            return Probe(name, UNAUTHORIZED, detail=f"HTTP {http_status}")
        means = self._profile.not_here(http_status, body)
        if means is not None:
            return Probe(name, ABSENT, status=means)
        if http_status != 200:
            return Probe(name, ERROR, detail=f"HTTP {http_status}")
        try:
            doc = json.loads(body)
        except ValueError:
            return Probe(name, ERROR, detail="status answer is not JSON")
        status = doc.get("status") if isinstance(doc, dict) else None
        if self._profile.rank(status) is None:
            return Probe(name, ABSENT, status=Status.DISCONNECTED)
        return Probe(name, OWNER, status=self._profile.status_of(status))
