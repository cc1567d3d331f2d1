"""The lean server: proxied routes parsed by httptools on a bare asyncio Protocol; the rest of
the port (webhooks, admin, status page, metrics, pool-wide routes) served by aiohttp.

Every connection is this server's, and every request on it is read here, whole, under the
limits below. A proxied route is answered here (no aiohttp request or response object is
built); any other request is lent to aiohttp's own protocol (`delegate.py`), which answers
it on the same connection; pipelined requests are answered in order, whoever answers them.

Hardening is here, before the routing sees anything: llhttp is strict about framing
(Content-Length with Transfer-Encoding, two Content-Lengths, obs-fold, bad chunk sizes, bare
LF are 400); a head over `limits.max_header_bytes` is 431; a body over
`limits.max_body_bytes` is 413 before it is read; slow heads, slow bodies and idle
keep-alive connections are closed after their timeouts; past `server.max_connections` a
connection is answered 503 and closed; `Upgrade` is refused. A refused request's line and
header values are never logged: only why it was refused.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import deque
from dataclasses import dataclass
from typing import cast

import httptools
import structlog
from aiohttp import web

from .config import Config
from .delegate import Lent, answer_by_aiohttp, request_bytes
from .errors import RequestRejected, UpstreamError
from .exchange import (
    Answer,
    Fields,
    Inbound,
    Reply,
    Streamed,
    answer_headers,
    error_reply,
    forward_fields,
    read_fields,
)
from .express import Express, Lane, Request
from .h1 import LeanForwarder
from .logging import CURRENT_REQUEST
from .refusals import (
    SERVED_VERSIONS,
    coding_refusal,
    hosts_refusal,
    not_served,
    upgrade_refused,
)
from .rules import Match, check_path, path_session
from .runtime import RequestId, Router, shutdown_cut
from .wire import (
    BODYLESS_STATUSES,
    CHUNKED_END,
    CODEC,
    CONTINUE,
    answer_head,
    linger,
)
from .wire import chunk as wire_chunk

log = structlog.get_logger("wa_router.lean")

# What a closed connection holds instead of its parser (which nothing feeds any more).
_SPENT_PARSER = httptools.HttpRequestParser(object())
_KEEP_READING_QUEUE = 8  # pipelined requests read ahead before reading pauses
_NEVER = float("inf")
_HASH = ord("#")  # a fragment's start


class _Refused(Exception):
    """Raised inside a parser callback: the request is answered with this and the
    connection closed."""

    def __init__(self, rejected: RequestRejected) -> None:
        self.rejected = rejected


@dataclass(slots=True)
class _Lend:
    """A request for aiohttp, written out again (`delegate.request_bytes`)."""

    raw: bytes
    keep_alive: bool
    head_only: bool


@dataclass(slots=True)
class _Refusal:
    rejected: RequestRejected
    started: float
    head_only: bool  # the refused request is a HEAD: its answer has no body


def _rejected(status: int, code: str, message: str) -> _Refused:
    return _Refused(RequestRejected(status, code, message))


class LeanServer:
    """The listening socket's protocol factory (and aiohttp's `Server` for the rest)."""

    def __init__(self, web_server: web.Server, router: Router, cfg: Config) -> None:
        self.web = web_server
        self.router = router
        self.proxy = router.proxy
        self.server_cfg = cfg.server
        self.max_body = cfg.limits.max_body_bytes
        self.max_head = cfg.limits.max_header_bytes
        self.max_connections = connection_cap(cfg.server.max_connections)
        wh = cfg.webhooks
        self._control_exact = frozenset({"/metrics", "/healthz", "/readyz", "/admin", wh.path})
        passthrough = wh.passthrough_prefix.rstrip("/") + "/"
        self._control_prefixes = ("/admin/", passthrough)
        # Webhooks and Laravel's passthrough take smaller bodies: refused here from their
        # Content-Length too, before a 100 Continue asks for the body (`body_limit`).
        self._hook_paths = (wh.path, passthrough)
        self._hook_max_body = min(wh.max_body_bytes, self.max_body)
        self.connections: set[LeanConnection] = set()
        self.refused_lingering = 0  # connections past the cap, answered, still lingering
        self._refused_unlogged = 0  # ...refused since the last `connection_refused` line
        self._refused_log_at = 0.0  # when the next line may be written
        self._refused_flush: asyncio.TimerHandle | None = None
        self.closing = False
        # The express lane needs the lean upstream client (it writes to its connections).
        fw = router.forwarder
        self.lane: Lane | None = None
        if cfg.server.express_lane and isinstance(fw, LeanForwarder):
            self.lane = Lane(self.proxy, fw, router.inflight, self)
        # Held: asyncio.get_running_loop() is a getpid() syscall per call on Python 3.11.
        self.loop = asyncio.get_running_loop()

    def __call__(self) -> asyncio.Protocol:
        if len(self.connections) >= self.max_connections:
            return _Full(self)
        return LeanConnection(self)

    def whose(self, method: str, path: str) -> Match | None:
        """The rule when this request is the lean path's, None when it is aiohttp's; raises
        RequestRejected for a path no part of the router may take."""
        if path in self._control_exact or path.startswith(self._control_prefixes):
            # The proxy checks its paths (`Proxy.route`); these are checked here, whoever
            # answers them: Laravel's passthrough too would be handed a %0d%0a.
            check_path(path)
            return None
        match = self.proxy.route(method, path)
        if match.rule.kind in ("pool_health", "pool_list"):
            return None
        return match

    def body_limit(self, path: str) -> int:
        """The largest body a request for `path` that aiohttp answers may have."""
        return self._hook_max_body if path.startswith(self._hook_paths) else self.max_body

    def refused_connection(self) -> Reply:
        """One connection refused past the cap: its answer, counted (`wa_router_requests`,
        rejected 5xx), and logged at most once per `REFUSED_LOG_EVERY_S` with how many it
        stands for, so a flood of connections is not a flood of log lines as well."""
        refused = RequestRejected(
            503, "too_many_connections", "the router has as many connections as it takes"
        )
        reply = self.proxy.refuse(refused, time.perf_counter())
        reply.headers["Retry-After"] = "1"
        self._refused_unlogged += 1
        if self.loop.time() >= self._refused_log_at:
            self._log_refused()
        elif self._refused_flush is None:
            self._refused_flush = self.loop.call_at(self._refused_log_at, self._log_refused)
        return reply

    def _log_refused(self) -> None:
        self._refused_flush = None
        if self._refused_unlogged:
            log.warning(
                "connection_refused",
                reason="max_connections",
                connections=self._refused_unlogged,
                cap=self.max_connections,
            )
            self._refused_unlogged = 0
            self._refused_log_at = self.loop.time() + REFUSED_LOG_EVERY_S

    def pre_shutdown(self) -> None:
        self.closing = self.router.closing = True
        self.web.pre_shutdown()
        for conn in list(self.connections):
            conn.close_if_idle()

    # aiohttp's runner calls it so (web.Server.shutdown's signature).
    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if self.lane is not None:
            self.lane.close()
        if self._refused_flush is not None:
            self._refused_flush.cancel()
        self._log_refused()  # what the last period refused, not lost with the timer
        await self.web.shutdown(timeout)
        for conn in list(self.connections):
            conn.abort()


# Descriptors kept for what is not a caller connection: upstream pools, the store, files.
_FD_RESERVE = 256
# Connections answered 503 past the cap linger after it (see `linger`), at most this many at
# once; past that, one is closed as soon as its 503 is out: a flood of them must not take
# the descriptors the cap keeps free.
REFUSED_LINGERING_MAX = _FD_RESERVE // 4
REFUSED_LOG_EVERY_S = 10.0  # one `connection_refused` line per this, however many are


def connection_cap(configured: int) -> int:
    """`server.max_connections`, lowered to fit under the process's file limit (a connection
    accepted past the limit would fail elsewhere, at an upstream connect or a file open)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = max(64, soft - _FD_RESERVE) if soft != resource.RLIM_INFINITY else configured
    if configured > room:
        log.warning("max_connections_lowered", configured=configured, file_limit=soft, cap=room)
    return min(configured, room)


class _Full(asyncio.Protocol):
    """Past the connection cap: one 503 and the connection closed (lingering, see `linger`,
    while fewer than `REFUSED_LINGERING_MAX` do)."""

    def __init__(self, server: LeanServer) -> None:
        self._server = server
        self._lingering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        transport = cast(asyncio.Transport, transport)
        server = self._server
        reply = server.refused_connection()
        transport.write(
            answer_head(reply.status, reply.reason, reply.headers, len(reply.body), True)
        )
        transport.write(reply.body)
        if server.refused_lingering < REFUSED_LINGERING_MAX:
            server.refused_lingering += 1
            self._lingering = True
            linger(transport)
        else:
            transport.close()  # the 503 goes out first; what the caller sends may reset it

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lingering:
            self._lingering = False
            self._server.refused_lingering -= 1

    def data_received(self, data: bytes) -> None:
        pass  # what the caller sent before it read the 503: read, so no reset hides it


class LeanConnection(asyncio.Protocol):
    __slots__ = (
        "_answering",
        "_asks_connection",
        "_begun_at",
        "_body",
        "_body_bytes",
        "_busy",
        "_closed",
        "_continue",
        "_deadline",
        "_eof",
        "_express",
        "_head_bytes",
        "_head_done_at",
        "_headers",
        "_lent",
        "_lingering",
        "_loop",
        "_max_body",
        "_parser",
        "_paused",
        "_peer",
        "_peer_bytes",
        "_pending",
        "_queue",
        "_request",
        "_server",
        "_started",
        "_timer",
        "_transport",
        "_url",
        "_wake",
        "_why",
        "_worker",
        "_writable",
    )

    def __init__(self, server: LeanServer) -> None:
        self._server = server
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._peer = ""
        self._peer_bytes = b""
        self._url: bytes | bytearray = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._max_body = server.max_body  # the request's own (`body_limit`)
        self._asks_connection = False  # the request may ask for its persistence
        self._continue = False  # a 100 Continue owed once the answers before it are out
        self._queue: deque[Request | _Lend | _Refusal] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None  # the idle worker waits on it
        self._busy = False  # a request is being answered
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = _NEVER
        self._why = ""
        self._begun_at = 0.0
        self._head_done_at = 0.0
        self._paused = False
        self._writable: asyncio.Future[None] | None = None
        self._closed = False
        self._lingering = False  # answered a refusal: what arrives now is dropped
        self._eof = False  # the caller has sent all it will: closed once answered
        self._lent: Lent | None = None
        self._started = 0.0
        self._pending: Inbound | None = None
        self._request: Request | None = None  # the proxied request being read
        self._express: Express | None = None  # a request on the express lane
        self._answering: Request | None = None  # the worker's request now

    # -- the transport -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) and peer else ""
        self._peer_bytes = self._peer.encode(*CODEC)
        self._arm(self._server.server_cfg.header_timeout_s, "header_timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._answering is not None:
            self._answering.caller_gone = True  # sent nowhere more: nobody would read it
            self._answering.may_wait = False
        self._abandon_parked()
        # The parser holds this connection (its callbacks), and this connection the parser:
        # the cycle is broken here so both are freed now, not by the cycle collector.
        self._parser = _SPENT_PARSER
        self._server.connections.discard(self)
        self._disarm()
        if self._timer is not None:  # or the closed connection lives until it fires
            self._timer.cancel()
            self._timer = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self._lent is not None:
            self._lent.release()
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)  # the idle worker ends
        # A request on the express lane goes on: relayed, `express_done` writes nothing;
        # handed over, `express_fallback` drops it.
        # A request being answered finishes (its upstream answer is released); nothing
        # more is read or written.
        dropped = 0
        for item in self._queue:
            if isinstance(item, Request):
                _drop(item)
                dropped += 1
        self._queue.clear()
        if dropped:  # read whole, sent nowhere (more): nobody would read the answers
            self._server.proxy.stats.dropped["caller_gone"] += dropped
            log.info("request_dropped", reason="caller_gone", requests=dropped)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()
        if self._lent is not None and self._lent.handler is not None:
            self._lent.handler.pause_writing()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self._lent is not None and self._lent.handler is not None:
            self._lent.handler.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered and closing: the rest is read and dropped
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(upgrade_refused())
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.rejected)
            else:  # a bug of ours in a callback: answered, and logged without the bytes
                log.error("lean_callback_failed", error=type(cause).__name__)
                self._refuse(RequestRejected(500, "internal_error", "the router failed"))
        except httptools.HttpParserError as exc:
            self._refuse(_framing_error(exc))
        else:
            if self._head_bytes:  # a request is half read: its clock runs from its start
                cfg = self._server.server_cfg
                if self._pending is None:
                    self._arm_at(self._begun_at + cfg.header_timeout_s, "header_timeout")
                else:
                    self._arm_at(self._head_done_at + cfg.body_timeout_s, "body_timeout")

    def eof_received(self) -> bool:
        """The caller has sent all it will. A half-close (RFC 9112 9.6): it may still read,
        so what it sent whole is answered first (a send relayed, its answer lost, would be
        sent again by a caller that retries); then the connection closes. A request the EOF
        cut short is never taken anywhere. Nor is a request kept waiting for its session
        now: the caller could leave unseen meanwhile (after a half-close, only a write
        finds out), and its send would go out to nobody. It hears 503, nothing sent."""
        if not (self._busy or self._queue or self._express is not None):
            return False  # nothing owed: the transport closes
        self._eof = True
        self._head_bytes = 0  # a request begun is never whole now
        self._pending = self._request = None
        self._disarm()  # no request is read any more: no head, body or keep-alive clock
        if self._answering is not None:
            self._answering.may_wait = False
        self._abandon_parked()
        return True  # the transport stays open for the answers

    def _abandon_parked(self) -> None:
        """The caller went away (its EOF, or the connection lost) while the request being
        answered waits for its session, sent nowhere yet: the wait ends now (the proxy
        answers 503 `caller_closed`, written if the caller can still read), so the request
        is not sent later to nobody (a caller that retries would have it sent twice). A
        request already sent is answered."""
        worker = self._worker
        if worker is not None and self._busy and self._server.router.parking.abandon(worker):
            self._server.proxy.stats.dropped["caller_gone_while_waiting"] += 1
            log.info("request_dropped", reason="caller_gone_while_waiting")

    @property
    def half_closed(self) -> bool:
        """The caller has sent all it will, and is still owed answers."""
        return self._eof

    @property
    def mid_request(self) -> bool:
        """A request has begun and is not read whole yet."""
        return bool(self._head_bytes)

    def close_if_idle(self) -> None:
        if not self._busy and not self._queue and not self._head_bytes:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- parser callbacks ------------------------------------------------------------------

    # No on_message_begin: a request begins with its target's first bytes (llhttp calls
    # `on_url` before any other callback of a request, with what it has of the target at
    # the end of each read). One callback less per request (each one costs ~3,000
    # instructions); what a message leaves behind is reset when it completes.
    on_message_begin = None

    def on_url(self, url: bytes) -> None:
        have = self._url
        if not have:
            self._url = url  # the whole target in one piece: the common case
            self._head_bytes = 1  # a request has begun (close_if_idle waits for it)
            self._started = time.perf_counter()
            self._begun_at = self._loop.time()
            self._deadline = _NEVER  # the idle connection's keep-alive clock stops
        elif isinstance(have, bytearray):
            have += url
        else:
            self._url = bytearray(have) + url  # in pieces: gathered without copying it all
        self._head_bytes += len(url)
        if self._head_bytes > self._server.max_head:
            raise _rejected(414, "uri_too_long", "the request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._pending is not None:
            # A chunked body's trailer: never a header of the request, dropped; counted with
            # the head, so an endless trailer section is refused like an endless head.
            if self._head_bytes > self._server.max_head:
                raise _rejected(431, "header_fields_too_large", "the request's trailer is too long")
            return
        if self._head_bytes > self._server.max_head:
            raise _rejected(
                431,
                "header_fields_too_large",
                f"the request head is over {self._server.max_head} bytes",
            )
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        raw_method = self._parser.get_method()
        method = raw_method.decode("ascii")
        if method == "CONNECT":  # a tunnel: llhttp completes it as a message, then upgrades
            raise _rejected(400, "upgrade_refused", "the router does not open tunnels (CONNECT)")
        url = self._url
        if url[:1] == b"/" and _HASH not in url:  # an int: `in` with bytes raises inside
            # Origin-form, the common one (llhttp has checked its bytes): path and query.
            raw_path, _, raw_query = bytes(url).partition(b"?")
        else:
            try:
                parsed = httptools.parse_url(bytes(url))
            except httptools.HttpParserInvalidURLError:
                raise _rejected(400, "bad_request", "the request target is not a URL") from None
            # Absolute-form (`GET http://host/path`): the path is routed; the host is never
            # where the request goes. A fragment never goes anywhere.
            raw_path, raw_query = parsed.path or b"/", parsed.query
        # The target as it goes upstream: path and query as sent (a fragment never goes).
        target = raw_path + b"?" + raw_query if raw_query else raw_path
        path = raw_path.decode(*CODEC)
        query = raw_query.decode(*CODEC) if raw_query else ""
        try:
            mine = self._server.whose(method, path)
        except RequestRejected as exc:
            raise _Refused(exc) from None
        fields = read_fields(self._headers)
        length = fields.content_length
        server = self._server
        limit = self._max_body = server.max_body if mine is not None else server.body_limit(path)
        # llhttp has checked it is one number; only its size is ours to refuse.
        if length is not None and int(length) > limit:
            raise _Refused(_too_large(limit))
        has_body = length is not None and length.strip() != b"0"
        if fields.unusual:
            has_body = self._check_unusual(fields, has_body, mine)
        else:
            self._asks_connection = False
        if mine is None:
            self._pending = Inbound(method, path, query, None, b"", self._peer, raw=self._headers)
            self._request = None
        else:
            lane_fields = (
                forward_fields(fields, self._peer_bytes) if self._server.lane is not None else b""
            )
            self._pending = self._request = Request(
                method, path, query, self._peer, self._headers, mine, self._started,
                raw_method, target, lane_fields,
            )  # fmt: skip
        if has_body:
            self._head_done_at = self._loop.time()

    def _check_unusual(self, fields: Fields, has_body: bool, mine: Match | None) -> bool:
        """The checks of the fields most requests do not have (`Fields.unusual`); whether
        the request has a body."""
        if fields.upgrade:
            raise _Refused(upgrade_refused())
        if fields.hosts != 1:
            refused = hosts_refusal(fields.hosts, self._parser.get_http_version())
            if refused is not None:
                raise _Refused(refused)
        if fields.chunked and (refused := coding_refusal(fields.codings)) is not None:
            raise _Refused(refused)
        # Whether llhttp's persistence may come from the request itself (a trailer of a
        # chunked body may say Connection too): then its version is asked for.
        self._asks_connection = bool(fields.connection) or fields.proxy_connection or fields.chunked
        has_body = has_body or fields.chunked
        if fields.expect_continue and has_body and self._parser.get_http_version() == "1.1":
            if mine is not None and mine.path_session is not None:
                # A session id the request would be refused for: refused now, rather than
                # asking for a body only to refuse it once read.
                try:
                    path_session(mine.path_session, self._server.proxy.ids)
                except RequestRejected as exc:
                    raise _Refused(exc) from None
            # After the answers before it: a 100 ahead of them would read as theirs.
            if self._queue or self._busy:
                self._continue = True
            elif self._transport is not None:
                self._transport.write(CONTINUE)
        return has_body

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._max_body:
            raise _Refused(_too_large(self._max_body))
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._head_bytes = 0
        self._continue = False  # the body came: no 100 is owed any more
        self._deadline = _NEVER  # `_disarm`
        if self._server.closing:
            # Read while the router stops: not sent anywhere, and the caller hears so
            # (past the drain nobody would answer it).
            self._refuse(shutdown_cut())
            self._pending = self._request = None
            return
        inbound = self._pending
        assert inbound is not None
        # What the next request gathers starts anew here (see `on_message_begin`).
        url, headers = self._url, self._headers
        self._url = b""
        self._headers = []
        body = b"".join(self._body) if self._body else b""
        self._body = []
        self._body_bytes = 0
        parser = self._parser
        persists = parser.should_keep_alive()
        keep = persists and not self._server.closing
        # A request that persists and cannot have asked to (`_asks_connection`) is HTTP/1.1:
        # 1.0 persists only when asked. httptools formats the version string at each call.
        version = "1.1" if persists and not self._asks_connection else parser.get_http_version()
        if version not in SERVED_VERSIONS:
            raise _Refused(not_served(version))  # answered, and nothing sent
        self._pending = None  # (kept until here: a refusal above reads its method)
        # The request carries its start from here on; a request refused before its target
        # (a bad method next on this connection) must not be timed from this one's start.
        self._started = 0.0
        item = self._request
        if item is None:
            raw = request_bytes(inbound.method, bytes(url), version, headers, body)
            self._queue.append(_Lend(raw, keep, inbound.method == "HEAD"))
        else:
            self._request = None
            item.body = body
            item.keep_alive = keep
            item.http10 = version == "1.0"
            lane = self._server.lane
            if (
                lane is not None
                and not self._queue
                and not self._busy
                and item.raw_method != b"HEAD"  # its answer announces a body it has not
                and (self._writable is None or self._writable.done())
                and self._express_start(lane, item)
            ):
                return
            self._queue.append(item)
        if len(self._queue) >= _KEEP_READING_QUEUE and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        self._kick()

    # -- answering, in order -------------------------------------------------------------

    def _express_start(self, lane: Lane, item: Request) -> bool:
        """Whether the request is taken: on the express lane, or answered already."""
        got = lane.start(self, item)
        if got is None:
            return False
        if isinstance(got, Reply):
            keep = item.keep_alive and not self._server.closing
            self._write_reply(got, item, keep)
            self._answered(keep)
            return True
        self._express = got
        self._busy = True
        return True

    def express_done(self, data: bytes, keep: bool) -> None:
        """The express lane's answer (its whole bytes); the connection goes on."""
        self._express = None
        self._busy = False
        if self._closed or self._transport is None:
            return
        self._transport.write(data)
        self._answered(keep)

    def _answered(self, keep: bool) -> None:
        """After an answer written outside the worker: close, or go on (what was pipelined
        behind it, else the keep-alive clock: a waiting worker armed nothing since)."""
        if self._closed or self._transport is None:
            return
        if not keep or (self._eof and not self._queue):
            self._close()
            return
        if self._continue and not self._queue:
            self._continue = False
            self._transport.write(CONTINUE)
        if self._queue:
            self._kick()  # what was pipelined behind it
        elif not self._head_bytes:
            keepalive_s = self._server.server_cfg.keepalive_timeout_s
            self._arm_at(self._loop.time() + keepalive_s, "keepalive_timeout")

    def express_fallback(self, request: Request) -> None:
        """The express lane hands the request over: answered first, by the worker, which
        counts as in flight from now (a shutdown waits for it)."""
        assert isinstance(request, Request)
        self._express = None
        self._busy = False
        if self._closed:
            # The caller is gone: nobody would read the answer, and the request is not
            # taken further (a not-here answer is not sent elsewhere behind its back).
            _drop(request)
            self._server.proxy.stats.dropped["caller_gone"] += 1
            log.info("request_dropped", reason="caller_gone")
            return
        self._queue.appendleft(request)
        self._kick()
        if self._worker is not None:
            self._server.router.inflight.add(self._worker)

    def _kick(self) -> None:
        """Something is queued: start the connection's worker, or wake it (not while a
        request is on the express lane: it answers first, then kicks)."""
        if self._express is not None:
            return
        if self._worker is None:
            self._worker = self._loop.create_task(self._work())
        elif self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _work(self) -> None:
        """The connection's one worker: answers what is queued, in order, then waits for
        more (one task for the connection's life, not one per request)."""
        router = self._server.router
        queue = self._queue
        try:
            while not self._closed:
                if not queue:
                    if self._server.closing or self._eof:
                        self._close()
                        return
                    if not self._head_bytes:
                        self._arm(self._server.server_cfg.keepalive_timeout_s, "keepalive_timeout")
                    self._wake = self._loop.create_future()
                    await self._wake
                    self._wake = None
                    continue
                if self._writable is not None and not self._writable.done():
                    # The caller is not reading its answers: write no more of them (and
                    # read no more requests) until it does.
                    if not await self._drained():
                        return
                    continue
                item = queue.popleft()
                if self._paused and len(queue) < _KEEP_READING_QUEUE // 2:
                    assert self._transport is not None
                    self._transport.resume_reading()
                    self._paused = False
                if isinstance(item, _Refusal):
                    self._write_refusal(item)
                    return
                self._busy = True
                if isinstance(item, _Lend):
                    keep = await self._lend(item)
                else:
                    task = asyncio.current_task(self._loop)
                    assert task is not None
                    router.inflight.add(task)
                    token = CURRENT_REQUEST.set(RequestId(item))
                    self._answering = item
                    try:
                        keep = await self._answer(item)
                    finally:
                        self._answering = None
                        CURRENT_REQUEST.reset(token)
                        router.inflight.discard(task)
                self._busy = False
                if not keep:
                    self._close()
                    return
                if self._continue and not queue and self._transport is not None:
                    self._continue = False
                    self._transport.write(CONTINUE)
        finally:
            self._busy = False
            self._worker = self._wake = None
            # Counted in flight by `express_fallback` before it ran: a caller reset in the
            # same loop pass ends it before `_answer` (once left there, a done task that
            # kept the next shutdown's drain waiting for its whole grace).
            task = asyncio.current_task(self._loop)
            if task is not None:
                router.inflight.discard(task)

    async def _drained(self) -> bool:
        """Wait until the caller has read enough of what was written; False (the
        connection cut) when it reads nothing for `server.write_timeout_s`."""
        writable = self._writable
        if writable is None or writable.done():
            return True
        try:
            async with asyncio.timeout(self._server.server_cfg.write_timeout_s):
                await asyncio.shield(writable)
        except TimeoutError:
            log.info("caller_not_reading", timeout_s=self._server.server_cfg.write_timeout_s)
            self.abort()
            return False
        return not self._closed

    async def _lend(self, item: _Lend) -> bool:
        transport = self._transport
        if transport is None:
            return False
        lent = self._lent = Lent(transport, self._loop, head_only=item.head_only)
        paused = self._writable is not None and not self._writable.done()
        try:
            keep = await answer_by_aiohttp(self._server.web, lent, item.raw, paused=paused)
        except Exception as exc:  # a bug of ours: no hang, the connection ends
            log.error("lent_request_failed", error=type(exc).__name__, exc_info=True)
            self.abort()
            return False
        finally:
            self._lent = None
        return keep and item.keep_alive and not self._server.closing

    async def _answer(self, item: Request) -> bool:
        """Answer one request; whether the connection stays open."""
        head_sent = False
        try:
            call, sent = item.call, item.sent
            # The Call refers to the request: unlinked, the pair is freed by reference
            # counting when the answer is out, not by the cycle collector.
            item.call = item.sent = None
            if self._eof:
                item.may_wait = False  # (see `eof_received`)
            answer: Answer = await self._server.proxy.answer(
                item, item.match, item.started, call=call, sent=sent
            )
            # After a half-close, the last answer says the connection ends with it.
            keep = item.keep_alive and not self._server.closing
            keep = keep and not (self._eof and not self._queue)
            if isinstance(answer, Reply):
                self._write_reply(answer, item, keep)
                return keep
            head_sent = True
            return await self._stream(answer, item, keep)
        except asyncio.CancelledError:
            if not self._server.router.stopping or head_sent:
                raise
            task = asyncio.current_task(self._loop)
            if task is not None:
                task.uncancel()
            self._write_reply(error_reply(shutdown_cut()), item, False)
            return False
        except Exception as exc:
            # A bug of ours: the caller hears so rather than waiting on a silent socket.
            log.error("request_failed", error=type(exc).__name__, exc_info=True)
            if head_sent:
                self.abort()
            else:
                failed = RequestRejected(500, "internal_error", "the router failed")
                self._write_reply(error_reply(failed), item, False)
            return False

    def _write_reply(
        self, reply: Reply, item: Request | None, keep: bool, *, head_only: bool = False
    ) -> None:
        transport = self._transport
        # Closing: a shutdown's cut, or an abort, since the worker was woken to answer.
        if transport is None or self._closed or transport.is_closing():
            return
        http10 = item is not None and item.http10
        head_only = head_only or (item is not None and item.method == "HEAD")
        head = answer_head(
            reply.status,
            reply.reason,
            reply.headers,
            len(reply.body),
            not keep,
            http10_keep_alive=http10 and keep,
        )
        transport.write(head if head_only or not reply.body else head + reply.body)

    def _write_refusal(self, refusal: _Refusal) -> None:
        reply = self._server.proxy.refuse(refusal.rejected, refusal.started)
        self._write_reply(reply, None, False, head_only=refusal.head_only)
        self._disarm()
        if self._transport is not None:
            linger(self._transport)

    async def _stream(self, answer: Streamed, item: Request, keep: bool) -> bool:
        up = answer.upstream
        transport = self._transport
        try:
            if transport is None or self._closed:
                return False
            bodyless = item.method == "HEAD" or up.status in BODYLESS_STATUSES
            headers = answer_headers(up)
            if bodyless:
                transport.write(
                    answer_head(
                        up.status,
                        up.reason,
                        headers,
                        None,
                        not keep,
                        http10_keep_alive=item.http10 and keep,
                    )
                )
                return keep
            length = headers.popone("Content-Length", None)
            known = length is not None and length.isdigit()
            # A body of unknown length to an HTTP/1.0 caller ends with the connection.
            keep = keep and (known or not item.http10)
            chunked = not known and not item.http10
            transport.write(
                answer_head(
                    up.status,
                    up.reason,
                    headers,
                    int(length) if known and length is not None else None,
                    not keep,
                    chunked=chunked,
                    http10_keep_alive=item.http10 and keep,
                )
            )
            try:
                async for chunk in up.chunks():
                    if self._closed:
                        return False
                    if not chunk:
                        continue  # an empty chunk would end a chunked body early
                    transport.write(wire_chunk(chunk) if chunked else chunk)
                    if not await self._drained():  # the caller reads slower than Node answers
                        return False
            except UpstreamError as exc:
                # The head is sent already: only cutting the connection tells the caller
                # that the body is not whole.
                log.warning("upstream_body_broken", instance=exc.instance, error=type(exc).__name__)
                transport.abort()
                return False
            if chunked:
                transport.write(CHUNKED_END)
            return keep
        finally:
            up.release()

    # -- refusing and closing --------------------------------------------------------------

    def _refuse(self, rejected: RequestRejected) -> None:
        """Answer after what is already queued, then close; what arrives now is dropped."""
        log.info("request_refused", reason=rejected.code, status=rejected.status)
        # llhttp knows the method once the target has begun (or the head was read whole).
        begun = self._head_bytes > 0 or self._pending is not None
        head_only = begun and self._parser.get_method() == b"HEAD"
        self._lingering = True
        self._head_bytes = 0
        self._disarm()
        started = self._started or time.perf_counter()
        self._queue.append(_Refusal(rejected, started, head_only))
        self._kick()

    def _close(self) -> None:
        self._disarm()
        if self._transport is not None and not self._closed:
            self._transport.close()

    # One timer per connection, and a deadline it checks when it fires: a request that
    # arrives whole (the common one) arms and cancels nothing; a busy keep-alive
    # connection's timer fires once per keep-alive period, not once per request.

    def _arm(self, delay_s: float, why: str) -> None:
        self._arm_at(self._loop.time() + delay_s, why)

    def _arm_at(self, deadline: float, why: str) -> None:
        self._deadline = deadline
        self._why = why
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._expired)

    def _disarm(self) -> None:
        self._deadline = _NEVER

    def _expired(self) -> None:
        self._timer = None
        if self._closed or self._lingering or self._deadline == _NEVER:
            return
        if self._loop.time() < self._deadline:  # moved later since: wait for it
            self._timer = self._loop.call_at(self._deadline, self._expired)
            return
        if self._paused and self._why != "keepalive_timeout":
            # We stopped reading (answers queued): the caller is not the slow one.
            self._arm(self._server.server_cfg.header_timeout_s, self._why)
            return
        why = self._why
        if why == "keepalive_timeout" or not self._head_bytes:
            self._close()  # nothing begun: nothing to answer
            return
        self._refuse(RequestRejected(408, "request_timeout", "the request did not arrive in time"))


def _drop(item: Request) -> None:
    """A queued request that will not be answered: an attempt the express lane made is
    released (its connection dropped, its pool slot freed)."""
    item.call = None  # (see `_answer`)
    if item.sent is not None:
        item.sent.response.release()
        item.sent = None


def _too_large(limit: int) -> RequestRejected:
    return RequestRejected(
        413, "payload_too_large", f"the request body is over {limit} bytes", limit_bytes=limit
    )


def _framing_error(exc: Exception) -> RequestRejected:
    # llhttp's reason names the rule broken, never the bytes.
    return RequestRejected(400, "bad_request", f"malformed request: {exc}")


__all__ = ["LeanConnection", "LeanServer"]
