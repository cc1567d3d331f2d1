"""The operator's side: liveness, readiness and the token-protected `/admin` API.

`/healthz` and `/readyz` answer without a token: load balancers and orchestrators probe
them. Everything under `/admin/` needs `Authorization: Bearer <admin.token>` (RFC 6750);
with no token configured the admin API is off and every `/admin/...` path says so (404), so
it can never fall through to the proxy's catch-all and reach an instance.

The endpoints (documented, and tested against this table, in `openapi.py`):

    GET    /admin/status                     pool, directory, discovery, sync, webhooks
    GET    /admin/sessions                   directory entries, cursor-paged
    GET    /admin/sessions/{session}         one entry
    DELETE /admin/sessions/{session}         forget it
    POST   /admin/sessions/{session}/rediscover
    POST   /admin/sync?dry_run=1             full reconciliation, `wa-router sync`'s form
    POST   /admin/instances/{name}/drain     no new sessions there (rolling restarts)
    POST   /admin/instances/{name}/undrain
    GET    /admin/openapi.json

and the status page, `GET /admin/` (statuspage/: static files, no data, served without the
token; its script calls the endpoints above with it).

Draining is shared through the store: every router sharing it drains the instance.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from .bearer import bearer_token, token_matches
from .errors import RequestRejected
from .httpio import json_error, method_not_allowed
from .openapi import openapi_document
from .pool import Instance, State
from .statuspage import REDIRECT_FROM, page_handlers, redirect
from .stores.base import Entry
from .views import Control, RouterView
from .webhooks import WebhookStats

log = structlog.get_logger("wa_router.admin")

ADMIN_PREFIX = "/admin/"
# Registered after the endpoints: unknown admin paths answer here (404/405), never reach
# the proxy's own catch-all.
ADMIN_FALLBACK = "/admin/{tail:.*}"
LIMIT_DEFAULT = 100
LIMIT_MAX = 1000
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

JsonHandler = Callable[[web.Request], Awaitable[web.Response]]


# -- pure policy ---------------------------------------------------------------------------


def readiness(warm: bool, states: Iterable[State]) -> str | None:
    """Why the router is not ready, or None when it is: warm, and one instance healthy."""
    if not warm:
        return "warming up"
    if State.HEALTHY not in states:
        return "no healthy instance"
    return None


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return LIMIT_DEFAULT
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not re.fullmatch(r"[0-9]{1,4}", raw) or not 1 <= int(raw) <= LIMIT_MAX:
        raise RequestRejected(400, "bad_request", f"limit must be an integer in 1..{LIMIT_MAX}")
    return int(raw)


def parse_flag(raw: str | None, name: str) -> bool:
    value = (raw or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise RequestRejected(400, "bad_request", f"{name} must be 1 or 0 (true or false)")


def encode_cursor(session: str) -> str:
    """The last session id of a page, opaque to clients (they must not build cursors)."""
    return base64.urlsafe_b64encode(session.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return raw.decode()
    except (binascii.Error, ValueError):
        raise RequestRejected(400, "bad_request", "the cursor is not one this API gave") from None


def entry_json(session: str, entry: Entry) -> dict[str, Any]:
    return {
        "session": session,
        "instance": entry.instance,
        "source": entry.source.value,
        "observed_at": entry.observed_at,
        "status": entry.status,
    }


def instance_json(inst: Instance, sessions: int) -> dict[str, Any]:
    return {
        "name": inst.name,
        "url": inst.base,
        "state": inst.state.value,
        "draining": inst.draining,
        "sessions": sessions,
        "reported_sessions": inst.reported_sessions,
        "latency_ms": None if inst.latency_s is None else round(inst.latency_s * 1000, 2),
        "last_check_at": inst.last_check_at,
        "failures": inst.failures,
        "last_error": inst.last_error,
        "inflight": inst.inflight,
    }


def allowed_methods(routes: Iterable[tuple[str, str]], path: str) -> list[str]:
    """Methods of the admin endpoints whose template matches `path` (for a 405's Allow)."""
    out: set[str] = set()
    for method, template in routes:
        pattern = re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            out.add(method)
    return sorted(out)


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.json_response(doc, status=status)


# -- handlers ------------------------------------------------------------------------------


class Admin:
    def __init__(self, view: RouterView, control: Control, token: str) -> None:
        self.view = view
        self.control = control
        self._token = token
        self.routes: list[tuple[str, str, JsonHandler]] = [
            ("GET", "/admin/status", self.status),
            ("GET", "/admin/sessions", self.sessions),
            ("GET", "/admin/sessions/{session}", self.session),
            ("DELETE", "/admin/sessions/{session}", self.forget),
            ("POST", "/admin/sessions/{session}/rediscover", self.rediscover),
            ("POST", "/admin/sync", self.sync),
            ("POST", "/admin/instances/{name}/drain", self.drain),
            ("POST", "/admin/instances/{name}/undrain", self.undrain),
            ("GET", "/admin/openapi.json", self.openapi),
        ]

    def guarded(self, handler: JsonHandler) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            self._authorize(request)
            return await handler(request)

        return run

    def _authorize(self, request: web.Request) -> None:
        presented = bearer_token(request.headers.get("Authorization"))
        if presented is None:
            refused = RequestRejected(
                401, "unauthorized", "the admin API needs Authorization: Bearer <admin.token>"
            )
            # RFC 6750 3: a bearer challenge; error= only when a token was presented.
            refused.headers["WWW-Authenticate"] = 'Bearer realm="wa-router admin"'
            raise refused
        # The running config's: a SIGHUP may have rotated it (reload.py).
        if not token_matches(presented, self.view.config().admin.token or self._token):
            log.warning("admin_unauthorized", path=request.path, peer=request.remote)
            refused = RequestRejected(
                401, "unauthorized", "the admin token is wrong", reason="wrong_token"
            )
            refused.headers["WWW-Authenticate"] = (
                'Bearer realm="wa-router admin", error="invalid_token"'
            )
            raise refused

    def _session_id(self, request: web.Request) -> str:
        return self.control.session_id(request.match_info["session"], "the path")

    def _instance(self, name: str) -> Instance:
        inst = self.view.pool.get(name)
        if inst is None:
            raise RequestRejected(
                404, "instance_not_found", f"no instance named {name!r} in the pool"
            )
        return inst

    async def fallback(self, request: web.Request) -> web.Response:
        allowed = allowed_methods(((m, p) for m, p, _ in self.routes), request.path)
        if allowed:
            raise method_not_allowed(request, allowed)
        raise RequestRejected(
            404,
            "not_found",
            f"no admin endpoint {request.path}; see /admin/openapi.json",
        )

    async def status(self, request: web.Request) -> web.Response:
        v = self.view
        counts = await v.counts()
        states = [i.state for i in v.pool.instances]
        stats = v.directory
        last = v.last_sync()
        return _json(
            {
                "ready": readiness(v.warm(), states) is None,
                # The router's clock (the status page's ages), and its requests in flight
                # but this one (as wa_router_requests_in_flight, which counts no scrape).
                "now": time.time(),
                "inflight": len(v.inflight) - (request.task in v.inflight),
                "instances": [instance_json(i, counts.get(i.name, 0)) for i in v.pool.instances],
                "directory": {
                    "size": sum(counts.values()),
                    "cache_hit_ratio": round(stats.hit_ratio, 4),
                    "cache_hits": stats.cache_hits,
                    "store_hits": stats.store_hits,
                    "misses": stats.misses,
                    "candidates": stats.candidates,
                    "demotions": stats.demotions,
                },
                "discovery": dataclasses.asdict(v.discovery),
                "parking": {
                    "parked": v.parked(),
                    "outcomes": dict(v.parking.outcomes),
                    "rechecks": v.parking.rechecks,
                },
                "sync": None
                if last is None
                else {
                    "summary": last.lines()[-1],
                    "started_at": last.started_at,
                    "duration_s": round(last.duration_s, 3),
                    "ok": last.ok,
                },
                "webhooks": {
                    **webhook_stats(v.webhooks),
                    "backlog": None if v.backlog_size is None else await v.backlog_size(),
                },
            }
        )

    async def sessions(self, request: web.Request) -> web.Response:
        q = request.query
        limit = parse_limit(q.get("limit"))
        instance = q.get("instance") or None
        if instance is not None and self.view.pool.get(instance) is None:
            raise RequestRejected(400, "bad_request", f"no instance named {instance!r}")
        cursor = q.get("cursor") or None
        after = None if cursor is None else decode_cursor(cursor)
        # One more than asked: whether a next page exists, without an empty last page.
        rows = await self.view.entries.page(after=after, limit=limit + 1, instance=instance)
        page = rows[:limit]
        more = len(rows) > limit
        return _json(
            {
                "sessions": [entry_json(s, e) for s, e in page],
                "next_cursor": encode_cursor(page[-1][0]) if more else None,
            }
        )

    async def session(self, request: web.Request) -> web.Response:
        session = self._session_id(request)
        # The store, not Directory.lookup: an operator's look must not count as a cache
        # hit or miss, and the store is the truth shared by every replica.
        entry = await self.view.entries.get(session)
        if entry is None or entry.instance is None:
            raise RequestRejected(
                404, "session_not_found", f"no entry for session {session}", session=session
            )
        return _json(entry_json(session, entry))

    async def forget(self, request: web.Request) -> web.Response:
        session = self._session_id(request)
        was, applied = await self.control.forget(session)
        log.info("admin_session_forgotten", session=session, instance=was, applied=applied)
        return _json(
            {"session": session, "forgotten": applied and was is not None, "instance": was}
        )

    async def rediscover(self, request: web.Request) -> web.Response:
        session = self._session_id(request)
        found, previous = await self.control.rediscover(session)
        if found.owner is None:
            raise RequestRejected(
                404,
                "session_not_found",
                f"session {session} is on no instance",
                session=session,
                asked=found.asked,
                unreachable=found.unreachable,
            )
        return _json(
            {
                "session": session,
                "instance": found.owner.name,
                "previous": previous,
                "status": found.status,
                "asked": found.asked,
            }
        )

    async def sync(self, request: web.Request) -> web.Response:
        dry_run = parse_flag(request.query.get("dry_run"), "dry_run")
        report = await self.control.sync(dry_run)
        return _json({**report.to_json(), "lines": report.lines()})

    async def drain(self, request: web.Request) -> web.Response:
        return await self._set_draining(request, True)

    async def undrain(self, request: web.Request) -> web.Response:
        return await self._set_draining(request, False)

    async def _set_draining(self, request: web.Request, draining: bool) -> web.Response:
        inst = self._instance(request.match_info["name"])
        # Shared: every router sharing the store drains it too (draining.py). "shared":
        # false when the store could not be told; this router has it all the same.
        shared = await self.control.set_draining(inst.name, draining)
        return _json({"instance": inst.name, "draining": inst.draining, "shared": shared})

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(openapi_document())


# -- wiring --------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "alive"})


def _readyz(view: RouterView) -> Handler:
    async def run(request: web.Request) -> web.StreamResponse:
        states = [i.state for i in view.pool.instances]
        reason = readiness(view.warm(), states)
        healthy = states.count(State.HEALTHY)
        if reason is not None:
            return _json({"status": "not ready", "reason": reason, "healthy": healthy}, 503)
        return _json({"status": "ready", "healthy": healthy, "instances": len(states)})

    return run


async def _admin_off(request: web.Request) -> web.Response:
    return json_error(RequestRejected(404, "admin_off", "the admin API is off: set admin.token"))


def only(*methods: str) -> Handler:
    """The other methods of a control path (registered after its own, as "*"): 405 with
    Allow, where the proxy's catch-all would say "no route rule matches"."""
    allowed = list(methods)

    async def not_allowed(request: web.Request) -> web.Response:
        return json_error(method_not_allowed(request, allowed))

    return not_allowed


def add_admin_routes(app: web.Application, view: RouterView, control: Control) -> None:
    """Register /healthz, /readyz and /admin/*; before the proxy's catch-all."""
    # add_get: HEAD too, which some load balancers probe with.
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/healthz", only("GET", "HEAD"))
    app.router.add_get("/readyz", _readyz(view))
    app.router.add_route("*", "/readyz", only("GET", "HEAD"))
    token = view.config().admin.token
    if token is None:
        app.router.add_route("*", ADMIN_FALLBACK, _admin_off)
        return
    admin = Admin(view, control, token)
    # add_route, not add_get: no implicit HEAD, so the routes are exactly the document's.
    for method, path, handler in admin.routes:
        app.router.add_route(method, path, admin.guarded(handler))
    # The status page: no data in it, so no token (every call it makes brings one).
    for path, page in page_handlers().items():
        app.router.add_get(path, page)
    app.router.add_get(REDIRECT_FROM, redirect)
    app.router.add_route("*", ADMIN_FALLBACK, admin.guarded(admin.fallback))


def webhook_stats(stats: WebhookStats) -> dict[str, Any]:
    """The webhook counters as JSON: `events` is keyed by (event, result) pairs, which JSON
    objects cannot be, so it becomes {event: {result: n}}."""
    doc = dataclasses.asdict(stats)
    events: dict[str, dict[str, int]] = {}
    for (event, result), n in sorted(stats.events.items()):
        events.setdefault(event, {})[result] = n
    doc["events"] = events
    return doc
