"""The request handler: extract -> resolve -> forward -> retry policy (DESIGN.md).

One request costs, when its session has not moved: a rule match, one dict lookup in the
directory cache, and one upstream attempt whose answer is streamed back.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from multidict import CIMultiDict

from . import retry
from .apikeys import KeyPolicy
from .directory import Directory
from .discovery import ERROR, Discovery, Found
from .errors import Disconnected, NotReached, RequestRejected, UpstreamError
from .forward import Forwarder, UpstreamRequest, UpstreamResponse
from .httpio import buffered, forward_headers, json_error, read_body, relay
from .pool import Instance, Pool, State
from .pooled import PoolRoutes
from .profiles import Profile
from .rules import Match, Rule, RuleTable, SessionIdPolicy, check_path, extract_session
from .rules import parse_json_object as parse_json
from .singleflight import SingleFlight
from .stores.base import Source

log = structlog.get_logger("wa_router.proxy")
_NO_QUERY: dict[str, str] = {}


@dataclass(slots=True)
class ProxyStats:
    requests: int = 0
    retries: int = 0
    placements: int = 0
    # (route kind, instance or "none", status class) -> requests; read by metrics.py
    outcomes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    # "answered" (the retry got an instance's answer) | "failed"
    retry_outcomes: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class Call:
    """One caller request, as it will be sent upstream."""

    request: web.Request
    match: Match
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes
    doc: dict[str, Any] | None = None  # the body parsed, when something needed it
    session: str | None = None
    probe_key: str | None = None
    probe_key_known: bool = False
    target: str = "none"  # the instance that answered (or was last tried)
    retried: bool = False
    answered: bool = False  # an instance's answer was relayed

    @property
    def rule(self) -> Rule:
        return self.match.rule

    def upstream(self) -> UpstreamRequest:
        return UpstreamRequest(
            self.method, self.path_qs, self.headers, self.body, self.rule.read_timeout_s
        )


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
        self.stats = ProxyStats()
        self.pooled = PoolRoutes(
            pool=pool, profile=profile, forwarder=forwarder, probe_timeout_s=probe_timeout_s
        )
        self._placements: SingleFlight[str, Instance] = SingleFlight()
        # Upstream latency (instance, seconds to the response head); metrics.py sets it.
        self.observe_latency: Callable[[str, float], None] | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        call: Call | None = None
        resp: web.StreamResponse
        try:
            call = await self._prepare(request)
            kind = call.rule.kind
            if kind == "pool_health":
                resp = await self.pooled.health(call.upstream())
            elif kind == "pool_list":
                resp = await self.pooled.listing(call.upstream())
            elif kind == "any_instance":
                resp = await self._forward_any(call)
            else:
                resp = await self._forward_session(call)
        except RequestRejected as exc:
            if call is not None and call.session is not None and "session" not in exc.extra:
                exc.extra["session"] = call.session
            resp = json_error(exc)
        stats = self.stats
        if call is None:
            stats.outcomes[("rejected", "none", f"{resp.status // 100}xx")] += 1
        else:
            stats.outcomes[(call.rule.kind, call.target, f"{resp.status // 100}xx")] += 1
            if call.retried:
                stats.retry_outcomes["answered" if call.answered else "failed"] += 1
        return resp

    # -- extract ---------------------------------------------------------------------------

    async def _prepare(self, request: web.Request) -> Call:
        raw_path = request.rel_url.raw_path
        check_path(raw_path)
        method = request.method
        match = self.rules.match(method, raw_path)
        if match is None:
            raise RequestRejected(
                400,
                "bad_request",
                f"no route rule matches {method} {request.path}: the router cannot tell "
                "which session this request is for",
            )
        body = await read_body(request, self.max_body_bytes)
        rule = match.rule
        doc = parse_json(body) if rule.session_in == "body" else None
        headers = forward_headers(request)
        call = Call(request, match, method, request.rel_url.raw_path_qs, headers, body, doc)
        if rule.kind in ("session", "create"):
            # The query string is parsed only when the rule reads it (it costs).
            query = request.query if rule.session_in == "query" else _NO_QUERY
            call.session = extract_session(
                match, self.ids, query=query, headers=request.headers, body=doc
            )
        if self.keys.upstream_key is not None:
            presented = self._presented_key(call)
            if self.keys.is_client(presented):
                call.path_qs, call.body = self.keys.inject(
                    method, call.path_qs, headers, body, self._doc(call)
                )
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

    # -- resolve ---------------------------------------------------------------------------

    async def _resolve(self, call: Call) -> Instance:
        assert call.session is not None
        entry = await self.directory.lookup(call.session)
        if entry is not None and entry.instance is not None:
            inst = self.pool.get(entry.instance)
            if inst is not None and self.pool.routable(inst):
                return inst
        previous = entry.instance if entry is not None else None
        return await self._relocate(call, previous=previous, failed=None)

    async def _relocate(self, call: Call, *, previous: str | None, failed: str | None) -> Instance:
        """The owner to try after the believed one failed (or when none is known)."""
        session = call.session
        assert session is not None
        if failed is not None:
            # Another request may have found the new owner meanwhile: use it, no new scan.
            self.directory.invalidate(session)
            entry = await self.directory.lookup(session)
            if entry is not None and entry.instance not in (None, failed):
                assert entry.instance is not None
                inst = self.pool.get(entry.instance)
                if inst is not None and self.pool.routable(inst):
                    return inst
        if call.rule.creates:
            return await self._placements.run(session, lambda: self._place(call, previous))
        found = await self.discovery.find(session, api_key=self._probe_key(call), previous=previous)
        if found.owner is not None:
            return found.owner
        if failed is None and previous is not None:
            # The believed owner is only suspect (one failed connect, say) and nobody else
            # has the session: trying it beats answering "not found" for a live session.
            believed = self.pool.get(previous)
            if believed is not None and believed.state is State.SUSPECT:
                return believed
        raise not_found_answer(session, found)

    async def _place(self, call: Call, previous: str | None) -> Instance:
        session = call.session
        assert session is not None
        # A create for a session that lives somewhere must go there: Node would otherwise
        # hold it twice (two Chromiums fighting over one WhatsApp login).
        found = await self.discovery.find(session, api_key=self._probe_key(call), previous=previous)
        if found.owner is not None:
            return found.owner
        inst = self.pool.for_placement(await self.directory.counts())
        if inst is None:
            raise no_healthy_instance(session)
        await self.directory.observe(session, inst.name, Source.PLACEMENT)
        self.discovery.forget_negative(session)
        self.stats.placements += 1
        log.info("session_placed", session=session, instance=inst.name, previous=previous)
        return inst

    # -- forward ---------------------------------------------------------------------------

    async def _forward_session(self, call: Call) -> web.StreamResponse:
        session = call.session
        assert session is not None
        target = await self._resolve(call)
        req = call.upstream()
        retried = False
        while True:
            call.target = target.name
            call.retried = retried
            try:
                up = await self._send(target, req)
            except UpstreamError as exc:
                if isinstance(exc, NotReached | Disconnected):
                    self.pool.mark_suspect(target, exc.detail)
                log.warning(
                    "upstream_failed",
                    session=session,
                    instance=target.name,
                    route=call.rule.name,
                    error=type(exc).__name__,
                    retried=retried,
                )
                if retried or not retry.should_retry(exc, call.method, call.request.headers):
                    raise retry.failure_answer(exc, session, retried=retried) from None
                target = await self._relocate(call, previous=target.name, failed=target.name)
                retried = True
                self.stats.retries += 1
                continue
            if up.status in (404, 421):
                body = await self._read(up)
                if self.profile.says_not_here(up.status, body):
                    log.info(
                        "session_not_here",
                        session=session,
                        instance=target.name,
                        route=call.rule.name,
                    )
                    if retried:
                        raise RequestRejected(
                            404,
                            "session_not_found",
                            f"session {session} is not on {target.name}, the instance "
                            "rediscovery found",
                            session=session,
                            asked=[target.name],
                        )
                    target = await self._relocate(call, previous=target.name, failed=target.name)
                    retried = True
                    self.stats.retries += 1
                    continue
                call.answered = True
                return buffered(up, body)
            if call.rule.creates and up.status >= 300:
                await self._undo_placement(session, target)
            call.answered = True
            return await relay(call.request, up, session)

    async def _forward_any(self, call: Call) -> web.StreamResponse:
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
                self.pool.mark_suspect(inst, exc.detail)
                continue
            except UpstreamError as exc:
                raise retry.failure_answer(exc, None, retried=len(tried) > 1) from None
            call.answered = True
            return await relay(call.request, up, None)

    async def _send(self, inst: Instance, req: UpstreamRequest) -> UpstreamResponse:
        inst.inflight += 1
        started = time.perf_counter()
        try:
            up = await self.forwarder.send(inst, req)
        finally:
            inst.inflight -= 1
        if self.observe_latency is not None:
            self.observe_latency(inst.name, time.perf_counter() - started)
        if inst.state is not State.HEALTHY:
            self.pool.mark_healthy(inst)
        return up

    async def _read(self, up: UpstreamResponse) -> bytes:
        try:
            return await up.read()
        finally:
            up.release()

    async def _undo_placement(self, session: str, target: Instance) -> None:
        entry = await self.directory.lookup(session)
        if entry is not None and entry.source is Source.PLACEMENT and entry.instance == target.name:
            await self.directory.forget(session, Source.PLACEMENT)


# -- helpers ------------------------------------------------------------------------------


def _parse_loose(body: bytes, *, strict: bool) -> dict[str, Any] | None:
    """The body as a JSON object; only a rule that reads the session from it insists."""
    if strict:
        return parse_json(body)
    try:
        return parse_json(body)
    except RequestRejected:
        return None


def no_healthy_instance(session: str | None) -> RequestRejected:
    return RequestRejected(
        503,
        "no_healthy_instance",
        "no instance of the pool can take this request now",
        session=session,
    )


def not_found_answer(session: str, found: Found) -> RequestRejected:
    if not found.probes or all(p.outcome == ERROR for p in found.probes):
        # Nobody answered: "not found" would be a guess. Say what is true.
        ans = no_healthy_instance(session)
        if found.probes:
            ans.extra["unreachable"] = found.unreachable
        return ans
    if found.unauthorized:
        return RequestRejected(
            401,
            "unauthorized",
            "the instances refused the api key, so the session could not be looked for",
            session=session,
            asked=found.asked,
        )
    extra: dict[str, Any] = {"session": session, "asked": found.asked}
    if found.unreachable:
        extra["unreachable"] = found.unreachable
    return RequestRejected(
        404,
        "session_not_found",
        f"session {session} is on none of the instances asked",
        **extra,
    )


__all__ = ["Proxy", "no_healthy_instance", "not_found_answer"]
