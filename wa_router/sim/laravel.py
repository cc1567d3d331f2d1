"""A stand-in for Blazz's Laravel side: what the Node pool (and so the router) talks to.

    POST /api/whatsapp/webhooks/webjs     VerifyWhatsAppHmac, then the account table
    GET  /api/whatsapp/accounts/active    what restore-on-start reads
    POST /api/whatsapp/sessions/{id}/mark-disconnected   404: api.php does not route it
    *    /api/whatsapp/...                200 {"success": true}, recorded

The account table follows the lifecycle webhooks as Blazz's does, including its weak spot:
a restorer's `session_authenticated` turns a connected account `authenticated`, and any
`session_disconnected` (a CONFLICT drop too) turns it `disconnected`. `session_ready`
stores the request's `X-Instance-Url` as `assigned_instance_url`, the address Laravel sends
to from then on. Knobs for tests: `answer_status` (webhooks), `accounts_status` (the
active list), `clock` and `window_s` (signature window).

    async with SimLaravel(secret="s") as laravel:
        laravel.add_account("s1")
        SimInstance(laravel_url=laravel.url, webhook_secret="s", ...)
"""

from __future__ import annotations

import contextlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..signing import sign
from .models import AUTHENTICATED, CONNECTED, DISCONNECTED, QR_SCANNING, Headers
from .webhook import HDR_INSTANCE_URL, HDR_SIGNATURE, HDR_TIMESTAMP

WEBHOOK_PATH = "/api/whatsapp/webhooks/webjs"
ACTIVE_PATH = "/api/whatsapp/accounts/active"
INVALID_SIGNATURE = {"error": "Invalid signature"}

# The status each lifecycle webhook writes into the account table.
STATUS_OF_EVENT = {
    "session_ready": CONNECTED,
    "session_authenticated": AUTHENTICATED,
    "qr_code_generated": QR_SCANNING,
    "session_disconnected": DISCONNECTED,
}
ACTIVE_STATUSES = (CONNECTED, AUTHENTICATED)  # what accounts/active lists


@dataclass
class Account:
    """One row of Blazz's `whatsapp_accounts`, the columns the pool reads or writes."""

    id: int
    session_id: str
    workspace_id: int | str = 1
    phone_number: str | None = None
    status: str = CONNECTED
    assigned_instance_url: str | None = None
    provider_type: str = "webjs"

    def active_entry(self) -> dict[str, Any]:
        """One entry of `GET /api/whatsapp/accounts/active`."""
        return {
            "id": self.id,
            "session_id": self.session_id,
            "workspace_id": self.workspace_id,
            "phone_number": self.phone_number,
            "status": self.status,
            "provider_type": self.provider_type,
        }


@dataclass(frozen=True)
class LaravelEvent:
    """One webhook Laravel accepted and processed."""

    event: str
    data: dict[str, Any]
    body: dict[str, Any]  # the whole parsed body: {"event": ..., "data": ...}
    instance_url: str | None  # the request's X-Instance-Url (unsigned: whoever relayed it)
    received_at: float  # time.time() on arrival
    raw: bytes  # the exact body, to compare repeats byte for byte
    headers: dict[str, str]  # a `Headers`: case-insensitive lookups


@dataclass(frozen=True)
class LaravelCall:
    """Any other request under /api/whatsapp/ (chats/sync, mark-disconnected, ...)."""

    method: str
    path: str
    json: Any | None
    status: int


class SimLaravel:
    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, secret: str = "test-secret"
    ) -> None:
        self.host = host
        self.port = port
        self.secret = secret
        self.window_s = 300.0  # VerifyWhatsAppHmac's signature_ttl
        self.clock: Callable[[], float] = time.time
        self.answer_status = 200  # webhooks: anything else means Laravel failed to process
        self.accounts_status = 200  # accounts/active: non-200 makes restore retry
        self.accounts: dict[str, Account] = {}
        self.events: list[LaravelEvent] = []
        self.refusals: list[str] = []  # why each refused webhook was refused
        self.failed = 0  # webhooks answered `answer_status` != 2xx, not processed
        self.accounts_calls = 0
        # VerifyWhatsAppHmac's limiter: this many webhooks per client IP, the count kept
        # until a whole minute passes with none (every hit re-arms it, refused ones too).
        # None: off (the benchmarks, which measure more than that).
        self.rate_limit: int | None = 1000
        self.rate_window_s = 60.0
        self.throttled = 0  # webhooks answered 429
        self._hits: dict[str, tuple[int, float]] = {}  # client IP -> (count, last hit)
        self.calls: list[LaravelCall] = []
        self._next_id = 1
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def refused(self) -> int:
        return len(self.refusals)

    def __repr__(self) -> str:
        return f"<SimLaravel {self.url} accounts={len(self.accounts)} events={len(self.events)}>"

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        r = app.router
        r.add_post(WEBHOOK_PATH, self._webhook)
        r.add_get(ACTIVE_PATH, self._active)
        r.add_post("/api/whatsapp/sessions/{session_id}/mark-disconnected", self._unrouted)
        r.add_route("*", "/api/whatsapp/{tail:.*}", self._other)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> SimLaravel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.stop()

    # -- the account table -----------------------------------------------------------------

    def add_account(
        self,
        session_id: str,
        status: str = CONNECTED,
        workspace_id: int | str = 1,
        phone_number: str | None = None,
    ) -> Account:
        """Seed (or overwrite) an account, as if Laravel had it before the pool started."""
        old = self.accounts.get(session_id)
        account = Account(
            id=old.id if old is not None else self._new_id(),
            session_id=session_id,
            workspace_id=workspace_id,
            phone_number=phone_number,
            status=status,
        )
        self.accounts[session_id] = account
        return account

    def active(self) -> list[Account]:
        return [a for a in self.accounts.values() if a.status in ACTIVE_STATUSES]

    def events_named(self, event: str) -> list[LaravelEvent]:
        return [e for e in self.events if e.event == event]

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _apply(self, event: str, data: dict[str, Any], instance_url: str | None) -> None:
        status = STATUS_OF_EVENT.get(event)
        session_id = data.get("session_id")
        if status is None or not isinstance(session_id, str) or not session_id:
            return
        account = self.accounts.get(session_id)
        if account is None:
            # Blazz creates the row before it asks Node for a QR; a session created on the
            # pool directly (tests, the demo) gets its row from its first webhook instead.
            account = Account(self._new_id(), session_id, data.get("workspace_id", 1))
            self.accounts[session_id] = account
        account.status = status
        if event == "session_ready":
            account.assigned_instance_url = instance_url or None
            phone = data.get("phone_number")
            if phone:
                account.phone_number = str(phone)

    # -- handlers ---------------------------------------------------------------------------

    def _verify(self, request: web.Request, raw: bytes) -> str | None:
        """VerifyWhatsAppHmac: None when the webhook holds, else why not."""
        ts = request.headers.get(HDR_TIMESTAMP, "")
        sig = request.headers.get(HDR_SIGNATURE, "")
        if not ts or not sig:
            return "missing_headers"
        try:
            stamp = int(ts)  # PHP's (int) cast; a non-number is 0, far outside the window
        except ValueError:
            stamp = 0
        if abs(self.clock() - stamp) > self.window_s:
            return "timestamp_expired"
        expected = sign(self.secret, ts, raw)
        if not hmac.compare_digest(expected, sig):  # PHP's hash_equals: constant time
            return "invalid_signature"
        return None

    def _limited(self, request: web.Request) -> bool:
        """A hit on the limiter; True when it is over (429)."""
        if self.rate_limit is None:
            return False
        now = time.monotonic()
        ip = request.remote or ""
        count, last = self._hits.get(ip, (0, float("-inf")))
        count = 1 if now - last >= self.rate_window_s else count + 1
        self._hits[ip] = (count, now)
        return count > self.rate_limit

    async def _webhook(self, request: web.Request) -> web.Response:
        raw = await request.read()  # the raw bytes: never re-serialised JSON
        if self._limited(request):
            self.throttled += 1
            return web.json_response(
                {"message": "Too Many Attempts."},
                status=429,
                headers={"Retry-After": str(int(self.rate_window_s))},
            )
        refusal = self._verify(request, raw)
        if refusal is not None:
            self.refusals.append(refusal)
            return web.json_response(INVALID_SIGNATURE, status=401)
        if not 200 <= self.answer_status < 300:
            self.failed += 1
            return web.json_response({"error": "Simulated failure"}, status=self.answer_status)
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("event"), str):
            return web.json_response({"error": "Invalid payload"}, status=400)
        found = doc.get("data")
        data: dict[str, Any] = found if isinstance(found, dict) else {}
        instance_url = request.headers.get(HDR_INSTANCE_URL)
        self.events.append(
            LaravelEvent(
                event=doc["event"],
                data=data,
                body=doc,
                instance_url=instance_url,
                received_at=time.time(),
                raw=raw,
                headers=Headers(request.headers),
            )
        )
        self._apply(doc["event"], data, instance_url)
        return web.json_response({"success": True}, status=self.answer_status)

    async def _active(self, request: web.Request) -> web.Response:
        self.accounts_calls += 1
        if self.accounts_status != 200:
            return web.json_response(
                {"success": False, "error": "Simulated failure"}, status=self.accounts_status
            )
        sessions = [a.active_entry() for a in self.active()]
        return web.json_response({"success": True, "sessions": sessions, "count": len(sessions)})

    async def _record(self, request: web.Request, status: int) -> None:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            body = None
        self.calls.append(LaravelCall(request.method, request.path, body, status))

    async def _unrouted(self, request: web.Request) -> web.Response:
        await self._record(request, 404)
        return web.json_response({"message": "Not Found"}, status=404)

    async def _other(self, request: web.Request) -> web.Response:
        # chats/sync goes through VerifyWhatsAppHmac too, and so through its limiter.
        if request.path == "/api/whatsapp/chats/sync" and self._limited(request):
            self.throttled += 1
            await self._record(request, 429)
            return web.json_response(
                {"message": "Too Many Attempts."},
                status=429,
                headers={"Retry-After": str(int(self.rate_window_s))},
            )
        await self._record(request, 200)
        return web.json_response({"success": True})
