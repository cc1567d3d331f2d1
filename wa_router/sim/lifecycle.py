"""The timed part of a simulated session's life: connecting, and losing a CONFLICT.

    qr_scanning --connect_delay_s--> authenticated --ready_delay_s--> connected
                 session_authenticated               session_ready

Between `authenticated` and `connected` the real service waits (~2.5 s) before it reads the
phone number, and sends answer 400 "Session not connected" meanwhile: a window a router
must treat as "not the owner yet". Once connected, the copy claims the shared folder; the
copy that was connected before on another instance is dropped `conflict_delay_s` later
(`session_disconnected`, reason CONFLICT), which is how the real pool converges after a
restore race. Lifecycle webhook bodies carry no timestamp: two instances announcing the
same session send byte-identical bodies.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .models import (
    AUTHENTICATED,
    CONNECTED,
    DISCONNECTED,
    ERROR,
    SimSession,
    fake_qr,
    now_iso,
)

if TYPE_CHECKING:
    from .instance import SimInstance

CONFLICT = "CONFLICT"  # whatsapp-web.js's reason when another client took the login over


def status_event(session: SimSession) -> tuple[str, dict[str, Any]]:
    """The webhook that announces a session's current status."""
    base: dict[str, Any] = {"session_id": session.session_id, "workspace_id": session.workspace_id}
    if session.status == CONNECTED:
        return "session_ready", {**base, "phone_number": session.phone_number, "status": CONNECTED}
    if session.status == AUTHENTICATED:
        return "session_authenticated", base
    if session.status == DISCONNECTED:
        return "session_disconnected", {**base, "reason": "DISCONNECTED"}
    if session.status == ERROR:
        return "session_error", {**base, "error": "Simulated session error"}
    return "qr_code_generated", {**base, "qr_code": fake_qr(session.session_id)}


class Lifecycle:
    """Per instance: one connect timer per session, and the CONFLICT drops due here."""

    def __init__(self, sim: SimInstance) -> None:
        self.sim = sim
        self._connecting: dict[str, asyncio.Task[None]] = {}
        self._drops: dict[str, asyncio.Task[None]] = {}

    def connecting(self, session_id: str) -> bool:
        return session_id in self._connecting

    def cancel_all(self) -> None:
        """A crash: every timer of this process is gone."""
        for task in (*self._connecting.values(), *self._drops.values()):
            task.cancel()
        self._connecting.clear()
        self._drops.clear()

    # -- connecting -------------------------------------------------------------------------

    def schedule_connect(self, session_id: str) -> None:
        self.cancel_connect(session_id)
        task = asyncio.get_running_loop().create_task(
            self._connect_later(session_id), name=f"sim-connect-{session_id}"
        )
        self._connecting[session_id] = task

    def cancel_connect(self, session_id: str) -> None:
        task = self._connecting.pop(session_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _connect_later(self, session_id: str) -> None:
        sim = self.sim
        try:
            await asyncio.sleep(sim.connect_delay_s)
            await sim.wait_resumed()
            session = sim.sessions.get(session_id)
            if session is None:
                return
            session.status = AUTHENTICATED
            sim.notify(*status_event(session))
            if sim.ready_delay_s > 0:  # 0: both in one step, as the sim always did
                await asyncio.sleep(sim.ready_delay_s)
                await sim.wait_resumed()
                if sim.sessions.get(session_id) is not session:
                    return  # deleted or replaced while authenticated
            session.status = CONNECTED
            session.phone_number = session.phone_number or sim.phone_for(session_id)
            session.connected_at = session.last_activity = now_iso()
            sim.notify(*status_event(session))
            self.claim(session_id)
        finally:
            if self._connecting.get(session_id) is asyncio.current_task():
                del self._connecting[session_id]

    # -- the shared folder: the last connected copy wins -----------------------------------

    def claim(self, session_id: str) -> None:
        """This instance's copy just became connected: tell the previous copy to go."""
        folder = self.sim.folder
        if folder is None:
            return
        previous = folder.claim(session_id, self.sim)
        if previous is not None:
            previous.lifecycle.drop_later(session_id, folder.conflict_delay_s)

    def drop_later(self, session_id: str, delay_s: float) -> None:
        old = self._drops.pop(session_id, None)
        if old is not None:
            old.cancel()
        task = asyncio.get_running_loop().create_task(
            self._drop_later(session_id, delay_s), name=f"sim-conflict-{session_id}"
        )
        self._drops[session_id] = task

    async def _drop_later(self, session_id: str, delay_s: float) -> None:
        sim = self.sim
        try:
            await asyncio.sleep(delay_s)
            await sim.wait_resumed()
            folder = sim.folder
            session = sim.sessions.get(session_id)
            # Reconnected here meanwhile (then this copy is the last one), or already gone.
            if folder is None or session is None or session.status != CONNECTED:
                return
            if folder.connected_on(session_id) is sim:
                return
            session.status = DISCONNECTED
            sim.notify(
                "session_disconnected",
                {
                    "session_id": session_id,
                    "workspace_id": session.workspace_id,
                    "reason": CONFLICT,
                },
            )
            if sim.false_reconnects:
                # Still disconnected: a hint to check, not a connected owner.
                sim.notify(
                    "session_reconnected",
                    {"session_id": session_id, "workspace_id": session.workspace_id},
                )
        finally:
            if self._drops.get(session_id) is asyncio.current_task():
                del self._drops[session_id]


def qr_event(session: SimSession) -> tuple[str, dict[str, Any]]:
    return "qr_code_generated", {
        "session_id": session.session_id,
        "workspace_id": session.workspace_id,
        "qr_code": fake_qr(session.session_id),
    }


__all__ = ["CONFLICT", "Lifecycle", "qr_event", "status_event"]
