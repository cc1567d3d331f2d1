"""Webhooks from the instances: verify, learn ownership, relay to Laravel, lose none.

Node posts `{"event": ..., "data": {...}}` to `{LARAVEL_URL}/api/whatsapp/webhooks/webjs`,
signed `X-HMAC-Signature = hex(HMAC-SHA256(secret, X-Timestamp + raw body))`, naming itself
in `X-Instance-Url: http://localhost:PORT` (node-pool-api.md). With LARAVEL_URL pointing at
the router, ownership follows the pool within one webhook, and a Laravel restart or deploy
no longer drops events: they wait in a durable backlog (`backlog.py`, `delivery.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from .backlog import Backlog
from .config import WebhookConfig
from .delivery import Deliverer, RelayResult, laravel_instance, post_raw
from .directory import Directory
from .discovery import Discovery
from .errors import RequestRejected, UpstreamError
from .forward import Forwarder, UpstreamRequest
from .httpio import forward_headers, json_error, read_body, relay
from .pool import Pool, State
from .retry import failure_answer
from .stores.base import Source, Status

log = structlog.get_logger("wa_router.webhooks")

TIMESTAMP = "X-Timestamp"
SIGNATURE = "X-HMAC-Signature"
INSTANCE_URL = "X-Instance-Url"
# What goes on to Laravel with the raw body: what its HMAC middleware and controller read.
RELAYED_HEADERS = ("Content-Type", TIMESTAMP, SIGNATURE, INSTANCE_URL)

# Events that say which instance holds a session, and the status they mean. Not
# `session_reconnected`: AutoReconnect sends it although the session may stay disconnected
# (node-pool-api.md, "Reconnect that is not"): it is a hint to check, not proof.
ASSIGNING = {
    "session_ready": Status.CONNECTED,
    "session_authenticated": Status.AUTHENTICATED,
    "qr_code_generated": Status.QR_SCANNING,
}
ASSIGN, FORGET, DEMOTE, CHECK = "assign", "forget", "demote", "check"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """Node's signature: lowercase hex HMAC-SHA256(secret, timestamp + raw body)."""
    return hmac.new(secret.encode(), timestamp.encode() + body, hashlib.sha256).hexdigest()


def verify(
    headers: Mapping[str, str], body: bytes, secrets: tuple[str, ...], now: float, window_s: float
) -> int:
    """The webhook's timestamp if its signature holds; RequestRejected(401, reason) if not."""
    ts_raw = headers.get(TIMESTAMP)
    sig = headers.get(SIGNATURE)
    if not ts_raw or not sig:
        raise _unauthorized("missing_headers", f"{TIMESTAMP} and {SIGNATURE} are required")
    if not ts_raw.isdigit() or len(ts_raw) > 12:
        raise _unauthorized("bad_timestamp", f"{TIMESTAMP} must be Unix seconds")
    ts = int(ts_raw)
    if now - ts > window_s:
        raise _unauthorized("stale_timestamp", f"{TIMESTAMP} is older than {window_s:g} s")
    if ts - now > window_s:
        raise _unauthorized("future_timestamp", f"{TIMESTAMP} is ahead by over {window_s:g} s")
    # Compare with every secret (rotation), constant-time each (RFC 2104 says nothing of
    # timing; hmac.compare_digest is what keeps the comparison from leaking a prefix).
    good = False
    for secret in secrets:
        good |= hmac.compare_digest(sign(secret, ts_raw, body), sig)
    if not good:
        raise _unauthorized("bad_signature", "the signature does not match the body")
    return ts


def _unauthorized(reason: str, message: str) -> RequestRejected:
    return RequestRejected(401, "unauthorized", message, reason=reason)


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    session: str | None
    data: dict[str, Any]


def parse_event(body: bytes) -> Event:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestRejected(400, "bad_request", "the webhook body is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("event"), str):
        raise RequestRejected(400, "bad_request", 'the webhook body has no "event"')
    data = doc.get("data")
    data = data if isinstance(data, dict) else {}
    session = data.get("session_id")
    return Event(doc["event"], session if isinstance(session, str) and session else None, data)


def learning(event: Event, forget_reasons: tuple[str, ...]) -> tuple[str, Status | None] | None:
    """What the directory learns from `event`: (ASSIGN, status) the sender holds it so;
    (FORGET, None) logged out everywhere; (DEMOTE, DISCONNECTED) the sender lost it (a
    conflict, a network drop: it may come back, so it is not forgotten); (CHECK, None) worth
    a look; None: nothing."""
    if event.session is None:
        return None
    if event.name in ASSIGNING:
        return (ASSIGN, ASSIGNING[event.name])
    if event.name == "session_disconnected":
        reason = event.data.get("reason")
        if isinstance(reason, str) and reason.upper() in {r.upper() for r in forget_reasons}:
            return (FORGET, None)
        return (DEMOTE, Status.DISCONNECTED)
    if event.name == "session_reconnected":
        return (CHECK, None)
    return None


class SeenSet:
    """Keys seen within the last `ttl_s` seconds (insertion-ordered, so expiry is O(1))."""

    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def add(self, key: bytes) -> bool:
        """Record `key`; False when it was already there."""
        now = self._clock()
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if at > now - self._ttl_s:
                break
            del self._seen[oldest]
        if key in self._seen:
            return False
        self._seen[key] = now
        return True

    def discard(self, key: bytes) -> None:
        self._seen.pop(key, None)


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self._pool = pool
        self._directory = directory
        self._discovery = discovery
        self._forwarder = forwarder
        self.backlog = backlog
        self._clock = clock
        self.laravel = laravel_instance(cfg.laravel_url) if cfg.laravel_url else None
        # A replay is the same (timestamp, signature): remembered while it could verify.
        self._replays = SeenSet(2 * cfg.window_s, clock)
        # Node's retry of one event: same body from the same instance, new signature.
        self._retries = SeenSet(cfg.retry_dedupe_s, clock)
        self.stats = WebhookStats()
        # A `session_reconnected`: the app points it at the parking (ask about it now).
        self.on_hint: Callable[[str], None] = lambda session: None
        self.deliverer: Deliverer | None = None
        if backlog is not None and self.laravel is not None:
            self.deliverer = Deliverer(
                backlog,
                forwarder,
                self.laravel,
                secret=cfg.secrets[0] if cfg.secrets else "",
                resign_after_s=cfg.resign_after_s,
                timeout_s=cfg.relay_timeout_s,
                retry_base_s=cfg.retry_base_s,
                retry_max_s=cfg.retry_max_s,
            )

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
        # Two instances sending the same lifecycle event in the same second sign the same
        # bytes (shared secret, no timestamp in the body): only the sender tells them apart.
        replay_key = f"{ts}:{request.headers[SIGNATURE]}:{instance_url}".encode()
        # Node's retry: the same body from the same instance, re-signed. After the instance
        # came back (a restart) the same body is a new event: its restore says it again.
        epoch = f"{inst.back_at}" if inst is not None else ""
        retry_key = f"{instance_url}\0{epoch}\0".encode() + hashlib.sha256(body).digest()
        if not self._replays.add(replay_key) or not self._retries.add(retry_key):
            self.stats.duplicates += 1
            log.info("webhook_duplicate", webhook_event=event.name, session=event.session)
            return web.json_response({"status": "duplicate"}), event.name, "duplicate"
        self.stats.accepted += 1
        await self._learn(event, instance_url, ts)
        try:
            resp, result = await self._relay(request, event, body)
            return resp, event.name, result
        except BaseException:
            # Not taken after all (full backlog, crash): Node's retry must not look like
            # a duplicate of an event nobody has.
            self._replays.discard(replay_key)
            self._retries.discard(retry_key)
            raise

    async def _learn(self, event: Event, instance_url: str, ts: int) -> None:
        inst = self._pool.by_url(instance_url) if instance_url else None
        what = learning(event, self.cfg.forget_reasons)
        if what is None or event.session is None:
            return
        action, status = what
        # The observation time is the webhook's own timestamp, so a late retry never beats
        # a newer fact. X-Timestamp has whole seconds: within its second, the receipt time
        # is the better estimate (a rediscovery 0.4 s into that second saw an older state).
        observed_at = min(self._clock(), ts + 0.999)
        if action == FORGET:
            if await self._directory.forget(event.session, Source.WEBHOOK, observed_at=observed_at):
                log.info("session_forgotten", session=event.session, webhook_event=event.name)
            return
        if action == CHECK:
            self.on_hint(event.session)
            return
        if inst is None:
            self.stats.unknown_instance += 1
            log.warning(
                "webhook_unknown_instance",
                instance_url=instance_url,
                webhook_event=event.name,
                session=event.session,
            )
            return
        assert status is not None
        if action == DEMOTE:
            await self._directory.demote(
                event.session, inst.name, status, Source.WEBHOOK, observed_at=observed_at
            )
            return
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

    async def _relay(
        self, request: web.Request, event: Event, body: bytes
    ) -> tuple[web.Response, str]:
        if self.laravel is None:
            return web.json_response({"status": "accepted"}), "accepted"
        headers = [(k, request.headers[k]) for k in RELAYED_HEADERS if k in request.headers]
        session = event.session or ""
        assert self.backlog is not None
        # Per-session order: behind anything already waiting for this session.
        if await self.backlog.pending(session) == 0:
            result = await post_raw(
                self._forwarder, self.laravel, request.path, body, headers, self.cfg.relay_timeout_s
            )
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
        return await self._enqueue(request.path, event, body, headers, request), "queued"

    async def _enqueue(
        self,
        path: str,
        event: Event,
        body: bytes,
        headers: list[tuple[str, str]],
        request: web.Request,
    ) -> web.Response:
        assert self.backlog is not None
        ts = int(request.headers[TIMESTAMP])
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
        """Node's other calls to Laravel (accounts/active, chats/sync, mark-disconnected,
        mobile-activity) go on unchanged: Laravel checks them itself."""
        try:
            if self.laravel is None:
                raise RequestRejected(
                    503, "not_configured", "no Laravel to pass this to: set webhooks.laravel_url"
                )
            body = await read_body(request, self.cfg.max_body_bytes)
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
                raise failure_answer(exc, None, retried=False) from None
            return await relay(request, up, None)
        except RequestRejected as exc:
            return json_error(exc)


__all__ = ["RelayResult", "Webhooks", "learning", "parse_event", "sign", "verify"]
