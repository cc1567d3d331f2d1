"""The lean front's express lane (express.py): the common request answered from callbacks in
its own bytes, and handed to the full path the moment its answer is not plain.

First, tables: the bytes the lane builds equal what the full path builds from decoded
headers (`wire.relay_head` = `answer_head(buffered(...))`; `exchange.forward_fields` =
`upstream_headers`). Then the lane on the wire: raw bytes to the router's socket, simulated
instances behind it, /metrics saying which way each request went.
"""

from __future__ import annotations

import json
import time

import pytest
from multidict import CIMultiDict

from wa_router.exchange import Inbound, buffered, forward_fields, read_fields, upstream_headers
from wa_router.h1response import H1Response
from wa_router.lean import LeanServer
from wa_router.pool import Instance
from wa_router.runtime import Router
from wa_router.sim import SimInstance
from wa_router.wire import answer_head, relay_head

from .conftest import (
    API_KEY,
    FRONT,
    UPSTREAM_CLIENT,
    StartRouter,
    pool_config,
    send_body,
    sends,
    wait_for,
    with_rule_timeout,
)
from .test_lean import HOST, SEND, STATUS, Conn, forwarded, request, serve
from .test_metrics import samples, value

# -- tables: the lane's bytes are the full path's ---------------------------------------------

RESPONSE_HEADS = {
    "plain": [(b"Content-Type", b"application/json"), (b"Content-Length", b"2")],
    "connection_names_a_field": [
        (b"Connection", b"keep-alive, X-Private"),
        (b"X-Private", b"secret"),
        (b"X-Public", b"yes"),
        (b"Content-Length", b"2"),
    ],
    "hop_by_hop": [
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Trailer", b"X-Sum"),
        (b"Upgrade", b"h2c"),
        (b"Date", b"Tue, 01 Dec 2026 16:00:00 GMT"),
    ],
    "repeated_and_non_ascii": [
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"X-Note", "caf\u00e9".encode()),
        (b"Content-Length", b"2"),
    ],
    "two_connection_fields": [
        (b"Connection", b"X-A"),
        (b"Connection", b"x-b"),
        (b"X-A", b"1"),
        (b"X-B", b"2"),
        (b"X-C", b"3"),
    ],
    # RFC 9110 5.6.1: empty list items name nothing (and must not cost a field or a CRLF).
    "empty_connection_items": [
        (b"Connection", b"keep-alive, ,X-A,"),
        (b"X-A", b"1"),
        (b"X-B", b"2"),
    ],
    "only_empty_connection_items": [(b"Connection", b","), (b"X-B", b"2")],
    # Field names and their tokens in any case (RFC 9110 5.1, 7.6.1).
    "names_in_upper_and_mixed_case": [
        (b"CONNECTION", b"Keep-Alive, X-HOP"),
        (b"KEEP-ALIVE", b"timeout=5"),
        (b"x-hop", b"1"),
        (b"Content-LENGTH", b"2"),
        (b"X-Kept", b"UPPER Value"),
    ],
    "chunked_in_upper_case": [(b"TRANSFER-ENCODING", b"CHUNKED"), (b"X-Kept", b"1")],
}


class _Conn:
    """Enough of a pooled connection for an answer to be parsed from bytes."""

    answer: H1Response | None = None
    closed = False
    paused = False

    def resume(self) -> None:
        pass


def parsed(status: int, reason: str, fields: list[tuple[bytes, bytes]], body: bytes) -> H1Response:
    head = b"HTTP/1.1 %d %s\r\n" % (status, reason.encode())
    head += b"".join(b"%s: %s\r\n" % kv for kv in fields)
    framing = [n.lower() for n, _ in fields]
    if b"content-length" not in framing and b"transfer-encoding" not in framing:
        head += b"Content-Length: %d\r\n" % len(body)
    answer = H1Response(_Conn(), "GET", 1.0)  # type: ignore[arg-type]
    chunked = b"transfer-encoding" in framing
    answer.feed(
        head + b"\r\n" + (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)
    )
    assert answer.done and not answer.failed
    return answer


@pytest.mark.parametrize("close", [False, True])
@pytest.mark.parametrize(("status", "reason"), [(200, "OK"), (201, ""), (404, "Not Found")])
@pytest.mark.parametrize("case", sorted(RESPONSE_HEADS))
def test_the_relayed_head_is_the_full_paths(
    case: str, status: int, reason: str, close: bool
) -> None:
    body = b"{}"
    answer = parsed(status, reason, RESPONSE_HEADS[case], body)
    full = buffered(answer, answer.body())
    want = answer_head(full.status, full.reason, full.headers, len(body), close)
    got = relay_head(answer.status, answer.kept_head, answer.named, len(body), close)
    assert got == want


REQUEST_HEADS = {
    "plain": [("Host", "router.test"), ("Accept", "*/*")],
    "prior_forwarded_for": [("Host", "h"), ("X-Forwarded-For", "10.0.0.1"), ("X-Trace", "t")],
    "connection_names_a_field": [
        ("Host", "h"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"),
        ("X-Kept", "2"),
    ],
    "no_host": [("User-Agent", "curl/8"), ("Accept", "*/*")],
    "repeated": [("Host", "h"), ("Cookie", "a=1"), ("Cookie", "b=2"), ("X-Note", "caf\u00e9")],
    "two_hosts_two_forwarded_for": [
        ("Host", "a"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("Host", "b"),
        ("X-Forwarded-For", "10.0.0.2"),
    ],
    "two_connection_fields": [
        ("Connection", "X-A"),
        ("connection", "x-b"),
        ("X-A", "1"),
        ("X-B", "2"),
    ],
}


@pytest.mark.parametrize("case", sorted(REQUEST_HEADS))
def test_the_forwarded_fields_are_the_full_paths(case: str) -> None:
    pairs = REQUEST_HEADS[case]
    inbound = Inbound("GET", "/p", "", CIMultiDict(pairs), b"", "192.0.2.7")
    want = b"".join(f"{k}: {v}\r\n".encode() for k, v in upstream_headers(inbound).items())
    raw = [(k.encode(), v.encode()) for k, v in pairs]
    assert forward_fields(read_fields(raw), b"192.0.2.7") == want


# Whether the front has more to check than a body's length (`Fields.unusual`).
UNUSUAL = [
    ([(b"Host", b"h")], False),
    ([(b"Host", b"h"), (b"Content-Length", b"2"), (b"Content-Type", b"a/b")], False),
    ([(b"host", b"h"), (b"X-Forwarded-For", b"192.0.2.1")], False),
    ([], True),  # no Host
    ([(b"Host", b"h"), (b"HOST", b"h")], True),
    ([(b"Host", b"h"), (b"Transfer-Encoding", b"chunked")], True),
    ([(b"Host", b"h"), (b"connection", b"close")], True),
    ([(b"Host", b"h"), (b"Expect", b"100-continue")], True),
    ([(b"Host", b"h"), (b"Upgrade", b"websocket")], True),
    ([(b"Host", b"h"), (b"Proxy-Connection", b"keep-alive")], True),
    ([(b"Host", b"h"), (b"Keep-Alive", b"timeout=5")], True),
]


@pytest.mark.parametrize(("raw", "unusual"), UNUSUAL)
def test_fields_say_when_the_front_has_more_to_check(
    raw: list[tuple[bytes, bytes]], unusual: bool
) -> None:
    assert read_fields(raw).unusual is unusual


# -- on the wire ---------------------------------------------------------------------------------

pytestmark_wire = pytest.mark.skipif(
    FRONT == "aiohttp" or UPSTREAM_CLIENT == "aiohttp",
    reason="the express lane is the lean front's, on the lean upstream client",
)


async def express_counts(port: int) -> tuple[float, float]:
    conn = await Conn.open(port)
    await conn.send(request("GET", "/metrics", HOST))
    m = samples((await conn.response()).body.decode())
    await conn.close()
    name = "wa_router_express_requests_total"
    return value(m, name, outcome="relayed"), value(m, name, outcome="handed_over")


async def serve_send_timeout(
    start_router: StartRouter, sims: list[SimInstance], read_s: float
) -> tuple[int, Router]:
    """As `serve`, with the send route's read timeout at `read_s`."""
    sims[0].add_session("s1")
    cfg = pool_config(sims, upstream={"api_key": API_KEY})
    client, router = await start_router(with_rule_timeout(cfg, "messages_send", read_s))
    assert client.port is not None
    return client.port, router


@pytestmark_wire
async def test_a_known_session_is_answered_on_the_lane_with_the_callers_headers(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    await conn.send(request("GET", STATUS, HOST))  # found by discovery: the full path
    first = await conn.response()
    assert first.status == 200
    assert await express_counts(port) == (0, 0)
    hop = "Connection: keep-alive, X-Hop"
    await conn.send(request("GET", STATUS, HOST, "X-Trace: t-1", hop, "X-Hop: 1", "TE: trailers"))
    again = await conn.response()
    assert (again.status, again.json()) == (200, first.json())
    assert again.headers["Content-Length"] == str(len(again.body))
    assert await express_counts(port) == (1, 0)
    seen = forwarded(sims[0], "GET", "/api/sessions/s1/status")[-1].headers
    assert seen["X-Trace"] == "t-1" and seen["X-Forwarded-Host"] == "router.test"
    assert seen["X-Forwarded-For"] == "127.0.0.1" and seen["X-Forwarded-Proto"] == "http"
    assert "X-Hop" not in seen and "TE" not in seen
    await conn.close()


@pytestmark_wire
async def test_a_session_that_moved_is_handed_over_and_sent_once_to_each(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """The cached owner answers 404 Session not found: not processed there, so the full path
    finds the new owner and sends there; each got the message once."""
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    body = json.dumps(send_body("s1")).encode()
    await conn.send(request("POST", SEND, HOST, body=body))
    assert (await conn.response()).status == 200
    await sims[0].move_session("s1", sims[1])
    await conn.send(request("POST", SEND, HOST, body=body))
    answer = await conn.response()
    assert answer.status == 200, answer.body
    assert [sends(s) for s in sims] == [2, 1, 0, 0]  # the first send, the 404, the new owner
    assert await express_counts(port) == (0, 1)
    await conn.send(request("POST", SEND, HOST, body=body))  # the new owner, on the lane
    assert (await conn.response()).status == 200
    assert await express_counts(port) == (1, 1)
    await conn.close()


@pytestmark_wire
async def test_a_post_timed_out_on_the_lane_is_not_sent_again(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    port, _ = await serve_send_timeout(start_router, sims, 0.3)
    conn = await Conn.open(port)
    body = json.dumps(send_body("s1")).encode()
    await conn.send(request("GET", STATUS, HOST))  # the owner known, a connection idle
    assert (await conn.response()).status == 200
    sims[0].route_delay_s = {SEND: 2.0}
    await conn.send(request("POST", SEND, HOST, body=body))
    answer = await conn.response()
    assert (answer.status, answer.error, answer.json()["retried"]) == (
        504,
        "upstream_timeout",
        False,
    )
    assert sends(sims[0]) == 1
    assert await express_counts(port) == (0, 1)
    await conn.close()


@pytestmark_wire
async def test_requests_pipelined_behind_one_on_the_lane_are_answered_in_order(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("s2")
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    s2 = f"/api/sessions/s2/status?api_key={API_KEY}"
    for target in (STATUS, s2):  # both owners known
        await conn.send(request("GET", target, HOST))
        assert (await conn.response()).status == 200
    sims[0].route_delay_s = {"/api/sessions/s1/status": 0.3}
    await conn.send(request("GET", STATUS, HOST) + request("GET", s2, HOST) * 2)
    got = [(await conn.response()).json()["session_id"] for _ in range(3)]
    assert got == ["s1", "s2", "s2"]
    await conn.close()


async def warmed(port: int, router: Router) -> tuple[Conn, Instance]:
    """A connection whose first request found s1's owner, node-0: the next takes the lane."""
    conn = await Conn.open(port)
    await conn.send(request("GET", STATUS, HOST))
    assert (await conn.response()).status == 200
    inst = router.pool.get("node-0")
    assert inst is not None
    return conn, inst


@pytestmark_wire
async def test_a_caller_gone_mid_request_leaves_the_upstream_connection_reusable(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """The answer is still read to its end, counted, and its connection goes back to the
    pool (none dropped, none opened)."""
    port, router = await serve(start_router, sims)
    conn, inst = await warmed(port, router)
    fw = router.forwarder
    pooled = fw.stats()[inst.base]  # type: ignore[attr-defined]
    assert pooled[0] == pooled[1] >= 1  # open, and all idle
    sims[0].route_delay_s = {"/api/sessions/s1/status": 0.3}
    await conn.send(request("GET", STATUS, HOST))
    await wait_for(lambda: len(forwarded(sims[0], "GET")) == 2, 3, "the request at the sim")
    await conn.close()  # gone before the answer
    await wait_for(lambda: not router.inflight, 3, "the request finished")
    assert fw.stats()[inst.base] == pooled  # type: ignore[attr-defined]
    assert await express_counts(port) == (1, 0)


async def keeping_alive(start_router: StartRouter, sims: list[SimInstance]) -> tuple[int, Conn]:
    """The router with a 0.3 s keep-alive timeout, and a connection to it."""
    port, _ = await serve(start_router, sims, server={"keepalive_timeout_s": 0.3})
    return port, await Conn.open(port)


@pytestmark_wire
async def test_a_connection_idle_after_an_answer_from_the_lane_is_closed_in_time(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """The keep-alive clock runs again after the lane's answer, worker or none."""
    port, conn = await keeping_alive(start_router, sims)
    for _ in range(2):  # the full path (the owner found), then the lane
        await conn.send(request("GET", STATUS, HOST))
        assert (await conn.response()).status == 200
    started = time.monotonic()
    assert await conn.closed(), "still open after the keep-alive timeout"
    assert time.monotonic() - started >= 0.3 * 0.9
    assert await express_counts(port) == (1, 0)


@pytestmark_wire
async def test_a_refusal_on_the_lane_leaves_the_keep_alive_clock_running(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    _, conn = await keeping_alive(start_router, sims)
    await conn.send(request("POST", SEND, HOST, body=b"{}"))  # no session id: 400
    answer = await conn.response()
    assert (answer.status, answer.error) == (400, "bad_request")
    assert await conn.closed(timeout_s=1.5), "still open after the keep-alive timeout"


@pytestmark_wire
async def test_a_hand_over_after_the_caller_left_frees_its_upstream_connection(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """Timed out on the lane with nobody left to answer: not taken further, its connection
    dropped and its pool slot free (no slot held by nobody)."""
    port, router = await serve_send_timeout(start_router, sims, 0.3)
    conn, inst = await warmed(port, router)
    fw = router.forwarder
    sims[0].route_delay_s = {SEND: 1.0}
    await conn.send(request("POST", SEND, HOST, body=json.dumps(send_body("s1")).encode()))
    await wait_for(lambda: sends(sims[0]) == 1, 3, "the send at the sim")
    await conn.close()  # gone before the lane's timeout
    await wait_for(lambda: router.proxy.stats.express["handed_over"] == 1, 3, "the timeout")
    await wait_for(lambda: not router.inflight, 3, "nothing in flight")
    opened, idle = fw.stats()[inst.base]  # type: ignore[attr-defined]
    assert opened == idle, f"a pool slot is held by nobody: {opened} open, {idle} idle"
    assert sends(sims[0]) == 1  # not sent again


@pytestmark_wire
async def test_a_shutdown_waits_for_a_request_handed_over_from_the_lane(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """At the drain the request is on the lane; its owner says "not here" and the full path
    sends it to the new owner: the drain waits for that, and the caller gets the answer."""
    sims[0].add_session("s1")
    client, router = await start_router(pool_config(sims, upstream={"api_key": API_KEY}))
    assert client.port is not None and client.server.runner is not None
    lean = client.server.runner.server
    assert isinstance(lean, LeanServer)
    conn = await Conn.open(client.port)
    body = json.dumps(send_body("s1")).encode()
    await conn.send(request("POST", SEND, HOST, body=body))
    assert (await conn.response()).status == 200
    await sims[0].move_session("s1", sims[1])
    sims[0].route_delay_s = {SEND: 0.3}
    sims[1].route_delay_s = {SEND: 0.5}
    await conn.send(request("POST", SEND, HOST, body=body))
    await wait_for(lambda: len(router.inflight.quick) == 1, 3, "the request on the lane")
    lean.pre_shutdown()  # what the runner does first when the router stops, then the drain
    late = await router.inflight.drain(10.0, on_late=lambda: None)
    assert late == 0
    assert sends(sims[1]) == 1, "the drain ended before the new owner was asked"
    assert not router.inflight
    answer = await conn.response()
    assert answer.status == 200, answer.body
    assert answer.headers.get("Connection") == "close"  # stopping: not kept alive


def test_a_lane_request_is_an_inbound_with_every_field_set() -> None:
    # `express.Request` sets Inbound's fields itself (one call less per request): a field
    # Inbound gains later must be set there too, or the proxy reading it would fail.
    from wa_router.express import Request

    match = object()
    req = Request(
        "GET", "/api/sessions/s1/status", "api_key=k", "127.0.0.1",
        [(b"Host", b"h")], match, 1.0, b"GET", b"/api/sessions/s1/status?api_key=k", b"",  # type: ignore[arg-type]
    )  # fmt: skip
    plain = Inbound("GET", "/api/sessions/s1/status", "api_key=k", None, b"", "127.0.0.1",
                    raw=[(b"Host", b"h")])  # fmt: skip
    for name in Inbound.__slots__:
        assert getattr(req, name) == getattr(plain, name), name
    assert req.path_qs == plain.path_qs and dict(req.headers) == dict(plain.headers)
    for name in Request.__slots__:
        getattr(req, name)  # set: reading it does not raise
