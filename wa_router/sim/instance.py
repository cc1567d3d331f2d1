"""One simulated Blazz Node instance on a real loopback socket, steered by tests.

Life cycle: `start()` binds (port 0 picks one, then it is kept); `stop()` behaves like a
crash, not a graceful shutdown: the listening socket closes and every open connection is
aborted, so a caller waiting on an answer sees a disconnect, never a late 200, and new
connects are refused. Sessions live in memory only: a start after a stop begins empty, as
a restarted process does (`restart(keep_sessions=True)` keeps them), then restores from
Laravel.

Around restarts (reference/node-pool-api.md, "Around restarts"):
- connect timeline: `qr_scanning` -> `connect_delay_s` -> `authenticated`
  (session_authenticated) -> `ready_delay_s` -> `connected` (session_ready); in between,
  sends answer 400 "Session not connected".
- with `laravel_url`, every start restores Laravel's active accounts (`restore.py`);
- with a shared `folder`, restored sessions log in without a QR and the last copy to
  connect takes the session over (`folder.py`);
- `pause()` / `resume()` model a SIGSTOPped process; `hang = True` one wedged for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .api import AIOHTTP_LINE_LIMIT, BlazzApi
from .folder import SessionFolder
from .lifecycle import Lifecycle, qr_event, status_event
from .models import (
    AUTHENTICATED,
    CONNECTED,
    QR_SCANNING,
    Received,
    SimSession,
    fake_phone,
    now_iso,
)
from .restore import Outcome, Restorer
from .webhook import WebhookAttempt, WebhookSender

WEBHOOK_PATH = "/api/whatsapp/webhooks/webjs"  # under Node's LARAVEL_URL


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
        ready_delay_s: float = 2.5,
        laravel_url: str | None = None,
        folder: SessionFolder | None = None,
        restore_on_start: bool = True,
        restore_retry_scale: float = 1.0,
        restore_step_s: float = 0.05,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.api_key = api_key
        self.laravel_url = laravel_url
        # Node posts its webhooks under LARAVEL_URL; an explicit webhook_url wins (tests).
        if webhook_url is None and laravel_url:
            webhook_url = laravel_url.rstrip("/") + WEBHOOK_PATH
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.connect_delay_s = connect_delay_s
        # authenticated -> connected: the real service waits before reading the phone number.
        self.ready_delay_s = ready_delay_s
        self.folder = folder
        self.restore_on_start = restore_on_start
        self.restore_retry_scale = restore_retry_scale
        self.restore_step_s = restore_step_s
        self.restore_timeout_s = 15.0  # AccountRestoration.js's axios timeout
        self.restored: list[str] = []  # session ids restored by the latest start
        self.restore_fetches = 0  # accounts/active requests made, over all starts
        self.restore_outcome: Outcome | None = None
        self.restore_done = asyncio.Event()  # set once the latest start's restore is over
        self.webhook_retry_scale = webhook_retry_scale
        self.webhook_timeout_s = 5.0  # Node's axios timeout per attempt
        self.clock: Callable[[], float] = time.time  # X-Timestamp source; tests may step it
        self.running = False
        self.sessions: dict[str, SimSession] = {}
        self.received: list[Received] = []
        self.webhooks: list[WebhookAttempt] = []
        self.delay_s = 0.0
        self.route_delay_s: dict[str, float] = {}
        self.hang = False  # wedged for good: requests are read, never answered
        # AutoReconnect's "reconnect that is not" (node-pool-api.md): after a CONFLICT drop
        # it sends session_reconnected, and the session stays disconnected.
        self.false_reconnects = True
        self.unhealthy = False
        self.started_monotonic = time.monotonic()
        self._api = BlazzApi(self)
        self._sender = WebhookSender(self)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.lifecycle = Lifecycle(self)  # connect timers and CONFLICT drops
        self._restorer = Restorer(self)
        self._resumed = asyncio.Event()  # clear while paused
        self._resumed.set()
        self._phones: dict[str, str] = {}  # phone numbers Laravel gave restored sessions
        self._has_run = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SimInstance {self.name} {self.url} {state} sessions={len(self.sessions)}>"

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Bind (or re-bind the same port) and begin restoring. A start after a stop begins
        with no sessions in memory: the process that held them is gone."""
        await self._start(forget=self._has_run)

    async def _start(self, *, forget: bool) -> None:
        if self._runner is not None:
            return
        # handler_cancellation: a handler whose client vanished is cancelled (a hung request
        # does not outlive its connection); shutdown_timeout=0: stop() never waits politely.
        runner = web.AppRunner(
            self._api.app(),
            handler_cancellation=True,
            shutdown_timeout=0,
            access_log=None,
            max_line_size=AIOHTTP_LINE_LIMIT,
            max_field_size=AIOHTTP_LINE_LIMIT,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        if forget:
            self.sessions.clear()
            self._phones.clear()
        self._runner, self._site = runner, site
        self.port = int(runner.addresses[0][1])
        self.started_monotonic = time.monotonic()  # /health uptime counts from here
        self._resumed.set()  # a new process is not stopped
        self.running = True
        self._has_run = True
        self._restorer.begin()

    async def stop(self) -> None:
        """Crash: close the listener, abort every connection, drop timers, the restore and
        the webhooks."""
        self.running = False
        self.lifecycle.cancel_all()
        self._resumed.set()  # let paused work reach its cancellation
        await self._restorer.cancel()
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
        await self._start(forget=False)
        for session in self.sessions.values():
            if session.status in (QR_SCANNING, AUTHENTICATED):
                self._schedule_connect(session.session_id)

    def pause(self) -> None:
        """SIGSTOP: the listener stays open and connections are accepted (the kernel does
        that for a stopped process), but nothing is answered, health included, and no timer
        or webhook moves until `resume()`. Requests are still recorded on arrival."""
        self._resumed.clear()

    def resume(self) -> None:
        """SIGCONT: everything that waited carries on, requests are answered late."""
        self._resumed.set()

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    async def wait_resumed(self) -> None:
        """Return at once unless paused (the handlers, timers and the webhook sender call it)."""
        if not self._resumed.is_set():
            await self._resumed.wait()

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
        session_disconnected (reason "DISCONNECTED", not a logout) or session_error.
        With a shared folder, a connected one claims the session (see `folder.py`)."""
        self.lifecycle.cancel_connect(session_id)
        session = SimSession(session_id, workspace_id=workspace_id, status=status)
        session.phone_number = phone_number
        if status == CONNECTED:
            session.phone_number = phone_number or self.phone_for(session_id)
            session.connected_at = session.last_activity = now_iso()
        self.sessions[session_id] = session
        if notify:
            event, data = status_event(session)
            self.notify(event, data)
        if status == CONNECTED:
            self.lifecycle.claim(session_id)
        return session

    def remove_session(self, session_id: str) -> None:
        """Forget a session silently (no webhook), e.g. lost in a crash of its Chromium."""
        self.lifecycle.cancel_connect(session_id)
        self.sessions.pop(session_id, None)

    def delete_session(self, session_id: str) -> SimSession | None:
        """`DELETE /api/sessions/{id}`: a held session logs out (session_disconnected,
        reason LOGOUT); either way the session's folder goes, so a DELETE sent to an
        instance that does not hold the session destroys the owner's saved login."""
        session = self.sessions.get(session_id)
        if session is not None:
            self.remove_session(session_id)
            self.notify(
                "session_disconnected",
                {
                    "session_id": session_id,
                    "workspace_id": session.workspace_id,
                    "reason": "LOGOUT",
                },
            )
        if self.folder is not None:
            self.folder.remove_login(session_id, self, held=session is not None)
        return session

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
            await to.emit(*status_event(moved))

    def begin_connect(self, session: SimSession) -> None:
        """What a create does: qr_scanning now (qr_code_generated), then after
        `connect_delay_s` authenticated, after `ready_delay_s` connected, each with its
        webhook (the sim's user scans the QR at once). With a saved login in the folder
        there is no QR: LocalAuth logs in from disk."""
        session.status = QR_SCANNING
        session.connected_at = None
        if self.folder is None or not self.folder.has_login(session.session_id):
            self.notify(*qr_event(session))
        self.lifecycle.schedule_connect(session.session_id)

    def restore_session(
        self, session_id: str, workspace_id: int | str = 1, phone_number: str | None = None
    ) -> SimSession:
        """What restore-on-start does for one account: create the client again. With a
        saved login in the folder it logs in by itself (no QR); without, it waits for a
        scan that never comes (qr_scanning, qr_code_generated)."""
        session = SimSession(session_id, workspace_id=workspace_id)
        self.sessions[session_id] = session
        self.restored.append(session_id)
        if phone_number:
            self._phones[session_id] = phone_number  # the same phone, the same session_ready
        if self.folder is not None and self.folder.has_login(session_id):
            self.lifecycle.schedule_connect(session_id)
        else:
            self.notify(*qr_event(session))
        return session

    def holds_connected(self, session_id: str) -> bool:
        """Running, with a connected copy of the session (what a CONFLICT can drop)."""
        session = self.sessions.get(session_id)
        return self.running and session is not None and session.status == CONNECTED

    def phone_for(self, session_id: str) -> str:
        return self._phones.get(session_id) or fake_phone(session_id)

    def _schedule_connect(self, session_id: str) -> None:
        self.lifecycle.schedule_connect(session_id)

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
