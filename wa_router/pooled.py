"""Routes answered for the whole pool rather than one session: `/health` and the session list.

A caller that asked one Node for `/health` or `GET /api/sessions` saw one instance; through
the router it sees the pool: every instance is asked at once, the answers are merged, and
which instance said what is part of the answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
from multidict import CIMultiDict

from .errors import NotReached, RequestRejected, UpstreamError, says_down
from .exchange import Reply
from .forward import Forwarder, UpstreamRequest, fetch
from .pool import Instance, Pool
from .profiles import Profile

_JSON_TYPE: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})


def _json(doc: Any, status: int) -> Reply:
    return Reply(status, _JSON_TYPE.copy(), orjson.dumps(doc))


@dataclass(frozen=True, slots=True)
class Answer:
    instance: Instance
    http_status: int | None  # None: no answer
    doc: Any  # the JSON answer, None when absent or not JSON
    raw: bytes
    error: str = ""


class PoolRoutes:
    def __init__(
        self, *, pool: Pool, profile: Profile, forwarder: Forwarder, probe_timeout_s: float
    ) -> None:
        self._pool = pool
        self._profile = profile
        self._forwarder = forwarder
        self._probe_timeout_s = probe_timeout_s

    async def health(self, caller: UpstreamRequest) -> Reply:
        """Healthy while at least one instance is (503 when none is): what a load balancer in
        front of the router needs. Probes are short: a health check must not hang."""
        req = UpstreamRequest(
            "GET", self._profile.health_path, CIMultiDict(), b"", self._probe_timeout_s
        )
        answers = await self._ask(self._pool.instances, req, self._probe_timeout_s)
        totals = {"total": 0, "connected": 0, "disconnected": 0}
        instances: dict[str, Any] = {}
        healthy = 0
        for a in answers:
            ok = a.http_status == 200
            healthy += ok
            item: dict[str, Any] = {
                "state": a.instance.state.value,
                "healthy": ok,
                "http_status": a.http_status,
            }
            if a.error:
                item["error"] = a.error
            sessions = a.doc.get("sessions") if isinstance(a.doc, dict) else None
            if ok and isinstance(sessions, dict):
                item["sessions"] = sessions
                for k in totals:
                    v = sessions.get(k)
                    totals[k] += v if isinstance(v, int) else 0
            instances[a.instance.name] = item
        status = "healthy" if healthy == len(answers) else "degraded" if healthy else "unhealthy"
        body = {
            "status": status,
            "healthy_instances": healthy,
            "instances": instances,
            "sessions": totals,
        }
        return _json(body, 200 if healthy else 503)

    async def listing(self, caller: UpstreamRequest) -> Reply:
        """`GET /api/sessions` of every instance, merged; each session names its instance.
        Every instance not listed is named in `errors`, those not asked (down) included;
        each is waited for at most the probe timeout, so a stopped one cannot hold the
        answer (Node lists from memory: a live one answers in milliseconds)."""
        targets = self._pool.discoverable()
        skipped = {
            i.name: f"not asked: {i.state.value}" for i in self._pool.instances if i not in targets
        }
        if not targets:
            raise RequestRejected(
                503,
                "no_healthy_instance",
                "no instance of the pool can take this request now",
                errors=skipped,
            )
        if caller.method == "HEAD":
            # The merge needs each instance's list: asked with GET, the body left out of
            # the answer by aiohttp (RFC 9110 9.3.2).
            caller = replace(caller, method="GET")
        answers = await self._ask(targets, caller, self._probe_timeout_s)
        for a in answers:
            if a.http_status in (401, 403):
                # The caller's key is wrong: Node's own answer says so best.
                return Reply(a.http_status, _JSON_TYPE.copy(), a.raw)
        sessions: list[Any] = []
        errors: dict[str, str] = dict(skipped)
        for a in answers:
            items = a.doc.get("sessions") if isinstance(a.doc, dict) else None
            if a.http_status == 200 and isinstance(items, list):
                for s in items:
                    sessions.append(
                        {**s, "instance": a.instance.name} if isinstance(s, dict) else s
                    )
            else:
                errors[a.instance.name] = a.error or f"HTTP {a.http_status}"
        if len(errors) == len(self._pool.instances):
            statuses = {a.http_status for a in answers}
            first = answers[0].http_status
            if (
                len(statuses) == 1
                and first is not None
                and 400 <= first < 500
                and answers[0].doc is not None
            ):
                # Every instance refused the request the same way: Node's word on it.
                return Reply(first, _JSON_TYPE.copy(), answers[0].raw)
            answered = any(a.http_status is not None for a in answers)
            why = "gave its session list" if answered else "answered the session list"
            raise RequestRejected(502, "upstream_unreachable", f"no instance {why}", errors=errors)
        body: dict[str, Any] = {"success": True, "sessions": sessions, "total": len(sessions)}
        if errors:
            body["errors"] = errors
        return _json(body, 200)

    async def _ask(
        self, instances: Sequence[Instance], req: UpstreamRequest, timeout_s: float
    ) -> list[Answer]:
        return list(await asyncio.gather(*(self._one(i, req, timeout_s) for i in instances)))

    async def _one(self, inst: Instance, req: UpstreamRequest, timeout_s: float) -> Answer:
        try:
            answer = await fetch(self._forwarder, inst, req, timeout_s)
        except NotReached as exc:
            if says_down(exc):
                self._pool.mark_suspect(inst, exc.detail)
            return Answer(inst, None, None, b"", exc.detail)
        except UpstreamError as exc:
            return Answer(inst, None, None, b"", exc.detail)
        try:
            doc = json.loads(answer.body)
        except ValueError:
            doc = None
        return Answer(inst, answer.status, doc, answer.body)
