"""The express lane: the common proxied request answered from callbacks, with no task.

A session request whose owner is fresh in the directory's cache and ready to take it, when
the pool holds an idle connection to that owner, is written there at once, in the caller's
own bytes (`LeanForwarder.write`); its answer is read on the connection's callbacks
(`H1Response.listener`) and, when it is plain (a final status that is not one of the
profile's "not here" answers, a small body with a Content-Length, read whole), relayed to
the caller in its own bytes (`wire.relay_head`). No task, future or decoded header is made.

Anything else goes the full way (`Proxy.answer`, in the connection's worker), and so does
this request the moment its answer is anything but plain: a "not here", an error, a cut, a
timeout, a large or streamed body. The full way then goes on from the attempt already made
(`proxy.Sent`): it awaits that answer where it would have sent, so going one way or the
other never sends a request twice, and every decision (retry, rediscovery, parking) is the
full way's own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from .errors import RequestRejected
from .exchange import Inbound, Reply, error_reply
from .h1 import LeanForwarder
from .h1response import H1Response
from .httpio import SMALL_BODY_BYTES
from .inflight import InFlight
from .pool import Instance
from .proxy import Call, Proxy, Sent
from .rules import Match
from .runtime import shutdown_cut
from .stores.base import Entry
from .wire import answer_head, relay_head

TICK_S = 0.1  # how often the lane looks for requests past their read timeout
IDLE_TICKS = 50  # ...and how many ticks it goes on with none on the lane before it stops


class Request(Inbound):
    """A proxied request read whole by the lean front: the `Inbound` the proxy reads, and
    what the lane and the front need of it besides (one object per request)."""

    __slots__ = (
        "call",
        "fields",
        "http10",
        "keep_alive",
        "match",
        "raw_method",
        "sent",
        "started",
        "target",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query_string: str,
        peer: str,
        raw: list[tuple[bytes, bytes]],
        match: Match,
        started: float,
        raw_method: bytes,
        target: bytes,
        fields: bytes,
    ) -> None:
        # Inbound's fields set here, not by its __init__: one call less per request.
        self.method = method
        self.path = path
        self.query_string = query_string
        self._headers = None
        self.raw = raw
        self.body = b""
        self.peer = peer
        self.scheme = "http"
        self._query = None
        self.caller_gone = False
        self.may_wait = True
        self.match = match
        self.started = started  # perf_counter at its arrival
        self.raw_method = raw_method  # the method as it came
        self.target = target  # the path and query as the caller sent them
        self.fields = fields  # its header lines as they go upstream (X-Forwarded-* included)
        self.keep_alive = True  # both set once the request is read whole
        self.http10 = False
        self.call: Call | None = None  # prepared by the lane
        self.sent: Sent | None = None  # ...and the attempt it made


class Caller(Protocol):
    """The caller's connection (`lean.LeanConnection`)."""

    def express_done(self, data: bytes, keep: bool) -> None: ...

    def express_fallback(self, request: Request) -> None: ...


class Lane:
    """What the lane needs of the router, held once per server."""

    def __init__(
        self, proxy: Proxy, forwarder: LeanForwarder, inflight: InFlight, closing: ClosingFlag
    ) -> None:
        self.proxy = proxy
        self.forwarder = forwarder
        self.inflight = inflight
        self.closing = closing
        self.loop = asyncio.get_running_loop()
        self.not_here = proxy.profile.not_here_statuses
        self.stats = proxy.stats
        self.sweeper: asyncio.TimerHandle | None = None
        self._idle_ticks = 0

    # One timer for every request on the lane, not one each (a timer made and cancelled per
    # request cost ~2 us): it ticks while requests are on the lane (each Express adds itself
    # to `inflight.quick` and starts `sweeper` when it is not running), and a request whose
    # read timeout has passed is timed out at the next tick (so up to `TICK_S` late).

    def sweep(self) -> None:
        quick = self.inflight.quick
        if not quick:
            self._idle_ticks += 1
            if self._idle_ticks > IDLE_TICKS:
                self.sweeper = None
                return
        # Rescheduled first: a failure below must not stop the timeouts of the rest.
        self.sweeper = self.loop.call_later(TICK_S, self.sweep)
        if quick:
            self._idle_ticks = 0
            now = self.loop.time()
            late = [q for q in quick if isinstance(q, Express) and q.deadline <= now]
            for ex in late:
                ex.answer.time_out()  # the answer tells `on_news`, which hands over

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None

    def start(self, caller: Caller, req: Request) -> Express | Reply | None:
        """The request on its way (an Express), the caller's answer when the request cannot
        be used (a Reply), or None: the full way takes it (`req.call` set when it was
        prepared here)."""
        proxy = self.proxy
        try:
            call = proxy.prepare(req, req.match)
        except RequestRejected as exc:
            reply = error_reply(exc)
            proxy.count(None, reply.status, req.started)
            return reply
        req.call = call
        if call.rewritten:
            return None  # the upstream key went in: the full way encodes what changed
        where = proxy.ready(call)
        if where is None:
            return None
        inst, entry = where
        rule = call.match.rule
        answer = self.forwarder.write(
            inst, req.raw_method, req.target, req.fields, call.body, rule.read_timeout_s
        )
        if answer is None:
            return None  # no idle connection: the full way waits for one, or opens one
        call.target = inst.name
        return Express(self, caller, req, call, inst, entry, answer)


class ClosingFlag(Protocol):
    @property
    def closing(self) -> bool: ...


class Express:
    """One request on the lane, from the send to its answer (or to the hand-over)."""

    __slots__ = (
        "_finished",
        "answer",
        "call",
        "caller",
        "deadline",
        "entry",
        "head_seen",
        "inst",
        "lane",
        "req",
        "started",
    )

    def __init__(
        self,
        lane: Lane,
        caller: Caller,
        req: Request,
        call: Call,
        inst: Instance,
        entry: Entry,
        answer: H1Response,
    ) -> None:
        self.lane = lane
        self.caller = caller
        self.req = req
        self.call = call
        self.inst = inst
        self.entry = entry
        self.answer = answer
        self.started = time.perf_counter()
        self.deadline = lane.loop.time() + call.match.rule.read_timeout_s
        self.head_seen = False
        self._finished: asyncio.Future[None] | None = None
        inst.inflight += 1
        answer.listener = self.on_news
        lane.inflight.quick.add(self)  # watched by the lane's one timer (`Lane.sweep`)
        if lane.sweeper is None:
            lane.sweeper = lane.loop.call_later(TICK_S, lane.sweep)

    def on_news(self) -> None:
        """Called by the answer whenever bytes, the end, an error or the timeout came."""
        answer = self.answer
        if answer.failed:
            self._hand_over()
            return
        if not answer.final:
            return
        lane = self.lane
        if not self.head_seen:
            self.head_seen = True
            self.inst.inflight -= 1
            lane.proxy.answered_by(self.inst, self.started)
            status = answer.status
            length = answer.length
            if (
                status in lane.not_here  # the full way reads it and decides
                or status < 200
                or status in (204, 304)
                or length is None  # framed by chunks or by the close: streamed
                or length > SMALL_BODY_BYTES
            ):
                self._hand_over()
                return
        if not answer.done:
            return
        # Relayed: the whole answer is here, and plain.
        answer.listener = None
        lane.inflight.quick.discard(self)
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)
        req = self.req
        body = answer.body()
        keep = req.keep_alive and not lane.closing.closing
        head = relay_head(
            answer.status,
            answer.kept_head,
            answer.named,
            len(body),
            not keep,
            http10_keep_alive=req.http10 and keep,
        )
        answer.release()
        self.call.answered = True
        req.call = None  # its Call refers to it: the pair is freed now, not by the collector
        lane.stats.express["relayed"] += 1
        lane.proxy.count(self.call, answer.status, req.started)
        self.caller.express_done(head + body if body else head, keep)

    def _hand_over(self) -> None:
        self.answer.listener = None
        if not self.head_seen:
            self.inst.inflight -= 1
        self.lane.stats.express["handed_over"] += 1
        req = self.req
        # The wall time of the send: when what its answer says was true.
        sent_at = time.time() - (time.perf_counter() - self.started)
        req.sent = Sent(self.inst, self.answer, self.started, self.entry, self.head_seen, sent_at)
        # The worker counts as in flight before this stops counting: a shutdown always
        # sees one of them.
        self.caller.express_fallback(req)
        self._end()

    def _end(self) -> None:
        self.answer.listener = None
        self.lane.inflight.quick.discard(self)
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    # -- a shutdown (inflight.Quick) ----------------------------------------------------------

    def finished(self) -> asyncio.Future[None]:
        if self._finished is None:
            self._finished = self.lane.loop.create_future()
        return self._finished

    def cut(self) -> None:
        """The shutdown's grace is over and no answer came: the caller hears so."""
        self._end()
        if not self.head_seen:
            self.inst.inflight -= 1
        self.answer.release()  # not read to its end: the connection is dropped
        reply = error_reply(shutdown_cut())
        self.lane.proxy.count(self.call, reply.status, self.req.started)
        self.req.call = None  # see `on_news`
        head = answer_head(reply.status, reply.reason, reply.headers, len(reply.body), True)
        self.caller.express_done(head + reply.body, False)


__all__ = ["Express", "Lane", "Request"]
