"""The request handler: extract -> resolve -> forward, and the I/O around `retry.decide`
(send elsewhere, park, answer) (DESIGN.md).

One request costs, when its session has not moved: a rule match, one dict lookup in the
directory cache, and one upstream attempt whose answer is streamed back.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote

import structlog
from aiohttp import web
from multidict import CIMultiDict

from . import retry
from .answers import (
    CALLER_CLOSED,
    caller_gone,
    no_healthy_instance,
    not_found_answer,
    not_on_rediscovered,
    session_unavailable,
)
from .apikeys import KeyPolicy
from .config import ParkingConfig
from .directory import Directory
from .discovery import Discovery, Found
from .errors import (
    ConnectFailed,
    NotReached,
    RequestRejected,
    UpstreamError,
    says_down,
)
from .exchange import Answer, Inbound, Reply, buffered, error_reply, upstream_headers
from .forward import Forwarder, PendingResponse, UpstreamRequest, UpstreamResponse
from .httpio import read_body, send_answer, settle
from .parking import ABANDONED, Parking, Unparked, prefer_wait_s
from .pool import Instance, Pool, State
from .pooled import PoolRoutes
from .profiles import Profile
from .resolve import Ask, Resolver
from .retry import Action, Known, Outcome
from .rules import Match, Rule, RuleTable, SessionIdPolicy, check_path, extract_session
from .rules import parse_json_object as parse_json
from .stores.base import Entry, Status

log = structlog.get_logger("wa_router.proxy")
_NO_QUERY: dict[str, str] = {}
# Sends per request: the first, and more only after answers that prove the request was not
# processed (nothing sent, "not here", "not connected"), or one re-send where that is
# harmless. A restore race can move a session twice in a second, hence more than two.
MAX_SENDS = 4
MAX_PARKS = 3  # waits per request, all within one deadline
# Routes remembered by (method, raw path): callers ask the same few paths over and over (one
# per session and route). Bounded: forgotten all at once when full, a path made up by a
# caller costs one entry until then.
ROUTE_MEMO = 16384
ROUTE_MEMO_PATH = 256  # longer paths are not remembered (a caller's junk costs no memory)


@dataclass(slots=True)
class ProxyStats:
    requests: int = 0
    retries: int = 0
    # (route kind, instance or "none", status class) -> requests; read by metrics.py
    outcomes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    # "answered" (the retry got an instance's answer) | "failed"
    retry_outcomes: Counter[str] = field(default_factory=Counter)
    # 503 session_unavailable by reason (timeout, full, no_wait, attempts, shutdown)
    unavailable: Counter[str] = field(default_factory=Counter)
    # express-lane requests (express.py): "relayed" | "handed_over"
    express: Counter[str] = field(default_factory=Counter)
    # Requests taken no further because their caller had gone, by where: "caller_gone" (a
    # send not made, or not made elsewhere) | "caller_gone_while_waiting" (a wait ended)
    dropped: Counter[str] = field(default_factory=Counter)


_CLASSES = {n: f"{n}xx" for n in range(1, 6)}


def status_class(status: int) -> str:
    return _CLASSES.get(status // 100) or f"{status // 100}xx"


class _AioInbound(Inbound):
    """A request the aiohttp front read. aiohttp tells a handler neither that its caller
    left nor that it half-closed (`serve` runs it without handler cancellation): whether
    the caller is gone is asked of its connection, before each send and each wait."""

    __slots__ = ("_gone", "_wait", "_web")

    def __init__(self, web_request: web.BaseRequest, *args: Any) -> None:
        self._web = web_request
        super().__init__(*args)

    @property
    def caller_gone(self) -> bool:
        transport = self._web.transport
        return self._gone or transport is None or transport.is_closing()

    @caller_gone.setter
    def caller_gone(self, value: bool) -> None:
        self._gone = value

    @property
    def may_wait(self) -> bool:
        return self._wait and not self.caller_gone

    @may_wait.setter
    def may_wait(self, value: bool) -> None:
        self._wait = value


@dataclass(slots=True)
class Call:
    """One caller request, as it will be sent upstream."""

    request: Inbound
    match: Match
    method: str
    path_qs: str
    # The headers as they go upstream: made when first needed (the express lane sends the
    # caller's own bytes), or when the api key is injected into them.
    headers: CIMultiDict[str] | None
    body: bytes
    doc: dict[str, Any] | None = None  # the body parsed, when something needed it
    session: str | None = None
    probe_key: str | None = None
    probe_key_known: bool = False
    target: str = "none"  # the instance that answered (or was last tried)
    retried: bool = False
    answered: bool = False  # an instance's answer was relayed
    wait_s: float | None = None  # how long it may park (worked out when first needed)
    parked_s: float = 0.0
    rewritten: bool = False  # the upstream key went in: path, headers or body changed
    cached: Entry | None = None  # the directory's cached entry, when `ready` read it

    @property
    def rule(self) -> Rule:
        return self.match.rule

    def upstream(self) -> UpstreamRequest:
        if self.headers is None:
            self.headers = upstream_headers(self.request)
        return UpstreamRequest(
            self.method, self.path_qs, self.headers, self.body, self.rule.read_timeout_s
        )


@dataclass(slots=True)
class Sent:
    """A first attempt the lean front's express lane made itself (`express.py`): the proxy
    takes the request from there, awaiting this answer where it would have sent."""

    target: Instance
    response: PendingResponse
    started: float  # perf_counter at the send
    entry: Entry | None  # what the directory said, as `Resolver.note` keeps it
    head_seen: bool  # its latency and the instance's health are counted already
    sent_at: float  # wall time of the send


class Proxy:
    def __init__(
        self,
        *,
        profile: Profile,
        rules: RuleTable,
        ids: SessionIdPolicy,
        keys: KeyPolicy,
        pool: Pool,
        directory: Directory,
        discovery: Discovery,
        forwarder: Forwarder,
        max_body_bytes: int,
        probe_timeout_s: float,
        parking: Parking,
        parking_cfg: ParkingConfig,
    ) -> None:
        self.profile = profile
        self.rules = rules
        self.ids = ids
        self.keys = keys
        self.pool = pool
        self.directory = directory
        self.discovery = discovery
        self.forwarder = forwarder
        self.max_body_bytes = max_body_bytes
        self.parking = parking
        self.parking_cfg = parking_cfg
        self.stats = ProxyStats()
        self._routes: dict[tuple[str, str], Match] = {}
        self._path_ids: dict[str, str] = {}  # a path segment -> the session id it names, checked
        self.resolver = Resolver(
            pool=pool,
            directory=directory,
            discovery=discovery,
            parking=parking,
            restore_window_s=parking_cfg.restore_window_s,
        )
        self.pooled = PoolRoutes(
            pool=pool, profile=profile, forwarder=forwarder, probe_timeout_s=probe_timeout_s
        )
        # Upstream latency (instance, seconds to the response head); metrics.py sets it.
        self.observe_latency: Callable[[str, float], None] | None = None
        # The caller's side: (route kind, seconds from the request to its answer).
        self.observe_request: Callable[[str, float], None] | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp side's entry (the lean server calls `route` and `answer` itself)."""
        started = time.perf_counter()
        url = request.rel_url
        try:
            match = self.route(request.method, url.raw_path)
            body = await read_body(request, self.max_body_bytes)
        except RequestRejected as exc:
            return await send_answer(request, self.refuse(exc, started))
        inbound = _AioInbound(
            request,
            request.method,
            url.raw_path,
            url.raw_query_string,
            request.headers,
            body,
            request.remote or "",
            request.scheme,
        )
        return await send_answer(request, await self.answer(inbound, match, started))

    def route(self, method: str, raw_path: str) -> Match:
        """The rule for this request; RequestRejected (400) when the path is unsafe or no
        rule says which session it is for. Before the body is read."""
        key = (method, raw_path)
        match = self._routes.get(key)
        if match is not None:
            return match
        check_path(raw_path)
        match = self.rules.match(method, raw_path)
        if match is None:
            raise RequestRejected(
                400,
                "bad_request",
                f"no route rule matches {method} {unquote(raw_path)}: the router cannot tell "
                "which session this request is for",
            )
        if len(raw_path) <= ROUTE_MEMO_PATH:
            _remember(self._routes, key, match)
        return match

    def refuse(self, exc: RequestRejected, started: float) -> Reply:
        """A request refused before it had a rule and a body: counted, answered."""
        self.stats.requests += 1
        self.stats.outcomes[("rejected", "none", f"{exc.status // 100}xx")] += 1
        if self.observe_request is not None:
            self.observe_request("rejected", time.perf_counter() - started)
        return error_reply(exc)

    async def answer(
        self,
        request: Inbound,
        match: Match,
        started: float,
        *,
        call: Call | None = None,
        sent: Sent | None = None,
    ) -> Answer:
        """extract -> resolve -> forward for one request read whole; `started` is its
        arrival (perf_counter), for the caller-side latency. `call` and `sent`: the request
        as the express lane prepared it, and the attempt it made (the proxy goes on from
        there)."""
        answer: Answer
        try:
            if call is None:
                call = self.prepare(request, match)
            kind = call.rule.kind
            if kind == "pool_health":
                answer = await self.pooled.health(call.upstream())
            elif kind == "pool_list":
                answer = await self.pooled.listing(call.upstream())
            elif kind == "any_instance":
                answer = await self._forward_any(call)
            else:
                try:
                    answer = await self._forward_session(call, sent)
                except BaseException:
                    if sent is not None:  # never left held, whatever happened (idempotent)
                        sent.response.release()
                    raise
        except RequestRejected as exc:
            if call is not None and call.session is not None and "session" not in exc.extra:
                exc.extra["session"] = call.session
            answer = error_reply(exc)
        status = answer.status if isinstance(answer, Reply) else answer.upstream.status
        self.count(call, status, started)
        return answer

    def count(self, call: Call | None, status: int, started: float) -> None:
        """An answer going back (None: the request was refused before it had a Call)."""
        stats = self.stats
        if call is None:
            kind = "rejected"
            stats.outcomes[("rejected", "none", status_class(status))] += 1
        else:
            kind = call.match.rule.kind
            # `status_class`, inline for the classes there are (one call less per request).
            klass = _CLASSES.get(status // 100) or status_class(status)
            stats.outcomes[(kind, call.target, klass)] += 1
            if call.retried:
                stats.retry_outcomes["answered" if call.answered else "failed"] += 1
        if self.observe_request is not None:
            # To the head: a streamed body's own duration is the caller's and Node's.
            self.observe_request(kind, time.perf_counter() - started)

    # -- extract ---------------------------------------------------------------------------

    def prepare(self, request: Inbound, match: Match) -> Call:
        """The request as it will go upstream (counted here: every request is prepared
        once); RequestRejected (400) for a session id or a body that cannot be used."""
        self.stats.requests += 1
        method = request.method
        body = request.body
        rule = match.rule
        doc = parse_json(body) if rule.session_in == "body" else None
        call = Call(request, match, method, request.path_qs, None, body, doc)
        if rule.kind in ("session", "create"):
            # The query string and the headers are read only when the rule reads them.
            src = rule.session_in
            if src == "path" and match.path_session in self._path_ids:
                call.session = self._path_ids[match.path_session]
            else:
                query = request.query if src == "query" else _NO_QUERY
                headers = request.headers if src == "header" else _NO_QUERY
                call.session = extract_session(
                    match, self.ids, query=query, headers=headers, body=doc
                )
                if (
                    src == "path"
                    and match.path_session is not None
                    and len(match.path_session) <= ROUTE_MEMO_PATH
                ):
                    # Remembered only once checked: a bad id is refused every time.
                    _remember(self._path_ids, match.path_session, call.session)
        if self.keys.upstream_key is not None and self.keys.client_keys:
            # With no client keys nobody gets the upstream key: the probe key is then the
            # caller's own, worked out only if a probe is sent (`_probe_key`).
            presented = self._presented_key(call)
            if self.keys.is_client(presented):
                call.headers = headers = upstream_headers(request)
                call.path_qs, call.body = self.keys.inject(
                    method, call.path_qs, headers, body, self._doc(call)
                )
                call.rewritten = True
                call.probe_key = self.keys.upstream_key
            else:
                call.probe_key = presented
            call.probe_key_known = True
        return call

    def _doc(self, call: Call) -> dict[str, Any] | None:
        """The body as a JSON object when it is one (parsed at most once)."""
        if call.doc is None and call.body and call.method not in ("GET", "HEAD"):
            call.doc = _parse_loose(call.body, strict=False)
        return call.doc

    def _presented_key(self, call: Call) -> str | None:
        req = call.request
        return self.keys.presented(call.method, req.query, req.headers, self._doc(call))

    def _probe_key(self, call: Call) -> str | None:
        """The key discovery probes with: the router's own for its client-key callers, else
        the caller's own (a stranger must not learn through our key where a session is).
        Worked out only when a probe is needed: most requests hit the cache."""
        if not call.probe_key_known:
            call.probe_key = self._presented_key(call)
            call.probe_key_known = True
        return call.probe_key

    # -- forward ---------------------------------------------------------------------------

    def ready(self, call: Call) -> tuple[Instance, Entry] | None:
        """Where the first attempt of a session request may go now with no I/O (its owner
        fresh in the directory's cache, and ready to take it), and what the directory said;
        None: `answer` finds out."""
        rule = call.match.rule
        session = call.session
        if rule.kind != "session" or rule.verify_holder or session is None:
            return None
        entry = call.cached = self.directory.cached(session)
        if entry is None:
            return None
        inst = self.resolver.ready(session, entry, needs_connected=rule.needs_connected)
        return None if inst is None else (inst, entry)

    async def _forward_session(self, call: Call, sent: Sent | None) -> Answer:
        """Send, then let `retry.decide` say what next, until an answer goes back."""
        session = call.session
        assert session is not None
        req = call.upstream()
        rule = call.rule
        may_resend = retry.may_resend(call.method, call.request.headers)
        resent = maybe_processed = False
        sends_left, parks_left = MAX_SENDS, MAX_PARKS
        # One deadline from arrival covers every wait of this request (worked out only if it
        # comes to waiting: the common request never reads its Prefer header).
        arrived = time.monotonic()
        outcome: Outcome | None = None
        failed: Instance | None = None
        error: UpstreamError | None = None
        refusal: tuple[UpstreamResponse, bytes] | None = None
        found: Found | None = None
        ask = Ask(session, rule.creates, rule.needs_connected, lambda: self._probe_key(call))
        target: Instance | None
        if sent is not None:
            self.resolver.note(ask, sent.entry)
            target = sent.target
        elif call.cached is not None:  # read by `ready` already
            self.resolver.note(ask, call.cached)
            target = self.resolver.ready(session, call.cached, needs_connected=ask.needs_connected)
        else:
            target = await self.resolver.first(ask)
        while True:
            if target is not None and rule.verify_holder:
                holds = await self.discovery.holds(target, session, self._probe_key(call))
                if holds is not True:
                    # Never a DELETE (or a disconnect) to an instance that does not hold the
                    # session: Blazz would delete its files, the shared login (node-pool-api.md).
                    log.info("session_not_held", session=session, instance=target.name)
                    outcome, failed = (
                        (Outcome.NOT_HERE, target)
                        if holds is False
                        else (
                            Outcome.NOT_REACHED,
                            target,
                        )
                    )
                    error = ConnectFailed(target.name, "did not say whether it holds the session")
                    target = None
            if target is not None and call.request.caller_gone and sent is None:
                # Nobody would read the answer; a caller that retries would have it twice.
                self.stats.dropped["caller_gone"] += 1
                log.info("request_dropped", reason="caller_gone", session=session)
                raise caller_gone(session)
            if target is not None:
                sends_left -= 1
                call.target = target.name
                call.retried = sends_left < MAX_SENDS - 1
                ask.sent_at = time.time() if sent is None else sent.sent_at
                try:
                    if sent is not None:
                        pending, sent = sent, None  # only the first attempt was made already
                        up = await self._sent(pending)
                    else:
                        up = await self._send(target, req)
                except UpstreamError as exc:
                    if says_down(exc):
                        self.pool.mark_suspect(target, exc.detail)
                    log.warning(
                        "upstream_failed",
                        session=session,
                        instance=target.name,
                        route=rule.name,
                        error=type(exc).__name__,
                        retried=call.retried,
                    )
                    outcome, failed, error = retry.outcome_of(exc), target, exc
                    maybe_processed |= outcome is Outcome.NO_ANSWER
                else:
                    if up.status not in self.profile.not_here_statuses:
                        if rule.creates and up.status >= 300:
                            await self.resolver.undo_placement(session, target)
                        call.answered = True
                        return await settle(up, session, call.method)
                    body = await self._read(up)
                    means = self.profile.not_here(up.status, body)
                    if means is None:
                        call.answered = True
                        return buffered(up, body)
                    log.info(
                        "session_not_here",
                        session=session,
                        instance=target.name,
                        route=rule.name,
                        status=str(means),
                    )
                    outcome = Outcome.NOT_HERE if means is Status.GONE else Outcome.NOT_USABLE
                    failed, refusal = target, (up, body)
                target = None
            resend_ok = may_resend and not resent
            known: Known | None = None
            if retry.look_again(outcome, may_resend=resend_ok, sends_left=sends_left):
                known, found = await self.resolver.look(ask, outcome, failed)
            now = time.monotonic()
            deadline = arrived + self._wait_s(call)
            can_park = not maybe_processed and parks_left > 0 and deadline > now
            step = retry.decide(
                outcome, known, may_resend=resend_ok, sends_left=sends_left, can_park=can_park
            )
            if step.action is Action.SEND:
                assert step.target is not None
                target = self.pool.get(step.target)
                assert target is not None  # names come from the pool
                resent |= outcome is Outcome.NO_ANSWER
                if outcome is not None:
                    self.stats.retries += 1
                continue
            if step.action is Action.PARK:
                if not call.request.may_wait:
                    raise self._unavailable(call, ask, CALLER_CLOSED)
                parks_left -= 1
                try:
                    name = await self.parking.wait(
                        session, timeout_s=deadline - now, api_key=self._probe_key(call)
                    )
                except Unparked as exc:
                    call.parked_s += exc.waited_s
                    reason = CALLER_CLOSED if exc.reason == ABANDONED else exc.reason
                    raise self._unavailable(call, ask, reason) from None
                call.parked_s += time.monotonic() - now
                target, outcome, failed = self.pool.get(name), None, None
                continue
            if step.action is Action.RELAY:
                assert refusal is not None
                call.answered = True
                return buffered(*refusal)
            if step.action is Action.FAIL:
                assert error is not None
                raise retry.failure_answer(error, session, retried=resent) from None
            if step.action is Action.UNAVAILABLE:
                if sends_left <= 0:
                    reason = "attempts"
                elif self._wait_s(call) <= 0:
                    reason = "no_wait"
                else:
                    reason = "timeout"
                raise self._unavailable(call, ask, reason)
            if found is None:
                raise not_on_rediscovered(session, failed.name if failed else "")
            raise not_found_answer(session, found)

    def _wait_s(self, call: Call) -> float:
        """How long this request may wait for its session: its route's (bounded by the
        caller's own timeout for it), or less when the caller says `Prefer: wait=N`."""
        if call.wait_s is None:
            # Every Prefer line (RFC 9110 5.3: lines of one field join with commas): the
            # `wait` may be on the second (once, only the first was read).
            asked = prefer_wait_s(", ".join(call.request.headers.getall("Prefer", ())))
            cap = call.rule.max_wait_s
            cap = self.parking_cfg.max_wait_s if cap is None else cap
            call.wait_s = cap if asked is None else min(cap, asked)
        return call.wait_s

    def _unavailable(self, call: Call, ask: Ask, reason: str) -> RequestRejected:
        assert call.session is not None
        self.stats.unavailable[reason] += 1
        believed = self.pool.get(ask.believed) if ask.believed else None
        return session_unavailable(
            call.session,
            owner=believed.name if believed is not None else None,
            owner_state=believed.state.value if believed is not None else None,
            status=ask.status if believed is not None else None,
            waited_s=call.parked_s,
            retry_after_s=self.parking_cfg.retry_after_s,
            reason=reason,
        )

    async def _forward_any(self, call: Call) -> Answer:
        req = call.upstream()
        tried: set[str] = set()
        while True:
            inst = self.pool.any_routable()
            if inst is None or inst.name in tried:
                raise no_healthy_instance(None)
            tried.add(inst.name)
            call.target = inst.name
            try:
                up = await self._send(inst, req)
            except NotReached as exc:
                if says_down(exc):
                    self.pool.mark_suspect(inst, exc.detail)
                continue
            except UpstreamError as exc:
                raise retry.failure_answer(exc, None, retried=len(tried) > 1) from None
            call.answered = True
            return await settle(up, None, call.method)

    async def _send(self, inst: Instance, req: UpstreamRequest) -> UpstreamResponse:
        inst.inflight += 1
        started = time.perf_counter()
        try:
            up = await self.forwarder.send(inst, req)
        finally:
            inst.inflight -= 1
        self.answered_by(inst, started)
        return up

    async def _sent(self, sent: Sent) -> UpstreamResponse:
        """The answer to the express lane's attempt, as `_send` would have returned it."""
        try:
            await sent.response.head()
        except BaseException:
            sent.response.release()  # not parsed to its end: dropped
            raise
        if not sent.head_seen:
            self.answered_by(sent.target, sent.started)
        return sent.response

    def answered_by(self, inst: Instance, started: float) -> None:
        """An instance answered (a head came) for a request sent at `started`."""
        if self.observe_latency is not None:
            self.observe_latency(inst.name, time.perf_counter() - started)
        if inst.state is not State.HEALTHY:
            self.pool.mark_healthy(inst)

    async def _read(self, up: UpstreamResponse) -> bytes:
        try:
            return await up.read()
        finally:
            up.release()


# -- helpers ------------------------------------------------------------------------------


K = TypeVar("K")
V = TypeVar("V")


def _remember(memo: dict[K, V], key: K, value: V) -> None:
    """Into a bounded memo (`ROUTE_MEMO`): forgotten all at once when full."""
    if len(memo) >= ROUTE_MEMO:
        memo.clear()
    memo[key] = value


def _parse_loose(body: bytes, *, strict: bool) -> dict[str, Any] | None:
    """The body as a JSON object; only a rule that reads the session from it insists."""
    if strict:
        return parse_json(body)
    try:
        return parse_json(body)
    except RequestRejected:
        return None


__all__ = ["Call", "Proxy", "Sent", "no_healthy_instance", "not_found_answer", "status_class"]
