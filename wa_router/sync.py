"""Full reconciliation: list the sessions of every instance, compare with the directory.

This replaces Blazz's 5-minute `whatsapp:sync-instance-urls` cron job, which never worked
(it sent the api key as a header and got 401 for every session). Moved sessions are fixed,
unknown ones learned, and two things only a person can settle are reported: sessions that
are lost (in the directory, live on no instance: a QR rescan is needed) and duplicated ones
(live on two instances: the `connected` / most recently connected one is kept).

Sync writes with the time its listing started, so a webhook that arrives meanwhile (a
newer fact) is never overwritten; and it follows the directory's ownership rule, so an
instance that is only restoring a session (`authenticated`) never takes it from its
connected owner (such sessions are reported as `restoring`). Run for one instance that came
back (`only=`), it also marks that instance's sessions missing from its listing as gone
there: after a restart they are re-checked, not trusted.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from .directory import Directory
from .errors import NotReached, UpstreamError, says_down
from .forward import Forwarder, fetch
from .pool import Instance, Pool
from .profiles import Profile
from .rules import SessionIdPolicy
from .stores.base import Entry, Source, Status, may_replace

log = structlog.get_logger("wa_router.sync")
# Give the event loop a turn this often while walking 100 k sessions: requests keep flowing.
_YIELD_EVERY = 512
_BATCH = 256  # sessions looked up (one MGET on Redis) and written together


@dataclass(slots=True)
class SyncReport:
    dry_run: bool
    started_at: float
    duration_s: float = 0.0
    instances: dict[str, str] = field(default_factory=dict)  # name -> "ok" | error
    fixed: list[tuple[str, str, str]] = field(default_factory=list)  # session, old, new
    learned: list[tuple[str, str]] = field(default_factory=list)  # session, instance
    verified: int = 0
    lost: list[tuple[str, str]] = field(default_factory=list)  # session, believed instance
    duplicated: list[tuple[str, str, list[str]]] = field(default_factory=list)
    # Logging in on an instance while connected on another: left with the connected owner.
    restoring: list[tuple[str, str]] = field(default_factory=list)  # session, instance
    gone: list[tuple[str, str]] = field(default_factory=list)  # session, restarted instance
    unverified: int = 0  # believed on an instance whose list could not be read
    # Listed ids no request may name (`a/b`, 300 characters): not learned, as a webhook's.
    refused_ids: int = 0

    @property
    def ok(self) -> bool:
        return not self.lost and not self.duplicated

    @property
    def updated(self) -> int:
        return len(self.fixed) + len(self.learned)

    def lines(self) -> list[str]:
        """The original command's output form (cron greps it)."""
        out = [f"Fixed: {s} ({old} -> {new})" for s, old, new in self.fixed]
        out += [f"Learned: {s} ({inst})" for s, inst in self.learned]
        out += [
            f"Lost: {s} (was {inst}; on no instance: rescan the QR code)" for s, inst in self.lost
        ]
        out += [
            f"Duplicated: {s} (kept {kept}; also on {', '.join(others)})"
            for s, kept, others in self.duplicated
        ]
        out += [
            f"Restoring: {s} (on {inst}; kept where it is connected)" for s, inst in self.restoring
        ]
        out += [f"Gone: {s} (not on {inst} after its restart)" for s, inst in self.gone]
        out += [
            f"Error: {name}: {state}" for name, state in self.instances.items() if state != "ok"
        ]
        if self.refused_ids:
            out.append(f"Refused: {self.refused_ids} listed session ids no request may name")
        out.append(
            f"Summary: {self.updated} updated, {self.verified} verified, {len(self.lost)} lost, "
            f"{len(self.duplicated)} duplicated" + (" (dry run)" if self.dry_run else "")
        )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 3),
            "instances": self.instances,
            "fixed": [{"session": s, "old": o, "new": n} for s, o, n in self.fixed],
            "learned": [{"session": s, "instance": i} for s, i in self.learned],
            "verified": self.verified,
            "lost": [{"session": s, "instance": i} for s, i in self.lost],
            "duplicated": [{"session": s, "kept": k, "others": o} for s, k, o in self.duplicated],
            "restoring": [{"session": s, "instance": i} for s, i in self.restoring],
            "gone": [{"session": s, "instance": i} for s, i in self.gone],
            "unverified": self.unverified,
            "refused_ids": self.refused_ids,
            "summary": self.lines()[-1],
            "ok": self.ok,
        }


class Syncer:
    def __init__(
        self,
        *,
        pool: Pool,
        profile: Profile,
        forwarder: Forwarder,
        directory: Directory,
        api_key: str | None,
        timeout_s: float,
        ids: SessionIdPolicy | None = None,
    ) -> None:
        self._pool = pool
        self._ids = ids
        self._profile = profile
        self._forwarder = forwarder
        self._directory = directory
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._lock = asyncio.Lock()  # one sync at a time; a second caller waits its turn
        self.runs = 0
        self.last: SyncReport | None = None

    async def run(self, *, dry_run: bool = False, only: Instance | None = None) -> SyncReport:
        async with self._lock:
            report = await self._run(dry_run, only)
        self.runs += 1
        if not dry_run and only is None:
            self.last = report
        log.info(
            "sync_done",
            dry_run=dry_run,
            only=only.name if only else None,
            fixed=len(report.fixed),
            learned=len(report.learned),
            verified=report.verified,
            lost=len(report.lost),
            duplicated=len(report.duplicated),
            refused_ids=report.refused_ids,
            duration_s=round(report.duration_s, 3),
        )
        return report

    async def _run(self, dry_run: bool, only: Instance | None) -> SyncReport:
        report = SyncReport(dry_run=dry_run, started_at=time.time())
        started = time.monotonic()
        targets = (
            [only]
            if only is not None
            else [i for i in self._pool.instances if self._pool.routable(i)]
        )
        for inst in self._pool.instances:
            if inst not in targets and only is None:
                report.instances[inst.name] = f"skipped: {inst.state.value}"
        listings = await asyncio.gather(*(self._list(i) for i in targets))
        # session -> [(instance, status, connected_at)] of the instances where it is live.
        live: dict[str, list[tuple[str, str, str]]] = {}
        present: set[tuple[str, str]] = set()  # (session, instance), any status
        refused: set[str] = set()  # listed ids the policy refuses (not learned)
        rank = self._profile.rank
        for inst, listing in zip(targets, listings, strict=True):
            if isinstance(listing, str):
                report.instances[inst.name] = listing
                continue
            report.instances[inst.name] = "ok"
            inst.reported_sessions = len(listing)
            for n, (session, status, connected_at) in enumerate(listing):
                present.add((session, inst.name))  # where it is: not lost, not gone
                if self._ids is not None and not self._ids.accepts(session):
                    report.refused_ids += 1  # the id itself is not logged: it may hold anything
                    refused.add(session)  # listed somewhere: never "lost", wherever it was
                    continue
                if rank(status) is not None:
                    # Interned: 100 k entries share a handful of status strings.
                    owner = (inst.name, sys.intern(status.lower()), connected_at)
                    live.setdefault(session, []).append(owner)
                if n % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a big sync must not stall the requests
        answered = {n for n, state in report.instances.items() if state == "ok"}
        pending = list(live.items())
        for start in range(0, len(pending), _BATCH):
            batch = pending[start : start + _BATCH]
            await asyncio.sleep(0)  # a big sync must not stall the requests
            entries = await self._directory.store.get_many([session for session, _ in batch])
            writes: list[tuple[str, Entry]] = []
            for (session, owners), entry in zip(batch, entries, strict=True):
                kept = owners[0] if len(owners) == 1 else self._keep(owners)
                if len(owners) > 1:
                    others = sorted(o[0] for o in owners if o is not kept)
                    report.duplicated.append((session, kept[0], others))
                seen_status = self._profile.status_of(kept[1])
                seen = Entry(kept[0], report.started_at, Source.SYNC, seen_status)
                if entry is not None and entry.instance == kept[0] and entry.status == seen_status:
                    report.verified += 1
                    self._directory.warm(session, entry)  # the first request needs no read
                    continue
                if not may_replace(seen, entry):
                    if entry is not None and entry.instance == kept[0]:
                        report.verified += 1  # a newer fact about the same instance
                    elif seen_status is not Status.CONNECTED and entry is not None:
                        report.restoring.append((session, kept[0]))
                    continue
                if entry is None or entry.instance is None:
                    report.learned.append((session, kept[0]))
                elif entry.instance != kept[0]:
                    report.fixed.append((session, entry.instance, kept[0]))
                else:
                    report.verified += 1  # same owner, its status brought up to date
                if not dry_run:
                    writes.append((session, seen))
            # One store call per batch (one script call on Redis), not one per session.
            if writes:
                await self._directory.observe_many(writes)
        if only is not None and report.instances.get(only.name) == "ok":
            await self._gone_after_restart(only, present, report, dry_run)
        if only is None:
            everyone_answered = all(
                report.instances.get(i.name) == "ok" for i in self._pool.instances
            )
            n = 0
            async for session, entry in self._directory.store.items():
                n += 1
                if n % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                if session in live or session in refused or (session, entry.instance) in present:
                    continue
                if entry.instance in answered and everyone_answered:
                    report.lost.append((session, entry.instance or ""))
                else:
                    report.unverified += 1
        report.fixed.sort()
        report.learned.sort()
        report.restoring.sort()
        report.lost.sort()
        report.duplicated.sort()
        report.duration_s = time.monotonic() - started
        return report

    async def connected_now(self, sessions: dict[str, str | None]) -> dict[str, str]:
        """Where each of `sessions` is connected now, from one listing per routable instance
        (the parking's recheck when the router holds the Node key: a handful of requests
        however many sessions wait). Found owners are recorded, which wakes their waiters."""
        targets = [i for i in self._pool.instances if self._pool.routable(i)]
        listings = await asyncio.gather(*(self._list(i) for i in targets))
        best: dict[str, tuple[str, str]] = {}  # session -> (connected_at, instance)
        for inst, listing in zip(targets, listings, strict=True):
            if isinstance(listing, str):
                continue
            for session, status, connected_at in listing:
                # Two connected copies: the most recently connected wins, as in the pool.
                if (
                    session in sessions
                    and self._profile.status_of(status) is Status.CONNECTED
                    and (session not in best or connected_at > best[session][0])
                ):
                    best[session] = (connected_at, inst.name)
        for session, (_, name) in best.items():
            await self._directory.observe(session, name, Source.SYNC, status=Status.CONNECTED)
        return {session: name for session, (_, name) in best.items()}

    async def _gone_after_restart(
        self,
        inst: Instance,
        present: set[tuple[str, str]],
        report: SyncReport,
        dry_run: bool,
    ) -> None:
        """The directory's sessions on `inst` that its listing lacks are not there now."""
        after: str | None = None
        while True:
            page = await self._directory.store.page(after=after, limit=_BATCH, instance=inst.name)
            for session, entry in page:
                if (session, inst.name) in present or entry.status == Status.GONE:
                    continue
                report.gone.append((session, inst.name))
                if not dry_run:
                    # As of the listing: a session_ready that came meanwhile is newer.
                    await self._directory.demote(
                        session, inst.name, Status.GONE, Source.SYNC, observed_at=report.started_at
                    )
            if len(page) < _BATCH:
                return
            after = page[-1][0]

    def _keep(self, owners: list[tuple[str, str, str]]) -> tuple[str, str, str]:
        """`connected` first; among equals the most recently connected (ISO 8601 sorts)."""
        ranks = [self._profile.rank(o[1]) or 0 for o in owners]
        best = min(ranks)
        return max((o for o, r in zip(owners, ranks, strict=True) if r == best), key=lambda o: o[2])

    async def _list(self, inst: Instance) -> list[tuple[str, str, str]] | str:
        """(session, status, connected_at) of each session on `inst`, or an error text."""
        req = self._profile.get_request(self._profile.list_path, self._api_key, self._timeout_s)
        try:
            answer = await fetch(self._forwarder, inst, req, self._timeout_s)
        except NotReached as exc:
            if says_down(exc):
                self._pool.mark_suspect(inst, exc.detail)
            return f"unreachable: {exc.detail}"
        except UpstreamError as exc:
            return f"failed: {exc.detail}"
        if answer.status in (401, 403):
            hint = "" if self._api_key else " (set upstream.api_key)"
            return f"refused: HTTP {answer.status}{hint}"
        if answer.status != 200:
            return f"failed: HTTP {answer.status}"
        try:
            doc = json.loads(answer.body)
            items = doc["sessions"]
            assert isinstance(items, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            return "failed: the session list is not {sessions: [...]}"
        out: list[tuple[str, str, str]] = []
        for item in items:
            if not isinstance(item, dict):
                continue
            sid, status = item.get("session_id"), item.get("status")
            if isinstance(sid, str) and isinstance(status, str):
                when = item.get("connected_at")
                out.append((sid, status, when if isinstance(when, str) else ""))
        return out
