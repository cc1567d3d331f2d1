"""Restore on start, as Blazz's `AccountRestoration.js` does it when a Node process boots.

    GET {LARAVEL_URL}/api/whatsapp/accounts/active      (X-API-Key header, 15 s timeout)
    -> {success, sessions: [{id, session_id, workspace_id, phone_number, status, ...}], count}

then, one after another, create every listed session this process does not hold itself,
including sessions that are live on another instance right now: the real service skips
only its own. That is why, after one instance restarts, several claim the same session
for a while (the folder's CONFLICT takeover settles it, see `folder.py`).

While Laravel is unreachable or answers non-200 the fetch is retried after 1 s and 2 s
(`restore_retry_scale` scales them for tests); after that the instance gives up and
restores nothing, which is what a pool started before its Laravel does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import aiohttp

from .models import AUTHENTICATED, CONNECTED

if TYPE_CHECKING:
    from .instance import SimInstance

log = logging.getLogger(__name__)

ACTIVE_PATH = "/api/whatsapp/accounts/active"
RETRY_DELAYS_S = (1.0, 2.0)  # after a failed fetch; then give up
RESTORED_STATUSES = (CONNECTED, AUTHENTICATED)  # what Laravel's active list holds

Outcome = Literal["running", "done", "gave_up", "cancelled", "off"]


@dataclass(frozen=True)
class ActiveAccount:
    session_id: str
    workspace_id: int | str
    phone_number: str | None
    status: str


def parse_active(doc: Any) -> list[ActiveAccount] | None:
    """The accounts of an `accounts/active` answer; None when it is not that shape."""
    if not isinstance(doc, dict) or not isinstance(doc.get("sessions"), list):
        return None
    accounts = []
    for item in doc["sessions"]:
        if not isinstance(item, dict) or not item.get("session_id"):
            continue
        phone = item.get("phone_number")
        accounts.append(
            ActiveAccount(
                session_id=str(item["session_id"]),
                workspace_id=item.get("workspace_id", 1),
                phone_number=str(phone) if phone else None,
                status=str(item.get("status", "")),
            )
        )
    return accounts


class Restorer:
    """One restore run per `start()`; `cancel()` (from `stop()`) ends it where it is."""

    def __init__(self, sim: SimInstance) -> None:
        self.sim = sim
        self._task: asyncio.Task[None] | None = None

    def begin(self) -> None:
        sim = self.sim
        sim.restored = []
        sim.restore_done.clear()
        if not (sim.laravel_url and sim.restore_on_start):
            sim.restore_outcome = "off"
            sim.restore_done.set()
            return
        sim.restore_outcome = "running"
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"sim-restore-{sim.name}"
        )

    async def cancel(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.sim.restore_outcome = "cancelled"
        self.sim.restore_done.set()  # nothing is restoring any more

    async def _run(self) -> None:
        sim = self.sim
        try:
            accounts = await self._fetch()
            if accounts is None:
                sim.restore_outcome = "gave_up"
                log.warning("sim_restore_gave_up instance=%s", sim.name)
                return
            wanted = [a for a in accounts if a.status in RESTORED_STATUSES]
            for n, account in enumerate(wanted):
                if n:
                    await asyncio.sleep(sim.restore_step_s)  # sequential, like the real one
                await sim.wait_resumed()
                if account.session_id in sim.sessions:
                    continue  # held here (a create came first): the one skip Node makes
                sim.restore_session(account.session_id, account.workspace_id, account.phone_number)
            sim.restore_outcome = "done"
            log.info("sim_restore_done instance=%s restored=%d", sim.name, len(sim.restored))
        finally:
            sim.restore_done.set()

    async def _fetch(self) -> list[ActiveAccount] | None:
        sim = self.sim
        assert sim.laravel_url is not None
        url = sim.laravel_url.rstrip("/") + ACTIVE_PATH
        # Node sends its API key as a header here; Laravel's route does not check it.
        headers = {"X-API-Key": sim.api_key, "Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=sim.restore_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for attempt in range(len(RETRY_DELAYS_S) + 1):
                if attempt:
                    await asyncio.sleep(RETRY_DELAYS_S[attempt - 1] * sim.restore_retry_scale)
                await sim.wait_resumed()
                sim.restore_fetches += 1
                try:
                    async with http.get(url, headers=headers) as resp:
                        doc = await resp.json(content_type=None) if resp.status == 200 else None
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    log.info("sim_restore_fetch_failed instance=%s error=%r", sim.name, exc)
                    continue
                accounts = parse_active(doc)
                if accounts is not None:
                    return accounts
                log.info("sim_restore_fetch_refused instance=%s", sim.name)
        return None
