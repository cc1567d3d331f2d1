"""A `Forwarder` without sockets: each instance's answers come from a handler (a table of
routes, or any callable), and every request sent is recorded.

For tests of what the router decides (where a request goes, whether it is sent again, what
the caller is answered), written as tables:

    fw = MemoryForwarder({
        "node-0": routes({("POST", "/api/messages/send"): ConnectFailed}),
        "node-1": routes({("POST", "/api/messages/send"): answer(200, {"ok": True})}),
    })
    router = build_router(cfg, store=MemoryStore(), forwarder=fw)

A handler's outcome is an `Answer`, an `UpstreamError` to raise, or an UpstreamError class
(raised for the instance asked, so a table need not name it twice). An instance without a
handler is one nothing listens on: `ConnectFailed`.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import ConnectFailed, UpstreamError
from .forward import UpstreamRequest, UpstreamResponse
from .pool import Instance


@dataclass(frozen=True, slots=True)
class Answer:
    """An instance's answer; `broken` is raised by its body after `body` (cut mid-way)."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    broken: type[UpstreamError] | None = None


Outcome = Answer | UpstreamError | type[UpstreamError]
Handler = Callable[[UpstreamRequest], Outcome | Awaitable[Outcome]]


def answer(
    status: int,
    doc: Any = None,
    *,
    body: bytes | None = None,
    headers: Iterable[tuple[str, str]] = (),
    broken: type[UpstreamError] | None = None,
) -> Answer:
    """`doc` as a JSON body (with its Content-Type), or `body` as it is."""
    hdrs = list(headers)
    if doc is not None:
        body = orjson.dumps(doc)
        hdrs.append(("Content-Type", "application/json"))
    data = body or b""
    # A broken body announces more than it gives, as a cut one does.
    hdrs.append(("Content-Length", str(len(data) + (broken is not None))))
    return Answer(status, data, tuple(hdrs), broken=broken)


NOT_FOUND = answer(404, {"error": "Endpoint not found"})  # what Blazz says of unknown paths


def routes(table: Mapping[tuple[str, str], Outcome], default: Outcome = NOT_FOUND) -> Handler:
    """A handler answering by (method, path without the query)."""

    def handle(request: UpstreamRequest) -> Outcome:
        path = request.path_qs.partition("?")[0]
        return table.get((request.method, path), default)

    return handle


@dataclass(frozen=True, slots=True)
class Sent:
    instance: str
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes


class MemoryResponse:
    __slots__ = ("_answer", "_instance", "headers", "reason", "released", "status")

    def __init__(self, instance: str, ans: Answer) -> None:
        self._instance = instance
        self._answer = ans
        self.status = ans.status
        self.reason = ans.reason
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(ans.headers))
        self.released = False

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._answer.body:
            yield self._answer.body
        if self._answer.broken is not None:
            raise self._answer.broken(self._instance, "answer broken off")

    def release(self) -> None:
        self.released = True


@dataclass(slots=True)
class MemoryForwarder:
    handlers: Mapping[str, Handler]  # by instance name
    sent: list[Sent] = field(default_factory=list)
    responses: list[MemoryResponse] = field(default_factory=list)
    started: bool = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False

    async def send(self, instance: Instance, request: UpstreamRequest) -> UpstreamResponse:
        self.sent.append(
            Sent(
                instance.name,
                request.method,
                request.path_qs,
                CIMultiDict(request.headers),
                request.body,
            )
        )
        handler = self.handlers.get(instance.name)
        if handler is None:
            raise ConnectFailed(instance.name, "connect failed: nothing listens there")
        got = handler(request)
        outcome = await got if inspect.isawaitable(got) else got
        if isinstance(outcome, type):
            raise outcome(instance.name, f"{outcome.__name__} (memory forwarder)")
        if isinstance(outcome, UpstreamError):
            raise outcome
        resp = MemoryResponse(instance.name, outcome)
        self.responses.append(resp)
        return resp

    def sends(self, method: str, path: str) -> list[str]:
        """The instances `method path` went to (the query ignored), in order."""
        return [
            s.instance
            for s in self.sent
            if s.method == method and s.path_qs.partition("?")[0] == path
        ]


__all__ = [
    "NOT_FOUND",
    "Answer",
    "Handler",
    "MemoryForwarder",
    "MemoryResponse",
    "Outcome",
    "Sent",
    "answer",
    "routes",
]
