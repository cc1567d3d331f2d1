"""Active health checks: every instance's health route, all at once, every interval.

Passive failures (connects refused on live traffic) feed the same counters in `pool.py`,
so an instance that dies while idle is down within two intervals, and one that dies under
traffic is skipped after its first refused connect.
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
from .pool import Instance, Pool
from .profiles import Profile

log = structlog.get_logger("wa_router.health")

Recovered = Callable[[Instance], Awaitable[object]]


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
        self.rounds = 0
        self._followups: set[asyncio.Task[object]] = set()

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self._cfg.interval_s)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in self._pool.instances))
        self.rounds += 1

    async def check(self, inst: Instance) -> bool:
        started = time.monotonic()
        try:
            answer = await fetch(self._forwarder, inst, self._req, self._cfg.timeout_s)
            ok, body = answer.status == 200, answer.body
            detail = f"health answered HTTP {answer.status}"
        except UpstreamError as exc:
            ok, body, detail = False, b"", exc.detail
        inst.last_check_at = time.time()
        if not ok:
            inst.latency_s = None
            self._pool.mark_suspect(inst, detail)
            return False
        inst.latency_s = time.monotonic() - started
        inst.reported_sessions = _session_total(body)
        if self._pool.record_success(inst):
            log.info("instance_recovered", instance=inst.name)
            if self.on_recovered is not None:
                # Sync the instance at once: its sessions may have changed while it was away.
                task = asyncio.ensure_future(self.on_recovered(inst))
                self._followups.add(task)
                task.add_done_callback(self._followups.discard)
        return True

    async def stop(self) -> None:
        for task in list(self._followups):
            task.cancel()
        await asyncio.gather(*self._followups, return_exceptions=True)


def _session_total(body: bytes) -> int | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    sessions = doc.get("sessions") if isinstance(doc, dict) else None
    total = sessions.get("total") if isinstance(sessions, dict) else None
    return total if isinstance(total, int) else None
