"""Active health checks: each instance's health route, every interval, faster while down.

Passive failures (connects refused on live traffic) feed the same counters in `pool.py`,
so an instance that dies while idle is down within two intervals, and one that dies under
traffic is skipped after its first refused connect.

An instance that comes back is used at once: while it is not healthy it is asked every
`down_interval_s` (0.5 s), and its first answer (or its first signed webhook, through
`Pool.mark_healthy`) brings it back. An instance whose `/health` uptime went back to near
zero has restarted even if no check ever saw it down: it restores its accounts now, so the
follow-up (a sync of that instance, a recheck of parked sessions) runs for it too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import structlog
from multidict import CIMultiDict

from .config import HealthConfig
from .errors import UpstreamError
from .forward import Forwarder, UpstreamRequest, fetch
from .pool import Instance, Pool, State
from .profiles import Profile

log = structlog.get_logger("wa_router.health")

Recovered = Callable[[Instance], Awaitable[object]]
# An uptime this much below the last one seen is a restart, not clock noise.
_RESTART_SLACK_S = 1.0


class HealthChecker:
    def __init__(
        self,
        *,
        pool: Pool,
        profile: Profile,
        forwarder: Forwarder,
        cfg: HealthConfig,
        on_recovered: Recovered | None = None,
    ) -> None:
        self._pool = pool
        self._forwarder = forwarder
        self._cfg = cfg
        self._req = UpstreamRequest("GET", profile.health_path, CIMultiDict(), b"", cfg.timeout_s)
        self.on_recovered = on_recovered
        self._checks: dict[str, int] = {i.name: 0 for i in pool.instances}
        self._followups: set[asyncio.Task[object]] = set()
        self._changed = asyncio.Event()
        pool.on_back = self.follow_up

    @property
    def rounds(self) -> int:
        """Checks every instance has had at least (one round each)."""
        return min(self._checks.values(), default=0)

    async def run(self) -> None:
        """One watch per member, kept in step with the pool (a reload adds or removes
        members: `members_changed`)."""
        watches: dict[Instance, asyncio.Task[None]] = {}
        try:
            while True:
                members = set(self._pool.instances)
                for inst in [i for i in watches if i not in members]:
                    watches.pop(inst).cancel()
                    self._checks.pop(inst.name, None)
                for inst in self._pool.instances:
                    if inst not in watches:
                        self._checks.setdefault(inst.name, 0)
                        watches[inst] = asyncio.create_task(self._watch(inst))
                await self._changed.wait()
                self._changed.clear()
        finally:
            for task in watches.values():
                task.cancel()
            await asyncio.gather(*watches.values(), return_exceptions=True)

    def members_changed(self) -> None:
        self._changed.set()

    async def _watch(self, inst: Instance) -> None:
        # One loop per instance: a down one is asked more often without asking the
        # healthy ones more, and a slow one never delays the others' checks.
        fast_s = min(self._cfg.interval_s, self._cfg.down_interval_s)
        while True:
            await self.check(inst)
            await asyncio.sleep(self._cfg.interval_s if inst.state is State.HEALTHY else fast_s)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in self._pool.instances))

    async def check(self, inst: Instance) -> bool:
        started = time.monotonic()
        try:
            answer = await fetch(self._forwarder, inst, self._req, self._cfg.timeout_s)
            ok, body = answer.status == 200, answer.body
            detail = f"health answered HTTP {answer.status}"
        except UpstreamError as exc:
            ok, body, detail = False, b"", exc.detail
        inst.last_check_at = time.time()
        self._checks[inst.name] = self._checks.get(inst.name, 0) + 1
        if not ok:
            inst.latency_s = None
            self._pool.mark_suspect(inst, detail)
            return False
        inst.latency_s = time.monotonic() - started
        doc = _json(body)
        inst.reported_sessions = _session_total(doc)
        uptime = _uptime(doc)
        restarted = (
            uptime is not None
            and inst.uptime_s is not None
            and uptime + _RESTART_SLACK_S < inst.uptime_s
        )
        inst.uptime_s = uptime
        if uptime is not None:
            self._pool.note_uptime(inst, uptime)
        if not self._pool.record_success(inst) and restarted:
            # Never seen down (it restarted between two checks), yet it is restoring.
            log.info("instance_restarted", instance=inst.name, uptime_s=uptime)
            self._pool.mark_back(inst, "uptime reset")
            self.follow_up(inst)
        return True

    def follow_up(self, inst: Instance) -> None:
        """`inst` is back (or restarted): sync it at once, its sessions changed meanwhile."""
        log.info("instance_recovered", instance=inst.name)
        if self.on_recovered is not None:
            task = asyncio.ensure_future(self.on_recovered(inst))
            self._followups.add(task)
            task.add_done_callback(self._followups.discard)

    async def stop(self) -> None:
        for task in list(self._followups):
            task.cancel()
        await asyncio.gather(*self._followups, return_exceptions=True)


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _session_total(doc: object) -> int | None:
    sessions = doc.get("sessions") if isinstance(doc, dict) else None
    total = sessions.get("total") if isinstance(sessions, dict) else None
    return total if isinstance(total, int) else None


def _uptime(doc: object) -> float | None:
    uptime = doc.get("uptime") if isinstance(doc, dict) else None
    return float(uptime) if isinstance(uptime, int | float) else None
