"""Webhooks from the instances: verify, learn ownership, relay to Laravel, lose none.

Node posts `{"event": ..., "data": {...}}` to `{LARAVEL_URL}/api/whatsapp/webhooks/webjs`,
signed `X-HMAC-Signature = hex(HMAC-SHA256(secret, X-Timestamp + raw body))`, naming itself
in `X-Instance-Url: http://localhost:PORT` (node-pool-api.md). With LARAVEL_URL pointing at
the router, ownership follows the pool within one webhook, and a Laravel restart or deploy
no longer drops events: they wait in a durable backlog (`backlog.py`, `delivery.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from .backlog import Backlog
from .breaker import Breaker
from .config import WebhookConfig
from .delivery import Delivering, RelayResult, laravel_instance, post_within, settle
from .directory import Directory
from .discovery import Discovery
from .errors import NotReached, RequestRejected, UpstreamError
from .events import (
    CHECK,
    DEMOTE,
    FORGET,
    LIFECYCLE,
    Event,
    learning,
    parse_event,
)
from .forward import Forwarder, UpstreamRequest
from .gate import REFUSE, WEBHOOK, decide_path
from .httpio import forward_headers, json_error, method_not_allowed, read_body, relay
from .laravel_budget import Budget, LaravelBudget, retry_after
from .laravel_view import DROP, HOLD, RELAY, Held, Holding, relayed_headers, verdict
from .pool import Pool, State
from .replay import Memory, SharedKV
from .retry import failure_answer
from .rules import SessionIdPolicy
from .signing import INSTANCE_URL, SIGNATURE, TIMESTAMP, sign, verify
from .stores.base import Source

log = structlog.get_logger("wa_router.webhooks")

WEBHOOK_ID = "X-Webhook-Id"

# What goes on to Laravel with the raw body: what its HMAC middleware and controller read.
RELAYED_HEADERS = ("Content-Type", TIMESTAMP, SIGNATURE, INSTANCE_URL)


@dataclass(slots=True)
class WebhookStats:
    # (event, result) -> webhooks; result: accepted (learned, no Laravel), relayed,
    # refused (Laravel said 4xx), queued, duplicate, rejected. Read by metrics.py.
    events: Counter[tuple[str, str]] = field(default_factory=Counter)
    accepted: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    relayed: int = 0
    queued: int = 0
    learned: int = 0
    unknown_instance: int = 0
    bad_session_id: int = 0  # signed, but naming an id no request may: not learned


class Webhooks:
    def __init__(
        self,
        *,
        cfg: WebhookConfig,
        pool: Pool,
        directory: Directory,
        discovery: Discovery,
        forwarder: Forwarder,
        backlog: Backlog | None,
        deliverer: Delivering | None = None,
        advertise_url: str | None = None,
        seen_shared: SharedKV | None = None,
        breaker: Breaker | None = None,
        clock: Callable[[], float] = time.time,
        ids: SessionIdPolicy | None = None,
    ) -> None:
        self.cfg = cfg
        self._ids = ids
        self._pool = pool
        self._directory = directory
        self._discovery = discovery
        self._forwarder = forwarder
        self.backlog = backlog
        self._clock = clock
        self.laravel = laravel_instance(cfg.laravel_url) if cfg.laravel_url else None
        # A replay is the same (timestamp, signature): remembered while it could verify.
        breaker = breaker or Breaker()
        self._replays = Memory(2 * cfg.window_s, clock, seen_shared, breaker=breaker)
        # Node's retry of one event: same body from the same instance, new signature.
        self._lasts = Memory(cfg.retry_dedupe_s, clock, seen_shared, breaker=breaker)
        self.stats = WebhookStats()
        self.advertise_url = advertise_url
        self.holding = Holding(cfg.hold_login_events_s)
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        # A `session_reconnected`: the app points it at the parking (ask about it now).
        self.on_hint: Callable[[str], None] = lambda session: None
        self.deliverer = deliverer
        # Laravel's webhook limiter, counted for everything this router sends there: the
        # relay's own when there is one (the backlog's deliveries count with ours).
        self.budget: Budget = (
            deliverer.relay.budget if deliverer is not None else LaravelBudget(None)
        )
        # Node's key, for the probes that check a disconnect against the pool (app.py).
        self.probe_key: str | None = None

    async def intake(self, request: web.Request) -> web.Response:
        try:
            resp, name, result = await self._intake(request)
        except RequestRejected as exc:
            reason = str(exc.extra.get("reason", exc.code))
            self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
            self.stats.events[("unknown", "rejected")] += 1
            log.warning("webhook_rejected", reason=reason, status=exc.status)
            return json_error(exc)
        self.stats.events[(name, result)] += 1
        return resp

    async def _intake(self, request: web.Request) -> tuple[web.Response, str, str]:
        if not self.cfg.secrets:
            raise RequestRejected(
                503, "not_configured", "webhook intake is off: set webhooks.secrets"
            )
        try:
            body = await read_body(request, self.cfg.max_body_bytes)
        except RequestRejected as exc:
            exc.extra["reason"] = "too_large"
            raise
        ts = verify(request.headers, body, self.cfg.secrets, self._clock(), self.cfg.window_s)
        event = parse_event(body)
        instance_url = request.headers.get(INSTANCE_URL, "")
        inst = self._pool.by_url(instance_url) if instance_url else None
        if inst is not None and inst.state is not State.HEALTHY:
            # A verified webhook is the instance talking: it is up (its first webhook
            # after a restart usually beats the next health check).
            self._pool.mark_healthy(inst, "signed webhook")
        member = inst.name if inst is not None else "?"
        session = event.session or ""
        # The event's place in its session's line is taken now, before anything else is
        # awaited: one session's events are handled one at a time in arrival order, and
        # what Laravel hears is what the directory learned, in the same order.
        async with self._in_order(session):
            # A replay: the same (timestamp, signature). Two instances sending the same
            # lifecycle event in the same second sign the same bytes (shared secret, no
            # timestamp in the body): for those only the sender, as the pool member it
            # names, tells them apart (X-Instance-Url is not signed).
            replay_key = f"{ts}:{request.headers[SIGNATURE]}".encode()
            if event.name in LIFECYCLE:
                replay_key += f":{member}".encode()
            # Node's retry: the same body again from the same member for the same session,
            # with nothing else from it for that session in between (a real repeat after a
            # reconnect or a restart has other events before it).
            last_key = f"{member}\0{session}".encode()
            digest = hashlib.sha256(body).digest()
            if (
                await self._replays.get(replay_key) is not None
                or await self._lasts.get(last_key) == digest
            ):
                self.stats.duplicates += 1
                log.info("webhook_duplicate", webhook_event=event.name, session=event.session)
                return web.json_response({"status": "duplicate"}), event.name, "duplicate"
            self.stats.accepted += 1
            headers = relayed_headers(
                [(k, request.headers[k]) for k in RELAYED_HEADERS if k in request.headers]
                # The same on every attempt, direct or from the backlog: a receiver can
                # tell a second delivery of one event from a new one (README: middleware).
                + [(WEBHOOK_ID, uuid.uuid4().hex)],
                instance_url_header=INSTANCE_URL,
                advertise_url=self.advertise_url,
                origin=inst.name if inst is not None else None,
            )
            logout = await self._learn(event, instance_url, ts)
            told = await self._tell(
                event, inst.name if inst else None, logout, request.path, body, headers, ts
            )
            if told is None:
                told = await self._relay(request.path, event, body, headers, ts)
            # Remembered only now that it is delivered, queued, held or dropped on purpose:
            # a crash or a refusal (full backlog) before this leaves Node's retry welcome.
            await self._replays.put(replay_key, b"1")
            await self._lasts.put(last_key, digest)
        return told[0], event.name, told[1]

    @contextlib.asynccontextmanager
    async def _in_order(self, session: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(session, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[session] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[session]
            if users <= 1:
                del self._locks[session]
            else:
                self._locks[session] = (lock, users - 1)

    async def _tell(
        self,
        event: Event,
        sender: str | None,
        logout: bool,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
        ts: int,
    ) -> tuple[web.Response, str] | None:
        """Keep Laravel's story consistent (laravel_view.py): an answer when the event is
        held or dropped; None when it goes on now (after what its sender had held)."""
        if self.laravel is None or event.session is None or sender is None:
            return None
        owner = await self._directory.lookup(event.session)
        what = verdict(event.name, sender, owner, logout=logout, hold=self.cfg.hold_login_events)
        if (
            what == RELAY
            and event.name == "session_disconnected"
            and not logout
            and owner is not None
            and owner.instance == sender
        ):
            # The owner lost it (CONFLICT: a restoring copy took it over). Whose ready
            # reached us last is a race; ask the pool before Laravel hears "disconnected"
            # for a session another instance has connected now.
            found = await self._discovery.find(
                event.session, api_key=self.probe_key, previous=sender, fresh=True
            )
            if found.connected and found.owner is not None and found.owner.name != sender:
                what = DROP
        self._log_expired()
        if what == HOLD:
            item = Held(event.name, path, body, tuple(headers), ts, time.monotonic())
            self.holding.hold(event.session, sender, item)
            log.info("webhook_held", session=event.session, webhook_event=event.name, sender=sender)
            return web.json_response({"status": "held"}), "held"
        if what == DROP:
            log.info(
                "webhook_superseded", session=event.session, webhook_event=event.name, sender=sender
            )
            return web.json_response({"status": "superseded"}), "superseded"
        if owner is not None and owner.connected and owner.instance != sender:
            return None  # relayed, while what it had held still waits for its own ready
        for held in self.holding.release(event.session, sender):
            # It became the owner: what it said meanwhile goes first, in order.
            await self._relay(
                held.path, parse_event(held.body), held.body, list(held.headers), held.timestamp
            )
        return None

    def _log_expired(self) -> None:
        for session, sender, held in self.holding.expire():
            self.stats.events[(held.event, "dropped")] += 1
            log.info(
                "webhook_hold_expired", session=session, webhook_event=held.event, sender=sender
            )

    async def _learn(self, event: Event, instance_url: str, ts: int) -> bool:
        """Learn ownership from `event`; True when it was a logout (it forgets)."""
        inst = self._pool.by_url(instance_url) if instance_url else None
        what = learning(event, self.cfg.forget_reasons)
        if what is None or event.session is None:
            return False
        action, status = what
        refused = self._ids is not None and not self._ids.accepts(event.session)
        if refused:
            # Signed, so from the pool; but an id no request may name (`a/b`, 300
            # characters) is not learned: relayed to Laravel, never in the directory. The
            # id itself is not logged (it may hold anything).
            self.stats.bad_session_id += 1
            log.warning("webhook_session_id_refused", webhook_event=event.name)
            # A logout still forgets one the directory has: an id learned before a reload
            # tightened the policy must not outlive its logout, nor the logout be taken
            # for a plain disconnect (laravel_view.py drops those from a non-owner). One
            # it does not have is not written, not even as a forgetting's tombstone.
            if action != FORGET or await self._directory.lookup(event.session) is None:
                return action == FORGET
        # The observation time is the webhook's own timestamp, so a late retry never beats
        # a newer fact. X-Timestamp has whole seconds: within its second, the receipt time
        # is the better estimate (a rediscovery 0.4 s into that second saw an older state).
        observed_at = min(self._clock(), ts + 0.999)
        if action == FORGET:
            if await self._directory.forget(event.session, Source.WEBHOOK, observed_at=observed_at):
                named = None if refused else event.session
                log.info("session_forgotten", session=named, webhook_event=event.name)
            return True
        if action == CHECK:
            self.on_hint(event.session)
            return False
        if inst is None:
            self.stats.unknown_instance += 1
            log.warning(
                "webhook_unknown_instance",
                instance_url=instance_url,
                webhook_event=event.name,
                session=event.session,
            )
            return False
        assert status is not None
        if action == DEMOTE:
            await self._directory.demote(
                event.session, inst.name, status, Source.WEBHOOK, observed_at=observed_at
            )
            return False
        if await self._directory.observe(
            event.session, inst.name, Source.WEBHOOK, observed_at=observed_at, status=status
        ):
            self.stats.learned += 1
            self._discovery.forget_negative(event.session)
            log.info(
                "session_learned",
                session=event.session,
                instance=inst.name,
                status=str(status),
                webhook_event=event.name,
            )
        return False

    async def _relay(
        self, path: str, event: Event, body: bytes, headers: list[tuple[str, str]], ts: int
    ) -> tuple[web.Response, str]:
        if self.laravel is None:
            return web.json_response({"status": "accepted"}), "accepted"
        session = event.session or ""
        assert self.backlog is not None
        # Per-session order: behind anything already waiting for this session (with
        # several routers, always through the shared backlog).
        result: RelayResult | float | None = None
        if self.backlog.direct and await self.backlog.pending(session) == 0:
            # A float: Laravel's limiter has no room now; it waits in the backlog.
            result = await post_within(
                self.budget,
                self._forwarder,
                self.laravel,
                path,
                body,
                headers,
                self.cfg.relay_timeout_s,
            )
        if isinstance(result, RelayResult):
            if result.verdict != "retry":
                self.stats.relayed += 1
                resp = web.Response(
                    status=result.status or 502,
                    body=result.body,
                    headers={"Content-Type": result.content_type},
                )
                return resp, "relayed" if result.verdict == "delivered" else "refused"
            log.warning(
                "webhook_relay_failed",
                session=event.session,
                webhook_event=event.name,
                detail=result.detail,
            )
            if result.unknown and self.deliverer is not None:
                self.deliverer.hold(session)
        return await self._enqueue(path, event, body, headers, ts), "queued"

    async def _enqueue(
        self, path: str, event: Event, body: bytes, headers: list[tuple[str, str]], ts: int
    ) -> web.Response:
        assert self.backlog is not None
        item = await self.backlog.append(
            session=event.session or "", path=path, body=body, headers=headers, timestamp=ts
        )
        if item is None:
            # Node retries a 429 (after 1, 2, 4 s) but never a 5xx: 429 keeps the event
            # alive at Node while our backlog is full.
            raise RequestRejected(
                429,
                "backlog_full",
                "the webhook backlog is full; retry later",
                reason="backlog_full",
            )
        self.stats.queued += 1
        if self.deliverer is not None:
            self.deliverer.wake()
        log.info("webhook_queued", session=event.session, webhook_event=event.name, id=item)
        return web.json_response({"status": "queued"}, status=202)

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        """Everything else under the prefix (gate.py): another spelling of the webhook path
        is verified as a webhook; Node's other calls to Laravel (accounts/active, chats/sync,
        mark-disconnected, mobile-activity) go on unchanged, Laravel checks them itself
        (chats/sync, which Node signs as it signs webhooks, is verified first); anything
        else is refused here."""
        decision = decide_path(request.method, request.rel_url.raw_path, self.cfg.path)
        if decision.kind == WEBHOOK:
            if request.method == "POST":
                return await self.intake(request)
            return json_error(method_not_allowed(request, ["POST"]))
        if decision.kind == REFUSE:
            self.stats.events[("passthrough", "refused")] += 1
            log.warning("laravel_call_refused", method=request.method, reason=decision.reason)
            code = "bad_request" if decision.status == 400 else "not_found"
            return json_error(RequestRejected(decision.status, code, decision.reason))
        try:
            if self.laravel is None:
                raise RequestRejected(
                    503, "not_configured", "no Laravel to pass this to: set webhooks.laravel_url"
                )
            body = await read_body(request, self.cfg.max_body_bytes)
            # Counted only when verified: anyone may reach the other routes, and a count
            # strangers could fill would hold back the webhooks. Those others are not
            # Laravel's webhook middleware's, as far as anyone knows, and go on even in a
            # pause: a restarting instance must fetch its accounts/active.
            counted = decision.signed and bool(self.cfg.secrets)
            if counted:
                # Refused here, not by Laravel: its refusal would count against the router.
                verify(request.headers, body, self.cfg.secrets, self._clock(), self.cfg.window_s)
            wait_s = await self.budget.take() if counted else 0.0
            if wait_s > 0:
                # Past the allowance, or Laravel said 429 lately: one more call would re-arm
                # its minute for every webhook.
                after = math.ceil(wait_s)
                refused = RequestRejected(
                    429,
                    "laravel_throttled",
                    "Laravel's limit for this router's calls is reached; retry later",
                    retry_after_s=after,
                )
                refused.headers["Retry-After"] = str(after)
                raise refused
            req = UpstreamRequest(
                request.method,
                request.rel_url.raw_path_qs,
                forward_headers(request),
                body,
                self.cfg.relay_timeout_s,
            )
            try:
                up = await self._forwarder.send(self.laravel, req)
            except UpstreamError as exc:
                if counted and isinstance(exc, NotReached):
                    await self.budget.give_back()
                raise failure_answer(exc, None, retried=False) from None
            # A 429 on a call nobody verified says nothing of the webhooks' allowance (it
            # may be another limiter's), and strangers could use it to pause them.
            if counted:
                await settle(self.budget, up.status, retry_after(up.headers.get("Retry-After")))
            return await relay(request, up, None)
        except RequestRejected as exc:
            return json_error(exc)


__all__ = ["RelayResult", "Webhooks", "learning", "parse_event", "sign", "verify"]
