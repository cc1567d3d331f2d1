"""The proxy's decisions as a table: what each instance answers (memory forwarder, no
sockets) -> where the request went, in order, and what the caller got.

The rule under test (retry.py): a request that was not processed (nothing sent, "session
not found", "session not connected") goes to wherever the session is now; one that was sent
and got no (whole) answer may have been processed, so it is sent again only when that is
harmless (an idempotent method, or an Idempotency-Key).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict
from yarl import URL

from wa_router.app import build_router
from wa_router.config import config_from_dict
from wa_router.errors import (
    ConnectFailed,
    Disconnected,
    PoolTimeout,
    ReadTimeout,
    RequestRejected,
)
from wa_router.exchange import Inbound, Reply
from wa_router.forward import UpstreamRequest
from wa_router.memforward import Handler, MemoryForwarder, Outcome, answer, routes
from wa_router.pool import Instance
from wa_router.stores import MemoryStore, Source
from wa_router.stores.base import Status

from .conftest import send_body

NODES = ("node-0", "node-1", "node-2")
SESSION = "s1"
SEND = ("POST", "/api/messages/send")
VALIDATE = ("GET", f"/api/messages/{SESSION}/validate")
STATUS = ("GET", f"/api/sessions/{SESSION}/status")

SENT = answer(200, {"success": True, "message_id": "m-1"})
VALID = answer(200, {"success": True, "valid": True})
CONNECTED = answer(200, {"session_id": SESSION, "status": "connected"})
SCANNING = answer(200, {"session_id": SESSION, "status": "qr_scanning"})
NOT_HERE = answer(404, {"error": "Session not found"})
NOT_CONNECTED_ERROR = "Session not connected. Current status: qr_scanning"
NOT_CONNECTED = answer(400, {"error": NOT_CONNECTED_ERROR})
NO_ENDPOINT = answer(404, {"error": "Endpoint not found"})

Table = dict[tuple[str, str], Outcome]


@dataclass
class Case:
    name: str
    nodes: dict[str, Table]  # an instance left out is one nothing listens on
    status: int  # what the caller gets
    sent_to: list[str]  # where the caller's request went, in order
    error: str | None = None  # the answer's `error`: the router's code, or the instance's
    retried: bool | None = None  # what that answer says
    owner: str | None = "node-0"  # connected there, as the directory knows before
    request: tuple[str, str] = SEND
    headers: dict[str, str] = field(default_factory=dict)


def elsewhere(*answers: tuple[tuple[str, str], Outcome]) -> Table:
    """An instance that does not have the session, unless `answers` say otherwise."""
    return {STATUS: NOT_HERE, **dict(answers)}


CASES = [
    Case(
        "owner answers: relayed, sent once",
        {"node-0": {SEND: SENT, STATUS: CONNECTED}},
        200,
        ["node-0"],
    ),
    Case(
        "owner's ordinary 404 is its answer, not a rediscovery",
        {"node-0": {SEND: NO_ENDPOINT, STATUS: CONNECTED}},
        404,
        ["node-0"],
        error="Endpoint not found",
    ),
    Case(
        "owner says session not found: sent to the rediscovered owner",
        {
            "node-0": elsewhere((SEND, NOT_HERE)),
            "node-1": {SEND: SENT, STATUS: CONNECTED},
            "node-2": elsewhere(),
        },
        200,
        ["node-0", "node-1"],
    ),
    Case(
        "owner says not connected: sent where it is connected",
        {
            "node-0": {SEND: NOT_CONNECTED, STATUS: SCANNING},
            "node-1": {SEND: SENT, STATUS: CONNECTED},
            "node-2": elsewhere(),
        },
        200,
        ["node-0", "node-1"],
    ),
    Case(
        "not connected there nor anywhere: the instance's own 400 is the answer",
        {
            "node-0": {SEND: NOT_CONNECTED, STATUS: SCANNING},
            "node-1": elsewhere(),
            "node-2": elsewhere(),
        },
        400,
        ["node-0"],
        error="Session not connected. Current status: qr_scanning",
    ),
    Case(
        # Once a 404 "on none of the instances asked", which a caller takes for "gone".
        "unknown session, its QR not scanned yet: sent where it is, its own 400 the answer",
        {
            "node-0": elsewhere(),
            "node-1": {SEND: NOT_CONNECTED, STATUS: SCANNING},
            "node-2": elsewhere(),
        },
        400,
        ["node-1"],
        error="Session not connected. Current status: qr_scanning",
        owner=None,
    ),
    Case(
        "unknown session: looked for, then sent where it is",
        {"node-0": elsewhere(), "node-1": elsewhere(), "node-2": {SEND: SENT, STATUS: CONNECTED}},
        200,
        ["node-2"],
        owner=None,
    ),
    Case(
        "connect refused: nothing was sent, so it goes to the rediscovered owner",
        {
            "node-0": {SEND: ConnectFailed},
            "node-1": {SEND: SENT, STATUS: CONNECTED},
            "node-2": elsewhere(),
        },
        200,
        ["node-0", "node-1"],
    ),
    Case(
        "no free pooled connection in the wait: nothing was sent, so it goes elsewhere",
        {
            "node-0": {SEND: PoolTimeout},
            "node-1": {SEND: SENT, STATUS: CONNECTED},
            "node-2": elsewhere(),
        },
        200,
        ["node-0", "node-1"],
    ),
    Case(
        "read timeout after sending a POST: never sent twice, 504",
        {
            "node-0": {SEND: ReadTimeout, STATUS: CONNECTED},
            "node-1": {SEND: SENT, STATUS: CONNECTED},
        },
        504,
        ["node-0"],
        error="upstream_timeout",
        retried=False,
    ),
    Case(
        "connection broken after sending a POST: never sent twice, 502",
        {
            "node-0": elsewhere((SEND, Disconnected)),
            "node-1": {SEND: SENT, STATUS: CONNECTED},
        },
        502,
        ["node-0"],
        error="upstream_unreachable",
        retried=False,
    ),
    Case(
        "answer body broken off: 502, never sent twice",
        {"node-0": {SEND: answer(200, {"ok": 1}, broken=Disconnected), STATUS: CONNECTED}},
        502,
        ["node-0"],
        error="upstream_unreachable",
        retried=False,
    ),
    Case(
        "read timeout with an Idempotency-Key: sent once more, then 504",
        {"node-0": {SEND: ReadTimeout, STATUS: CONNECTED}, "node-1": elsewhere()},
        504,
        ["node-0", "node-0"],
        error="upstream_timeout",
        retried=True,
        headers={"Idempotency-Key": "k-1"},
    ),
    Case(
        "read timeout with an Idempotency-Key, the session moved: sent to the new owner",
        {
            "node-0": elsewhere((SEND, ReadTimeout)),
            "node-1": {SEND: SENT, STATUS: CONNECTED},
            "node-2": elsewhere(),
        },
        200,
        ["node-0", "node-1"],
        headers={"Idempotency-Key": "k-1"},
    ),
    Case(
        "a GET whose connection broke is idempotent: sent again where the session is",
        {
            "node-0": elsewhere((VALIDATE, Disconnected)),
            "node-1": {VALIDATE: VALID, STATUS: CONNECTED},
            "node-2": elsewhere(),
        },
        200,
        ["node-0", "node-1"],
        request=VALIDATE,
    ),
    Case(
        "not found on the owner nor anywhere else: 404 session_not_found",
        {"node-0": elsewhere((SEND, NOT_HERE)), "node-1": elsewhere(), "node-2": elsewhere()},
        404,
        ["node-0"],
        error="session_not_found",
    ),
    Case(
        "every instance refuses connections, the caller will not wait: 503, not a 404",
        {"node-0": {SEND: ConnectFailed}},
        503,
        ["node-0"],
        error="session_unavailable",
        headers={"Prefer": "wait=0"},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_proxy_decides(case: Case) -> None:
    cfg = config_from_dict(
        {
            "instances": [
                {"name": n, "url": f"http://127.0.0.1:{3000 + i}"} for i, n in enumerate(NODES)
            ]
        }
    )
    fw = MemoryForwarder({name: routes(table) for name, table in case.nodes.items()})
    router = build_router(cfg, store=MemoryStore(), forwarder=fw)
    await router.forwarder.start()
    if case.owner is not None:
        await router.directory.observe(SESSION, case.owner, Source.WEBHOOK, status=Status.CONNECTED)
    method, path = case.request
    body = orjson.dumps(send_body(SESSION)) if method == "POST" else b""
    inbound = Inbound(method, path, "", CIMultiDict(case.headers), body, "192.0.2.1")
    proxy = router.proxy
    try:
        got = await proxy.answer(inbound, proxy.route(method, path), time.perf_counter())
    finally:
        await router.parking.close()
        await router.forwarder.close()
    assert isinstance(got, Reply)  # small answers with a length are read whole
    doc: dict[str, Any] = orjson.loads(got.body)
    assert (got.status, fw.sends(method, path)) == (case.status, case.sent_to), doc
    if case.error is not None:
        assert doc["error"] == case.error, doc
    if case.retried is not None:
        assert doc["retried"] is case.retried, doc
    if case.status < 300:
        assert doc["success"] is True  # the instance's answer, as it gave it
    # Every upstream answer was handed back (read whole, or refused and read to decide).
    assert all(r.released for r in fw.responses)


async def test_two_holders_neither_connected_get_one_send_not_one_each_in_turn() -> None:
    """s1 held by node-1 and node-2, its QR scanned on neither; the instance that refused
    the send last is the slower to answer the next probe (as after a refusal, any order
    may come). The first one's own 400 is the answer. (Once, the send went to one, then
    the other, in turn, until out of attempts, and the caller got a 503.)"""
    sends: list[str] = []
    probed = {"node-1": asyncio.Event(), "node-2": asyncio.Event()}

    def holder(name: str, other: str) -> Handler:
        async def handle(req: UpstreamRequest) -> Outcome:
            if req.method == "POST":
                sends.append(name)
                probed[other].clear()
                return NOT_CONNECTED
            if sends and sends[-1] == name:  # the other holder's probe answers first
                await asyncio.wait_for(probed[other].wait(), 5.0)
            probed[name].set()
            return SCANNING

        return handle

    cfg = config_from_dict(
        {
            "instances": [
                {"name": n, "url": f"http://127.0.0.1:{3000 + i}"} for i, n in enumerate(NODES)
            ]
        }
    )
    fw = MemoryForwarder(
        {
            "node-0": routes(elsewhere()),
            "node-1": holder("node-1", "node-2"),
            "node-2": holder("node-2", "node-1"),
        }
    )
    router = build_router(cfg, store=MemoryStore(), forwarder=fw)
    await router.forwarder.start()
    body = orjson.dumps(send_body(SESSION))
    inbound = Inbound("POST", SEND[1], "", CIMultiDict(), body, "192.0.2.1")
    try:
        got = await router.proxy.answer(inbound, router.proxy.route(*SEND), time.perf_counter())
    finally:
        await router.parking.close()
        await router.forwarder.close()
    assert isinstance(got, Reply)
    assert (got.status, orjson.loads(got.body)["error"]) == (400, NOT_CONNECTED_ERROR), got
    assert len(sends) == 1, sends


async def test_the_memory_forwarder_records_what_was_sent() -> None:
    fw = MemoryForwarder({"node-0": routes({SEND: SENT})})
    cfg = config_from_dict({"instances": [{"name": "node-0", "url": "http://127.0.0.1:3000"}]})
    router = build_router(cfg, store=MemoryStore(), forwarder=fw)
    await router.directory.observe(SESSION, "node-0", Source.WEBHOOK, status=Status.CONNECTED)
    body = orjson.dumps(send_body(SESSION))
    inbound = Inbound("POST", SEND[1], "a=1", CIMultiDict({"X-Trace": "t"}), body, "192.0.2.1")
    got = await router.proxy.answer(inbound, router.proxy.route(*SEND), time.perf_counter())
    assert isinstance(got, Reply) and got.status == 200
    (sent,) = fw.sent
    assert (sent.instance, sent.method, sent.path_qs, sent.body) == (
        "node-0",
        "POST",
        "/api/messages/send?a=1",
        body,
    )
    assert sent.headers["X-Trace"] == "t" and sent.headers["X-Forwarded-For"] == "192.0.2.1"
    stranger = Instance("node-9", URL("http://127.0.0.1:3009"), "http://127.0.0.1:3009")
    with pytest.raises(ConnectFailed, match="nothing listens"):
        await fw.send(stranger, UpstreamRequest("GET", "/health", CIMultiDict(), b"", 1.0))


LIST = ("GET", "/api/sessions")


@pytest.mark.parametrize(
    ("answers", "status", "error"),
    [
        # Every instance refuses the caller's request the same way: Node's own answer.
        ((answer(400, {"error": "bad"}),) * 3, 400, "bad"),
        # Each answered, none with its list: said so (once: "no instance answered").
        ((answer(500, {"error": "x"}), answer(400, {"error": "bad"}), NO_ENDPOINT), 502, None),
        ((answer(500, {"error": "x"}),) * 3, 502, None),
        ((ConnectFailed,) * 3, 502, None),
    ],
)
async def test_pool_listing_when_no_instance_gives_its_list(
    answers: tuple[Outcome, ...], status: int, error: str | None
) -> None:
    cfg = config_from_dict(
        {
            "instances": [
                {"name": n, "url": f"http://127.0.0.1:{3000 + i}"} for i, n in enumerate(NODES)
            ]
        }
    )
    fw = MemoryForwarder({n: routes({LIST: a}) for n, a in zip(NODES, answers, strict=True)})
    router = build_router(cfg, store=MemoryStore(), forwarder=fw)
    await router.forwarder.start()
    req = UpstreamRequest("GET", "/api/sessions?api_key=k", CIMultiDict(), b"", 5.0)
    try:
        if status < 500:
            got = await router.proxy.pooled.listing(req)
            assert (got.status, orjson.loads(got.body)["error"]) == (status, error)
            return
        with pytest.raises(RequestRejected) as info:
            await router.proxy.pooled.listing(req)
    finally:
        await router.forwarder.close()
    assert (info.value.status, info.value.code) == (502, "upstream_unreachable")
    answered = answers[0] is not ConnectFailed
    assert info.value.message == (
        "no instance gave its session list" if answered else "no instance answered the session list"
    )
    assert sorted(info.value.extra["errors"]) == list(NODES)
