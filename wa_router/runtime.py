"""The running router's parts, held together, the wrapper every handler runs in, and the
narrow views of it that the operator's side gets (`views.py`).

Below the wiring (`app.py` builds a `Router` and its routes) and above the parts; the
admin API and the metrics see only a `RouterView` and a `Control`, made here.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from .config import Config
from .directory import Directory
from .discovery import Discovery, Found
from .draining import SharedDrain
from .errors import RequestRejected
from .forward import Forwarder
from .health import HealthChecker
from .httpio import HEAD_SENT, json_error
from .inflight import InFlight
from .logging import CURRENT_REQUEST
from .parking import Parking
from .pool import Pool
from .profiles import Profile
from .proxy import Proxy
from .refusals import head_refusal
from .stores import Store
from .stores.base import Source
from .stores.snapshot import Snapshot
from .stream_backlog import StreamBacklog
from .stream_relay import StreamRelay
from .sync import Syncer, SyncReport
from .views import DeliveryReading, RouterView
from .webhooks import Webhooks
from .wire import CODEC


@dataclass(slots=True)
class Router:
    config: Config
    profile: Profile
    pool: Pool
    store: Store
    directory: Directory
    forwarder: Forwarder
    discovery: Discovery
    proxy: Proxy
    webhooks: Webhooks
    health: HealthChecker
    syncer: Syncer
    parking: Parking
    drain: SharedDrain
    # The memory store's directory kept across restarts (None: another store, or off).
    snapshot: Snapshot | None = None
    # Warm: the first sync is done (or gave up); /readyz says so.
    warm: bool = False
    # Requests in flight, so shutdown can wait for them (and only for its grace).
    inflight: InFlight = field(default_factory=InFlight)
    # Set when the router begins to stop: every answer from then on says the connection
    # closes with it (`Connection: close`), whichever front or handler gives it.
    closing: bool = False
    # Set when the grace is over and what is left is cancelled (answering() answers it).
    stopping: bool = False


log = structlog.get_logger("wa_router.runtime")


def view_of(router: Router) -> RouterView:
    """The read-only view of `router` (what /admin/status and /metrics show)."""
    backlog = router.webhooks.backlog

    def delivery() -> DeliveryReading | None:
        deliverer = router.webhooks.deliverer
        if deliverer is None:
            return None
        counts = deliverer.relay
        streams = isinstance(deliverer, StreamRelay)
        return DeliveryReading(
            delivered=counts.delivered,
            failed=counts.failures,
            refused=counts.dropped,
            shards_held=len(deliverer.held) if isinstance(deliverer, StreamRelay) else None,
            spooled=backlog.spooled if streams and isinstance(backlog, StreamBacklog) else None,
            throttled=deliverer.relay.budget.throttles,
            held_back=deliverer.relay.budget.deferred,
        )

    return RouterView(
        pool=router.pool,
        entries=router.directory.store,
        counts=router.directory.counts,
        directory=router.directory.stats,
        discovery=router.discovery.stats,
        proxy=router.proxy.stats,
        placements=lambda: router.proxy.resolver.placements,
        parking=router.parking.stats,
        parked=lambda: router.parking.parked,
        webhooks=router.webhooks.stats,
        backlog_size=None if backlog is None else backlog.size,
        delivery=delivery,
        last_sync=lambda: router.syncer.last,
        sync_runs=lambda: router.syncer.runs,
        inflight=router.inflight,
        warm=lambda: router.warm,
        config=lambda: router.config,
    )


class RouterControl:
    """The admin API's actions (`views.Control`), on the router's parts."""

    __slots__ = ("_router",)

    def __init__(self, router: Router) -> None:
        self._router = router

    def session_id(self, raw: str, where: str) -> str:
        return self._router.proxy.ids.check(raw, where)

    async def forget(self, session: str) -> tuple[str | None, bool]:
        directory = self._router.directory
        entry = await directory.store.get(session)
        return (entry.instance if entry is not None else None), await directory.forget(
            session, Source.ADMIN
        )

    async def rediscover(self, session: str) -> tuple[Found, str | None]:
        r = self._router
        # A fresh scan: neither the negative cache nor a cached owner may answer for it.
        r.discovery.forget_negative(session)
        r.directory.invalidate(session)
        entry = await r.directory.store.get(session)
        previous = entry.instance if entry is not None else None
        found = await r.discovery.find(
            session, api_key=r.config.upstream.api_key, previous=previous
        )
        return found, previous

    async def sync(self, dry_run: bool) -> SyncReport:
        return await self._router.syncer.run(dry_run=dry_run)

    async def set_draining(self, name: str, draining: bool) -> bool:
        return await self._router.drain.set(name, draining)


_request_ids = itertools.count(1)
_ID_PREFIX = f"{os.getpid():x}-"


class HasHeaders(Protocol):
    @property
    def headers(self) -> Mapping[str, str]: ...


class RequestId:
    """Names one request in the logs: the caller's X-Request-Id when it is a sane token,
    else a cheap unique one; made on first use (most requests log nothing), then kept."""

    __slots__ = ("_request", "_rid")

    def __init__(self, request: HasHeaders) -> None:
        self._request = request
        self._rid: str | None = None

    def __call__(self) -> str:
        if self._rid is None:
            given = self._request.headers.get("X-Request-Id", "")
            if 0 < len(given) <= 64 and given.isascii() and given.isprintable():
                self._rid = given
            else:
                self._rid = f"{_ID_PREFIX}{next(_request_ids):x}"
        return self._rid


def shutdown_cut() -> RequestRejected:
    """The answer to a request still running when the shutdown grace ended."""
    cut = RequestRejected(
        503,
        "shutting_down",
        "the router stopped before this request finished (shutdown grace over); it "
        "may have reached the instance: check before sending it again",
    )
    cut.headers["Retry-After"] = "1"
    return cut


def answering(router: Router) -> Middleware:
    """The one wrapper every request runs in: counted as in flight (for the drain), its
    request id on every log line it writes, a `RequestRejected` raised anywhere below
    answered as JSON, and a request the shutdown grace cut off answered 503."""

    @web.middleware
    async def run(request: web.Request, handler: Handler) -> web.StreamResponse:
        task = request.task
        router.inflight.add(task)
        # Reset on exit: aiohttp serves a keep-alive connection's requests in one task,
        # so the request must not outlive its own handling in the context.
        token = CURRENT_REQUEST.set(RequestId(request))
        sent = HEAD_SENT.set(False)
        try:
            if (refused := _refused_head(request)) is not None:
                log.info("request_refused", reason=refused.code, status=refused.status)
                router.proxy.refuse(refused, time.perf_counter())  # counted, as the lean's
                answer = json_error(refused)
                answer.force_close()
                return answer
            return await handler(request)
        except RequestRejected as exc:
            return json_error(exc)
        except asyncio.CancelledError:
            if not router.stopping or HEAD_SENT.get():
                raise
            # Cut by the end of the shutdown grace: the caller hears so, rather than a
            # connection closed without a word.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            log.warning("request_cut_by_shutdown", method=request.method, path=request.path)
            cut = shutdown_cut()
            cut.headers["Connection"] = "close"
            return json_error(cut)
        finally:
            HEAD_SENT.reset(sent)
            CURRENT_REQUEST.reset(token)
            router.inflight.discard(task)

    return run


def _refused_head(request: web.Request) -> RequestRejected | None:
    """`refusals.head_refusal` for a request aiohttp's parser read (the lean front checks
    the same as it parses). aiohttp refuses two Hosts, and none in 1.1, itself; it serves
    HTTP/0.9 and 2.0 request lines, and decodes chunks under any other transfer coding."""
    fields = request.headers
    codings = fields.getall(hdrs.TRANSFER_ENCODING, None)
    return head_refusal(
        f"{request.version.major}.{request.version.minor}",
        len(fields.getall(hdrs.HOST, ())),
        ",".join(codings).encode(*CODEC) if codings else None,
        hdrs.UPGRADE in fields,
    )
