"""The running router's parts, held together, and the wrapper every handler runs in.

Below the wiring (`app.py` builds a `Router` and its routes) and above the parts, so the
admin API, the metrics and the status page read the parts through it without importing
the wiring (no import loop).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from .config import Config
from .directory import Directory
from .discovery import Discovery
from .draining import SharedDrain
from .errors import RequestRejected
from .forward import AiohttpForwarder
from .h1 import LeanForwarder
from .health import HealthChecker
from .httpio import HEAD_SENT, json_error
from .logging import CURRENT_REQUEST
from .parking import Parking
from .pool import Pool
from .profiles import Profile
from .proxy import Proxy
from .stores import Store
from .sync import Syncer
from .webhooks import Webhooks


@dataclass(slots=True)
class Router:
    config: Config
    profile: Profile
    pool: Pool
    store: Store
    directory: Directory
    forwarder: AiohttpForwarder | LeanForwarder
    discovery: Discovery
    proxy: Proxy
    webhooks: Webhooks
    health: HealthChecker
    syncer: Syncer
    parking: Parking
    drain: SharedDrain
    # Warm: the first sync is done (or gave up); /readyz says so.
    warm: bool = False
    # Handler tasks in flight, so shutdown can wait for them (and only for its grace).
    inflight: set[asyncio.Task[object]] = field(default_factory=set)
    # Set when the grace is over and what is left is cancelled (answering() answers it).
    stopping: bool = False


log = structlog.get_logger("wa_router.runtime")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_request_ids = itertools.count(1)
_ID_PREFIX = f"{os.getpid():x}-"


class RequestId:
    """Names one request in the logs: the caller's X-Request-Id when it is a sane token,
    else a cheap unique one; made on first use (most requests log nothing), then kept."""

    __slots__ = ("_request", "_rid")

    def __init__(self, request: web.Request) -> None:
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
            cut = RequestRejected(
                503,
                "shutting_down",
                "the router stopped before this request finished (shutdown grace over); it "
                "may have reached the instance: check before sending it again",
            )
            cut.headers["Retry-After"] = "1"
            cut.headers["Connection"] = "close"
            return json_error(cut)
        finally:
            HEAD_SENT.reset(sent)
            CURRENT_REQUEST.reset(token)
            router.inflight.discard(task)

    return run
