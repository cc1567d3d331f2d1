"""One simulated Blazz Node instance on a real loopback socket, steered by tests.

Life cycle: `start()` binds (port 0 picks one, then it is kept); `stop()` behaves like a
crash, not a graceful shutdown: the listening socket closes and every open connection is
aborted, so a caller waiting on an answer sees a disconnect, never a late 200, and new
connects are refused. Sessions live in memory only; `restart()` forgets them unless asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .api import BlazzApi
from .models import (
    AUTHENTICATED,
    CONNECTED,
    DISCONNECTED,
    ERROR,
    QR_SCANNING,
    Received,
    SimSession,
    fake_phone,
    fake_qr,
    now_iso,
)
from .webhook import WebhookAttempt, WebhookSender


class SimInstance:
    def __init__(
        self,
        *,
        name: str = "sim",
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = "test-key",
        webhook_url: str | None = None,
        webhook_secret: str = "test-secret",
        connect_delay_s: float = 0.05,
        webhook_retry_scale: float = 1.0,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.api_key = api_key
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.connect_delay_s = connect_delay_s
        self.webhook_retry_scale = webhook_retry_scale
        self.webhook_timeout_s = 5.0  # Node's axios timeout per attempt
        self.clock: Callable[[], float] = time.time  # X-Timestamp source; tests may step it
        self.running = False
        self.sessions: dict[str, SimSession] = {}
        self.received: list[Received] = []
        self.webhooks: list[WebhookAttempt] = []
        self.delay_s = 0.0
        self.route_delay_s: dict[str, float] = {}
        self.hang = False
        self.unhealthy = False
        self.started_monotonic = time.monotonic()
        self._api = BlazzApi(self)
        self._sender = WebhookSender(self)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._connecting: dict[str, asyncio.Task[None]] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SimInstance {self.name} {self.url} {state} sessions={len(self.sessions)}>"

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            return
        # handler_cancellation: a handler whose client vanished is cancelled (a hung request
        # does not outlive its connection); shutdown_timeout=0: stop() never waits politely.
        runner = web.AppRunner(
            self._api.app(), handler_cancellation=True, shutdown_timeout=0, access_log=None
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._site = runner, site
        self.port = int(runner.addresses[0][1])
        self.started_monotonic = time.monotonic()
        self.running = True

    async def stop(self) -> None:
        """Crash: close the listener, abort every connection, drop timers and webhooks."""
        self.running = False
        for task in self._connecting.values():
            task.cancel()
        self._connecting.clear()
        runner, site = self._runner, self._site
        self._runner = self._site = None
        if site is not None:
            await site.stop()  # the listening socket closes: later connects are refused
        # A connection accepted just before the close gets its protocol on the next loop turn:
        # let it arrive, then abort them all. (Missing one left a caller waiting for its own
        # read timeout, 60 s for a session listing, instead of seeing the crash.)
        for _ in range(2):
            await asyncio.sleep(0)
            if runner is not None and runner.server is not None:
                for conn in runner.server.connections:
                    if conn.transport is not None:
                        conn.transport.abort()  # in flight: a disconnect, not an answer
        await self._sender.close()
        if runner is not None:
            await runner.cleanup()

    async def restart(self, *, keep_sessions: bool = False) -> None:
        """Stop, then start on the same port. Kept sessions that were still connecting
        resume connecting (Node restores them from its session folder on boot)."""
        await self.stop()
        if not keep_sessions:
            self.sessions.clear()
        await self.start()
        for session in self.sessions.values():
            if session.status in (QR_SCANNING, AUTHENTICATED):
                self._schedule_connect(session.session_id)

    # -- session control ------------------------------------------------------------------

    def add_session(
        self,
        session_id: str,
        *,
        status: str = CONNECTED,
        workspace_id: int | str = 1,
        phone_number: str | None = None,
        notify: bool = False,
    ) -> SimSession:
        """Put a session here as it is now (no connect timer). `notify` emits the webhook of
        that status: session_ready, qr_code_generated, session_authenticated,
        session_disconnected (reason "DISCONNECTED", not a logout) or session_error."""
        self._cancel_connect(session_id)
        session = SimSession(session_id, workspace_id=workspace_id, status=status)
        session.phone_number = phone_number
        if status == CONNECTED:
            session.phone_number = phone_number or fake_phone(session_id)
            session.connected_at = session.last_activity = now_iso()
        self.sessions[session_id] = session
        if notify:
            event, data = _status_event(session)
            self.notify(event, data)
        return session

    def remove_session(self, session_id: str) -> None:
        """Forget a session silently (no webhook), e.g. lost in a crash of its Chromium."""
        self._cancel_connect(session_id)
        self.sessions.pop(session_id, None)

    async def move_session(self, session_id: str, to: SimInstance, *, notify: bool = False) -> None:
        """Remove here, add on `to` as connected (same workspace and phone). With `notify`,
        `to` emits session_ready and this returns once that webhook is settled."""
        session = self.sessions.get(session_id)
        if session is None:
            raise KeyError(f"{self.name} has no session {session_id!r}")
        self.remove_session(session_id)
        moved = to.add_session(
            session_id,
            status=CONNECTED,
            workspace_id=session.workspace_id,
            phone_number=session.phone_number,
        )
        moved.metadata = dict(session.metadata)
        if notify:
            await to.emit(*_status_event(moved))

    def begin_connect(self, session: SimSession) -> None:
        """What a create does: qr_scanning now (qr_code_generated), then after
        `connect_delay_s` authenticated and connected, each with its webhook."""
        session.status = QR_SCANNING
        session.connected_at = None
        self.notify(
            "qr_code_generated",
            {
                "session_id": session.session_id,
                "workspace_id": session.workspace_id,
                "qr_code": fake_qr(session.session_id),
            },
        )
        self._schedule_connect(session.session_id)

    def _schedule_connect(self, session_id: str) -> None:
        self._cancel_connect(session_id)
        task = asyncio.get_running_loop().create_task(
            self._connect_later(session_id), name=f"sim-connect-{session_id}"
        )
        self._connecting[session_id] = task

    def _cancel_connect(self, session_id: str) -> None:
        task = self._connecting.pop(session_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _connect_later(self, session_id: str) -> None:
        try:
            await asyncio.sleep(self.connect_delay_s)
            session = self.sessions.get(session_id)
            if session is None:
                return
            session.status = AUTHENTICATED
            self.notify(
                "session_authenticated",
                {"session_id": session_id, "workspace_id": session.workspace_id},
            )
            session.status = CONNECTED
            session.phone_number = session.phone_number or fake_phone(session_id)
            session.connected_at = session.last_activity = now_iso()
            self.notify(*_status_event(session))
        finally:
            if self._connecting.get(session_id) is asyncio.current_task():
                del self._connecting[session_id]

    # -- observation --------------------------------------------------------------------

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """How many received requests match (method case-insensitive, exact path, no query)."""
        wanted = method.upper() if method else None
        return sum(
            1
            for r in self.received
            if (wanted is None or r.method == wanted) and (path is None or r.path == path)
        )

    def reset_counters(self) -> None:
        self.received.clear()
        self.webhooks.clear()

    # -- webhooks -----------------------------------------------------------------------

    def notify(self, event: str, data: dict[str, Any] | None) -> None:
        """Queue a webhook without waiting (what the handlers and timers do)."""
        self._sender.submit(event, data)

    async def emit(self, event: str, data: dict[str, Any] | None) -> int | None:
        """Send one webhook after those already queued; the final HTTP status, or None when
        it was never delivered (no webhook_url, unreachable after the retries, stopped)."""
        return await self._sender.submit(event, data)

    async def wait_webhooks_idle(self, timeout_s: float = 5.0) -> None:
        """Wait until no webhook is queued or being sent; TimeoutError past the deadline."""
        await self._sender.wait_idle(timeout_s)

    async def __aenter__(self) -> SimInstance:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.stop()


def _status_event(session: SimSession) -> tuple[str, dict[str, Any]]:
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
