"""The lean front (lean.py) on the wire: raw bytes written to a real loopback socket of the
router, and what a caller sees come back (status line, JSON error, the connection closed or
kept), with the simulated instances checked for what was forwarded to them.

Requests a caller sent reach an instance with `X-Forwarded-For` (the router's own probes,
listings and health checks do not carry it): `forwarded(sim)` counts those.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from multidict import CIMultiDict

from wa_router import lean as lean_module
from wa_router.config import LogConfig
from wa_router.lean import LeanServer
from wa_router.logging import setup_logging
from wa_router.runtime import Router
from wa_router.sim import SimInstance
from wa_router.sim.models import Received

from .conftest import API_KEY, FRONT, StartRouter, pool_config, send_body, wait_for
from .test_metrics import samples, value

# The lean front's own answers: nothing to test when every request goes through aiohttp.
pytestmark = pytest.mark.skipif(FRONT == "aiohttp", reason="WA_TEST_FRONT=aiohttp")

READ_S = 3.0  # how long any answer (or EOF) may take: a deadline, never a wait
STATUS = f"/api/sessions/s1/status?api_key={API_KEY}"
SEND = "/api/messages/send"
SEND_JSON = json.dumps(send_body("s1")).encode()
HOST = "Host: router.test"


# -- raw exchange -----------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str | None:
        assert self.headers.get("Content-Type", "").startswith("application/json"), self
        doc = self.json()
        return doc.get("error") if isinstance(doc, dict) else None


class Conn:
    """One caller connection: bytes written as given, answers read as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def refused(self, status: int, error: str) -> None:
        """The next answer is the router's refusal, and the connection is closed after it."""
        resp = await self.response()
        assert (resp.status, resp.error) == (status, error), resp
        assert await self.closed()

    async def response(self, *, head_only: bool = False, timeout_s: float = READ_S) -> Response:
        """One whole answer: its head, and its body framed as the head says."""
        return await asyncio.wait_for(self._response(head_only), timeout_s)

    async def _response(self, head_only: bool) -> Response:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        version, status, reason = [*status_line.split(" ", 2), ""][:3]
        assert version in ("HTTP/1.1", "HTTP/1.0"), status_line
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            name, _, value = line.partition(":")
            assert name and name == name.strip(), f"malformed answer header {line!r}"
            headers.add(name, value.strip())
        code = int(status)
        if head_only or code < 200 or code in (204, 304):
            body = b""
        elif "Content-Length" in headers:
            body = await self.reader.readexactly(int(headers["Content-Length"]))
        elif headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = await self._chunked()
        else:  # delimited by the end of the connection
            body = await self.reader.read()
        return Response(code, reason, headers, body)

    async def _chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")  # no trailers from the router
                return bytes(out)
            out += await self.reader.readexactly(size)
            assert await self.reader.readexactly(2) == b"\r\n"

    async def closed(self, timeout_s: float = READ_S) -> bool:
        """Whether the router ends the connection (EOF or reset) within the deadline, having
        written nothing more."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout_s)
        except ConnectionError:
            return True
        except TimeoutError:
            return False
        assert rest == b"", f"bytes after the answer: {rest[:200]!r}"
        return True

    async def read_to_end(self, timeout_s: float = READ_S) -> bytes:
        """Everything the router writes until it closes (which it must, within the deadline)."""
        out = bytearray()
        try:
            async with asyncio.timeout(timeout_s):
                while chunk := await self.reader.read(65536):
                    out += chunk
        except ConnectionError:
            pass
        return bytes(out)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def exchange(port: int, data: bytes) -> tuple[Response, bool]:
    """Send `data` on a new connection; its one answer, and whether the router then closed."""
    conn = await Conn.open(port)
    try:
        await conn.send(data)
        resp = await conn.response()
        return resp, await conn.closed()
    finally:
        await conn.close()


def request(
    method: str, target: str, *headers: str, body: bytes = b"", version: str = "1.1"
) -> bytes:
    """A well-formed request (Content-Length set when there is a body)."""
    lines = [f"{method} {target} HTTP/{version}", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes, *sizes: int) -> bytes:
    """`body` in chunks of these sizes (the rest in one last chunk), terminated."""
    out, at = bytearray(), 0
    for size in (*sizes, len(body)):
        part = body[at : at + size]
        at += len(part)
        if part:
            out += b"%x\r\n%s\r\n" % (len(part), part)
    return bytes(out + b"0\r\n\r\n")


async def before(conn: Conn, what: str) -> None:
    """What the connection did before the request under test: nothing ("fresh"), a request
    the lean server answers ("lean"), or one aiohttp answers ("aiohttp": the connection is
    aiohttp's afterwards)."""
    targets = {"fresh": [], "lean": [STATUS], "aiohttp": ["/healthz"]}[what]
    for target in targets:
        await conn.send(request("GET", target, HOST))
        assert (await conn.response()).status == 200


def forwarded(
    sim: SimInstance, method: str | None = None, path: str | None = None
) -> list[Received]:
    """The caller requests the router forwarded to this instance."""
    return [
        r
        for r in sim.received
        if "X-Forwarded-For" in r.headers
        and (method is None or r.method == method)
        and (path is None or r.path == path)
    ]


def nothing_forwarded(sims: list[SimInstance]) -> bool:
    return all(not forwarded(s) for s in sims)


async def serve(
    start_router: StartRouter, sims: list[SimInstance], **sections: Any
) -> tuple[int, Router]:
    """The router in front of `sims`, session s1 connected on sims[0]; its port."""
    sims[0].add_session("s1")
    upstream = {"api_key": API_KEY, **sections.pop("upstream", {})}
    client, router = await start_router(pool_config(sims, upstream=upstream, **sections))
    assert client.port is not None
    return client.port, router


async def serve_lean(
    start_router: StartRouter, sims: list[SimInstance], **server: Any
) -> tuple[int, LeanServer]:
    """As `serve`, with these `server` settings; its port and its lean server."""
    sims[0].add_session("s1")
    cfg = pool_config(sims, upstream={"api_key": API_KEY}, server=server)
    client, _ = await start_router(cfg)
    assert client.port is not None and client.server.runner is not None
    lean = client.server.runner.server
    assert isinstance(lean, LeanServer)
    return client.port, lean


# -- 1. framing llhttp refuses, and paths no part of the router takes ---------------------------

_CHUNKED_SEND = chunked(SEND_JSON, 40)
MALFORMED: dict[str, bytes] = {
    "content_length_with_transfer_encoding": (
        f"POST {SEND} HTTP/1.1\r\n{HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(SEND_JSON)}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    + _CHUNKED_SEND,
    "two_equal_content_lengths": (
        f"POST {SEND} HTTP/1.1\r\n{HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(SEND_JSON)}\r\nContent-Length: {len(SEND_JSON)}\r\n\r\n"
    ).encode()
    + SEND_JSON,
    "two_different_content_lengths": (
        f"POST {SEND} HTTP/1.1\r\n{HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(SEND_JSON)}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    + SEND_JSON,
    "obs_fold_space": f"GET {STATUS} HTTP/1.1\r\n{HOST}\r\nX-Folded: a\r\n b\r\n\r\n".encode(),
    "obs_fold_tab": f"GET {STATUS} HTTP/1.1\r\n{HOST}\r\nX-Folded: a\r\n\tb\r\n\r\n".encode(),
    "invalid_chunk_size": (
        f"POST {SEND} HTTP/1.1\r\n{HOST}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    ).encode()
    + SEND_JSON
    + b"\r\n0\r\n\r\n",
    "bare_lf": f"GET {STATUS} HTTP/1.1\n{HOST}\n\n".encode(),
    "bare_lf_in_headers_only": f"GET {STATUS} HTTP/1.1\r\n{HOST}\nX-A: b\n\r\n".encode(),
    "raw_control_char_in_path": (
        b"GET /api/sessions/s1\x01x/status?api_key=" + API_KEY.encode() + b" HTTP/1.1\r\n"
        b"Host: router.test\r\n\r\n"
    ),
    "raw_nul_in_path": (
        b"GET /api/sessions/s1\x00x/status?api_key=" + API_KEY.encode() + b" HTTP/1.1\r\n"
        b"Host: router.test\r\n\r\n"
    ),
    "raw_del_in_path": (
        b"GET /api/sessions/s1\x7fx/status?api_key=" + API_KEY.encode() + b" HTTP/1.1\r\n"
        b"Host: router.test\r\n\r\n"
    ),
    "encoded_crlf_in_path": (
        f"GET /api/sessions/s1%0d%0aX-Injected:%20yes/status?api_key={API_KEY} HTTP/1.1\r\n"
        f"{HOST}\r\n\r\n"
    ).encode(),
    "encoded_nul_in_path": (
        f"GET /api/sessions/s1%00/status?api_key={API_KEY} HTTP/1.1\r\n{HOST}\r\n\r\n"
    ).encode(),
    # Paths aiohttp answers (admin, Laravel's passthrough) are checked as the proxy's are.
    "encoded_crlf_in_an_admin_path": f"GET /admin/%0d%0aX HTTP/1.1\r\n{HOST}\r\n\r\n".encode(),
    "encoded_crlf_in_a_passthrough_path": (
        "POST /api/whatsapp/sessions/a%0d%0aX-Inj:%201/mark-disconnected HTTP/1.1\r\n"
        f"{HOST}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    ).encode(),
    "dot_segments_in_an_admin_path": (
        f"GET /admin/%2e%2e/metrics HTTP/1.1\r\n{HOST}\r\n\r\n".encode()
    ),
    # RFC 9112 3.2: one Host, and an HTTP/1.1 request has one.
    "two_hosts": f"GET {STATUS} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".encode(),
    "two_hosts_on_a_lent_route": b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "no_host_in_http_11": f"GET {STATUS} HTTP/1.1\r\nAccept: */*\r\n\r\n".encode(),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_is_400_json_and_closed_and_never_forwarded(
    sims: list[SimInstance], start_router: StartRouter, raw: bytes
) -> None:
    port, _ = await serve(start_router, sims)
    resp, closed = await exchange(port, raw)
    assert resp.status == 400, resp
    assert resp.error == "bad_request"
    assert resp.headers.get("Connection", "").lower() == "close"
    assert closed
    assert nothing_forwarded(sims)


AHEAD: dict[str, tuple[bool, list[str]]] = {
    "pipelined_after_lean": (True, [STATUS]),
    "pipelined_after_lean_and_healthz": (True, [STATUS, "/healthz"]),
    "after_lean": (False, [STATUS]),
    "after_aiohttp": (False, ["/healthz"]),
}


@pytest.mark.parametrize(("pipelined", "targets"), AHEAD.values(), ids=AHEAD.keys())
async def test_malformed_request_after_good_ones_is_refused_after_their_answers(
    sims: list[SimInstance], start_router: StartRouter, pipelined: bool, targets: list[str]
) -> None:
    port, _ = await serve(start_router, sims)
    malformed = MALFORMED["content_length_with_transfer_encoding"]
    conn = await Conn.open(port)
    try:
        if pipelined:  # all in one write
            await conn.send(b"".join(request("GET", t, HOST) for t in targets) + malformed)
            answers = [await conn.response() for _ in targets]
        else:
            answers = []
            for t in targets:
                await conn.send(request("GET", t, HOST))
                answers.append(await conn.response())
            await conn.send(malformed)
        assert [a.status for a in answers] == [200] * len(targets)
        await conn.refused(400, "bad_request")
    finally:
        await conn.close()
    assert len(forwarded(sims[0])) == targets.count(STATUS) and nothing_forwarded(sims[1:])


NOT_SERVED: dict[str, tuple[bytes, int, str]] = {
    # llhttp reads them; nothing here may take them for HTTP/1.x.
    "http_09_request_line": (f"GET {STATUS}\r\n\r\n".encode(), 505, "http_version_not_supported"),
    "http_20_request_line": (
        f"GET {STATUS} HTTP/2.0\r\n{HOST}\r\n\r\n".encode(),
        505,
        "http_version_not_supported",
    ),
    # Only chunked is decoded: a body sent on without its other coding would be misread.
    "gzip_then_chunked": (
        f"POST {SEND} HTTP/1.1\r\n{HOST}\r\nContent-Type: application/json\r\n".encode()
        + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
        + chunked(SEND_JSON, 40),
        501,
        "transfer_coding_not_supported",
    ),
    "gzip_field_then_chunked_field": (
        f"POST {SEND} HTTP/1.1\r\n{HOST}\r\nContent-Type: application/json\r\n".encode()
        + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(SEND_JSON, 40),
        501,
        "transfer_coding_not_supported",
    ),
}


@pytest.mark.parametrize("front", ["lean", "aiohttp"])
@pytest.mark.parametrize(("raw", "status", "error"), NOT_SERVED.values(), ids=NOT_SERVED.keys())
async def test_a_version_or_coding_not_served_is_refused_and_never_forwarded(
    sims: list[SimInstance],
    start_router: StartRouter,
    raw: bytes,
    status: int,
    error: str,
    front: str,
) -> None:
    # Both fronts: aiohttp's parser serves these as it reads them (`refusals.py`).
    port, _ = await serve(start_router, sims, server={"front": front})
    conn = await Conn.open(port)
    try:
        await conn.send(raw)
        answer = await conn.read_to_end()  # the router closes after it
    finally:
        await conn.close()
    # One answer. Its status line says HTTP/1.1 on the lean front; aiohttp's repeats the
    # request's version (HTTP/0.9, HTTP/2.0): the status and the JSON are what count.
    status_line, _, rest = answer.partition(b"\r\n")
    head, _, body = rest.partition(b"\r\n\r\n")
    if front == "aiohttp" and b"Transfer-Encoding: gzip\r\nTransfer-Encoding" in raw:
        # aiohttp's parser refuses a second Transfer-Encoding field itself, before the
        # router sees the request: its own 400, in plain text.
        assert int(status_line.split(b" ")[1]) == 400, answer
    else:
        assert int(status_line.split(b" ")[1]) == status, answer
        assert b"application/json" in head and json.loads(body)["error"] == error
    assert nothing_forwarded(sims)


async def test_an_http_10_request_needs_no_host(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    port, _ = await serve(start_router, sims)
    resp, closed = await exchange(port, request("GET", STATUS, version="1.0"))
    assert resp.status == 200 and resp.json()["status"] == "connected"
    assert closed


# -- 2. absolute-form targets ---------------------------------------------------------------------


@pytest.mark.parametrize("named", ["evil.example:9", "sim1"])
async def test_absolute_form_target_is_routed_by_its_path_never_to_the_host(
    sims: list[SimInstance], start_router: StartRouter, named: str
) -> None:
    port, _ = await serve(start_router, sims)
    # "sim1": the host named is another instance of the pool, which must not be asked.
    authority = sims[1].url.removeprefix("http://") if named == "sim1" else named
    target = f"http://{authority}/api/sessions/s1/status?api_key={API_KEY}"
    resp, _ = await exchange(port, request("GET", target, f"Host: {authority}"))
    assert resp.status == 200, resp
    assert resp.json()["status"] == "connected"
    got = forwarded(sims[0], "GET", "/api/sessions/s1/status")
    assert len(got) == 1 and got[0].query == {"api_key": API_KEY}
    assert nothing_forwarded(sims[1:])


# -- 3. size limits ---------------------------------------------------------------------------

LIMITS = {"max_header_bytes": 2048, "max_body_bytes": 1000}


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [
        (request("GET", STATUS, HOST, "X-Pad: " + "a" * 3000), 431, "header_fields_too_large"),
        (
            request("GET", STATUS, HOST, *(f"X-Pad-{i}: {'a' * 30}" for i in range(100))),
            431,
            "header_fields_too_large",
        ),
        (request("GET", STATUS + "&pad=" + "a" * 3000, HOST), 414, "uri_too_long"),
        (request("GET", "/api/sessions/" + "s" * 3000 + "/status", HOST), 414, "uri_too_long"),
    ],
    ids=["one_big_header", "many_headers", "long_query", "long_path"],
)
@pytest.mark.parametrize("ahead", ["fresh", "aiohttp"])
async def test_head_over_the_limit_is_refused_and_closed(
    sims: list[SimInstance],
    start_router: StartRouter,
    raw: bytes,
    status: int,
    error: str,
    ahead: str,
) -> None:
    port, _ = await serve(start_router, sims, limits=LIMITS)
    conn = await Conn.open(port)
    try:
        await before(conn, ahead)
        await conn.send(raw)
        await conn.refused(status, error)
    finally:
        await conn.close()
    assert nothing_forwarded(sims)


async def test_a_lent_request_with_many_fields_under_the_head_limit_is_answered(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """200 fields, 3 KiB: under limits.max_header_bytes, so aiohttp answers it too (once,
    its own cap of 128 fields answered a plain-text 400, its status line HTTP/1.0)."""
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    try:
        await conn.send(request("GET", "/healthz", HOST, *(f"X-Pad-{i}: a" for i in range(200))))
        resp = await conn.response()
        assert (resp.status, resp.json()) == (200, {"status": "alive"}), resp
    finally:
        await conn.close()


async def test_content_length_over_the_limit_is_413_before_the_body_is_sent(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    port, _ = await serve(start_router, sims, limits=LIMITS)
    conn = await Conn.open(port)
    try:
        head = f"POST {SEND} HTTP/1.1\r\n{HOST}\r\nContent-Type: application/json\r\n"
        await conn.send(f"{head}Content-Length: 5000\r\n\r\n".encode())  # the body never sent
        await conn.refused(413, "payload_too_large")
    finally:
        await conn.close()
    assert nothing_forwarded(sims)


async def test_chunked_body_growing_past_the_limit_is_413(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    port, _ = await serve(start_router, sims, limits=LIMITS)
    conn = await Conn.open(port)
    try:
        head = f"POST {SEND} HTTP/1.1\r\n{HOST}\r\nContent-Type: application/json\r\n"
        await conn.send(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        await conn.send(b"258\r\n" + b" " * 600 + b"\r\n")  # 600 bytes: under the limit
        await conn.send(b"258\r\n" + b" " * 600 + b"\r\n")  # 1200: over it (no end sent)
        await conn.refused(413, "payload_too_large")
    finally:
        await conn.close()
    assert nothing_forwarded(sims)


# -- 4. timeouts --------------------------------------------------------------------------------

TIMEOUT_S = 0.3
TIMEOUTS = {
    "header_timeout_s": TIMEOUT_S,
    "body_timeout_s": TIMEOUT_S,
    "keepalive_timeout_s": TIMEOUT_S,
}


@pytest.mark.parametrize("ahead", ["fresh", "lean", "aiohttp"])
async def test_half_sent_head_gets_408_and_close(
    sims: list[SimInstance], start_router: StartRouter, ahead: str
) -> None:
    port, _ = await serve(start_router, sims, server=TIMEOUTS)
    conn = await Conn.open(port)
    try:
        await before(conn, ahead)
        started = time.monotonic()
        await conn.send(f"GET {STATUS} HTTP/1.1\r\n{HOST}\r\n".encode())  # no blank line
        resp = await conn.response()
        assert time.monotonic() - started >= TIMEOUT_S * 0.9
        assert (resp.status, resp.error) == (408, "request_timeout")
        assert await conn.closed()
    finally:
        await conn.close()
    assert len(forwarded(sims[0])) == (1 if ahead == "lean" else 0)


WEBHOOK = "/api/whatsapp/webhooks/webjs"  # aiohttp's route (the intake), once its head is read


@pytest.mark.parametrize(
    ("ahead", "target"),
    [("fresh", SEND), ("fresh", WEBHOOK), ("lean", WEBHOOK), ("aiohttp", SEND)],
    ids=["lean_route", "aiohttp_route", "aiohttp_route_after_lean", "lean_route_after_aiohttp"],
)
async def test_half_sent_body_gets_408_and_close(
    sims: list[SimInstance], start_router: StartRouter, ahead: str, target: str
) -> None:
    port, _ = await serve(
        start_router, sims, server=TIMEOUTS, webhooks={"secrets": ["a-webhook-secret"]}
    )
    conn = await Conn.open(port)
    try:
        await before(conn, ahead)
        whole = request("POST", target, HOST, body=SEND_JSON)
        started = time.monotonic()
        await conn.send(whole[: len(whole) - len(SEND_JSON) // 2])
        resp = await conn.response()
        assert time.monotonic() - started >= TIMEOUT_S * 0.9
        assert (resp.status, resp.error) == (408, "request_timeout")
        assert await conn.closed()
    finally:
        await conn.close()
    assert len(forwarded(sims[0])) == (1 if ahead == "lean" else 0)
    assert nothing_forwarded(sims[1:])


@pytest.mark.parametrize("ahead", ["fresh", "lean", "aiohttp"])
async def test_idle_connection_is_closed_after_its_timeout(
    sims: list[SimInstance], start_router: StartRouter, ahead: str
) -> None:
    """Nothing sent: closed after the header timeout, with no answer; idle after an answer
    (kept alive): closed after the keep-alive timeout."""
    port, _ = await serve(start_router, sims, server=TIMEOUTS)
    conn = await Conn.open(port)
    try:
        await before(conn, ahead)
        started = time.monotonic()
        assert await conn.closed(), "still open after the keep-alive timeout"
        assert time.monotonic() - started >= TIMEOUT_S * 0.9
    finally:
        await conn.close()


# -- 5. the connection cap ----------------------------------------------------------------------


async def test_connection_past_the_cap_gets_503_and_a_freed_slot_is_served(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    port, _ = await serve(start_router, sims, server={"max_connections": 3})
    held = [await Conn.open(port) for _ in range(3)]
    try:
        # Each served (so accepted and counted); the last one aiohttp's, the others lean.
        for conn, target in zip(held, [STATUS, STATUS, "/healthz"], strict=True):
            await conn.send(request("GET", target, HOST))
            assert (await conn.response()).status == 200
        fourth = await Conn.open(port)
        try:
            resp = await fourth.response()
            assert (resp.status, resp.error) == (503, "too_many_connections")
            assert resp.headers.get("Retry-After") == "1"
            assert await fourth.closed()
        finally:
            await fourth.close()
        await held.pop(0).close()
        # The freed slot is seen once the router has noticed the close: until then a new
        # connection is refused as the fourth was (bounded by the deadline).
        deadline = time.monotonic() + READ_S
        while True:
            conn = await Conn.open(port)
            await conn.send(request("GET", STATUS, HOST))
            resp = await conn.response()
            if resp.status == 200:
                held.append(conn)
                break
            assert resp.error == "too_many_connections"
            await conn.close()
            assert time.monotonic() < deadline, "a closed connection never freed its slot"
            await asyncio.sleep(0.01)
        assert resp.json()["status"] == "connected"
    finally:
        for conn in held:
            await conn.close()


async def test_a_flood_past_the_cap_lingers_boundedly_each_connection_still_answered(
    sims: list[SimInstance],
    start_router: StartRouter,
    monkeypatch: pytest.MonkeyPatch,
    json_log: io.StringIO,
) -> None:
    """A refused connection lingers after its 503 (so a reset does not hide the answer), but
    only so many at once: a flood of them must not take the descriptors the cap keeps. Each
    is counted in /metrics; the log says it once, not once per connection."""
    monkeypatch.setattr(lean_module, "REFUSED_LINGERING_MAX", 2)
    monkeypatch.setattr(lean_module, "REFUSED_LOG_EVERY_S", 1.0)
    port, lean = await serve_lean(start_router, sims, max_connections=1)
    held = await Conn.open(port)
    refused: list[Conn] = []
    try:
        await held.send(request("GET", STATUS, HOST))
        assert (await held.response()).status == 200
        for _ in range(6):
            conn = await Conn.open(port)
            refused.append(conn)
            resp = await conn.response()
            assert (resp.status, resp.error) == (503, "too_many_connections")
            assert lean.refused_lingering <= 2
        assert lean.refused_lingering == 2  # the first two linger; the rest were closed
        for conn in refused:
            await conn.close()
        await wait_for(lambda: lean.refused_lingering == 0, what="the lingering ones to end")
        # The connection the cap counts was never disturbed.
        await held.send(request("GET", STATUS, HOST))
        assert (await held.response()).status == 200
        await held.send(request("GET", "/metrics", HOST))
        metrics = (await held.response()).body.decode()
        assert (
            'wa_router_requests_total{route_kind="rejected",status_class="5xx",upstream="none"}'
            " 6.0" in metrics
        ), metrics

        def said() -> list[dict[str, Any]]:
            lines = [json.loads(line) for line in json_log.getvalue().splitlines() if line]
            return [line for line in lines if line.get("event") == "connection_refused"]

        # The first at once; the rest summed up when the period (1 s here) is over.
        await wait_for(lambda: sum(line["connections"] for line in said()) == 6, what="six said")
        assert said()[0]["connections"] == 1
        assert len(said()) < 6, said()
    finally:
        await held.close()
        for conn in refused:
            await conn.close()


# -- 6. deep JSON -------------------------------------------------------------------------------


@pytest.mark.parametrize("opener", [b"[", b'{"a":'], ids=["arrays", "objects"])
async def test_json_nested_past_1024_levels_is_400_not_500(
    sims: list[SimInstance], start_router: StartRouter, opener: bytes
) -> None:
    port, _ = await serve(start_router, sims)
    closer = b"]" if opener == b"[" else b"}"
    deep = opener * 1100 + b"1" + closer * 1100
    body = SEND_JSON[:-1] + b', "deep": ' + deep + b"}"
    resp, _ = await exchange(port, request("POST", SEND, HOST, body=body))
    assert (resp.status, resp.error) == (400, "bad_request"), resp
    assert nothing_forwarded(sims)


# -- 7. HEAD, 100-continue, chunked bodies, HTTP/1.0, pipelining, Upgrade ---------------------


async def test_head_has_no_body_and_keeps_content_length(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    try:
        await conn.send(request("GET", STATUS, HOST))
        got = await conn.response()
        assert got.status == 200 and got.body
        await conn.send(request("HEAD", STATUS, HOST))
        head = await conn.response(head_only=True)
        assert head.status == 200
        assert head.headers.get("Content-Length") == str(len(got.body))
        # A body after the HEAD answer would be read as the next answer's status line.
        await conn.send(request("GET", STATUS, HOST))
        again = await conn.response()
        assert again.status == 200 and again.json()["status"] == "connected"
    finally:
        await conn.close()
    assert [r.method for r in forwarded(sims[0])] == ["GET", "HEAD", "GET"]


async def test_head_goes_wherever_get_goes_pool_wide_too(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """HEAD is GET without the content (RFC 9110 9.3.2): the pool-wide list answers it
    (once, "no route rule matches"), with no body, and the connection goes on."""
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    try:
        listing = f"/api/sessions?api_key={API_KEY}"
        await conn.send(request("HEAD", listing, HOST))
        head = await conn.response(head_only=True)
        assert head.status == 200 and head.headers["Content-Type"].startswith("application/json")
        await conn.send(request("GET", listing, HOST))
        got = await conn.response()
        assert got.status == 200 and "s1" in got.body.decode(), got
    finally:
        await conn.close()


HEAD_REFUSED: dict[str, tuple[bytes, int]] = {
    "no_route": (f"HEAD /nothing HTTP/1.1\r\n{HOST}\r\n\r\n".encode(), 400),
    "too_large": (
        f"HEAD {STATUS} HTTP/1.1\r\n{HOST}\r\nContent-Length: 99999999\r\n\r\n".encode(),
        413,
    ),
    "coding_not_served": (
        f"HEAD {STATUS} HTTP/1.1\r\n{HOST}\r\nTransfer-Encoding: gzip\r\n\r\n".encode(),
        501,
    ),
    "version_not_served": (
        f"HEAD {STATUS} HTTP/2.0\r\n{HOST}\r\n\r\n".encode(),
        505,
    ),
}


@pytest.mark.parametrize(("raw", "status"), HEAD_REFUSED.values(), ids=HEAD_REFUSED.keys())
async def test_a_refused_head_request_gets_a_head_and_no_body(
    sims: list[SimInstance], start_router: StartRouter, raw: bytes, status: int
) -> None:
    """RFC 9110 9.3.2: an answer to HEAD has no content, refusals too (once, the JSON body
    followed the head, and a client reads it as the next answer)."""
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    try:
        await conn.send(raw)
        resp = await conn.response(head_only=True)
        assert resp.status == status, resp
        assert resp.headers["Content-Type"].startswith("application/json")
        assert await conn.closed()  # and nothing after the head
    finally:
        await conn.close()
    assert nothing_forwarded(sims)


async def test_expect_100_continue_gets_100_before_the_answer(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    try:
        whole = request("POST", SEND, HOST, "Expect: 100-continue", body=SEND_JSON)
        await conn.send(whole[: -len(SEND_JSON)])  # the head only: the body waits for 100
        interim = await conn.response()
        assert (interim.status, interim.reason) == (100, "Continue")
        await conn.send(SEND_JSON)
        resp = await conn.response()
        assert resp.status == 200 and resp.json()["message_id"]
    finally:
        await conn.close()
    got = forwarded(sims[0], "POST", SEND)
    assert len(got) == 1 and got[0].json == json.loads(SEND_JSON)
    assert "Expect" not in got[0].headers


EXPECT_REFUSED: dict[str, tuple[str, int, int, str]] = {
    # Webhooks and Laravel's passthrough take 1 MiB (webhooks.max_body_bytes), less than
    # the proxied routes' limit: once, a 100 asked for the 2 MB and aiohttp refused them.
    "webhook_over_its_limit": ("/api/whatsapp/webhooks/webjs", 2_000_000, 413, "payload_too_large"),
    "passthrough_over_its_limit": (
        "/api/whatsapp/accounts/active",
        2_000_000,
        413,
        "payload_too_large",
    ),
    # The session id in the path is known bad from the head: once, 100 came first.
    "bad_session_id_in_path": ("/api/sessions/a%2Fb/reconnect", 30, 400, "bad_request"),
}


@pytest.mark.parametrize(
    ("path", "length", "status", "error"), EXPECT_REFUSED.values(), ids=EXPECT_REFUSED.keys()
)
async def test_a_request_refused_from_its_head_gets_no_100_continue(
    sims: list[SimInstance],
    start_router: StartRouter,
    path: str,
    length: int,
    status: int,
    error: str,
) -> None:
    """What the head already says is refused is refused before the body is asked for."""
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    try:
        head = f"POST {path} HTTP/1.1\r\n{HOST}\r\nContent-Type: application/json\r\n"
        await conn.send(f"{head}Expect: 100-continue\r\nContent-Length: {length}\r\n\r\n".encode())
        await conn.refused(status, error)
    finally:
        await conn.close()
    assert nothing_forwarded(sims)


async def test_100_continue_comes_after_the_answers_before_it(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """Pipelined: a GET, then a POST head with `Expect: 100-continue`. The interim answer
    belongs to the POST, so it must not come before the GET's answer (RFC 9112 9.3.2)."""
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    try:
        post = request("POST", SEND, HOST, "Expect: 100-continue", body=SEND_JSON)
        await conn.send(request("GET", STATUS, HOST) + post[: -len(SEND_JSON)])
        first = await conn.response()
        assert first.status == 200, f"the GET's answer came after {first}"
        assert first.json()["status"] == "connected"
        interim = await conn.response()
        assert interim.status == 100
        await conn.send(SEND_JSON)
        resp = await conn.response()
        assert resp.status == 200 and resp.json()["message_id"]
    finally:
        await conn.close()


async def test_a_100_continue_owed_is_not_sent_once_the_caller_half_closes(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """As above (a HEAD first: answered by the connection's worker, not the express lane),
    but the caller half-closes after the POST's head: its body never comes, so the HEAD's
    answer is the last thing written (a stray 100 after it, then the close, would read as
    the start of an answer cut short)."""
    port, lean = await serve_lean(start_router, sims)
    resp, _ = await exchange(port, request("GET", STATUS, HOST, "Connection: close"))
    assert resp.status == 200  # s1 is known on sims[0] now
    sims[0].pause()
    conn = await Conn.open(port)
    try:
        post = request("POST", SEND, HOST, "Expect: 100-continue", body=SEND_JSON)
        await conn.send(request("HEAD", STATUS, HOST))
        await wait_for(lambda: len(forwarded(sims[0])) == 2, READ_S, "the HEAD sent")
        await conn.send(post[: -len(SEND_JSON)])
        conn.writer.write_eof()
        await wait_for(lambda: any(c.half_closed for c in lean.connections), READ_S, "the EOF")
        sims[0].resume()
        first = await conn.response(head_only=True)
        assert first.status == 200, first
        assert first.headers.get("Connection") == "close"
        assert await conn.closed()
    finally:
        await conn.close()
    assert not forwarded(sims[0], "POST")


@pytest.mark.parametrize(
    "body",
    [
        b"\xef\xbb\xbf" + SEND_JSON,  # a byte order mark
        # A text cut mid-emoji, as JavaScript's JSON.stringify writes it.
        SEND_JSON[:-1] + b', "caption": "\\ud83d"}',
    ],
    ids=["bom", "lone_surrogate"],
)
async def test_a_send_node_would_take_but_orjson_alone_would_not_is_routed(
    sims: list[SimInstance], start_router: StartRouter, body: bytes
) -> None:
    """Express's JSON parser takes these; a 400 from the router would refuse a send Node
    takes. Its session id is read, and the body goes as it came."""
    port, _ = await serve(start_router, sims)
    resp, _ = await exchange(port, request("POST", SEND, HOST, "Connection: close", body=body))
    assert resp.status == 200 and resp.json()["success"] is True, resp
    (sent,) = forwarded(sims[0], "POST", SEND)
    assert sent.json is not None and sent.json["session_id"] == "s1"


CLIENT_KEY = "laravel-key"


async def test_the_node_key_goes_into_a_body_only_node_s_parser_reads(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """A client key, and a text cut mid-emoji (a lone surrogate escape): the body is read
    as Node reads it and written again with the Node key, the text as it was. (Once a 500:
    the body could not be encoded again.)"""
    port, _ = await serve(start_router, sims, upstream={"client_keys": [CLIENT_KEY]})
    doc = {k: v for k, v in send_body("s1").items() if k != "api_key"}
    body = json.dumps(doc).encode()[:-1] + b', "caption": "\\ud83d"}'
    target = f"{SEND}?api_key={CLIENT_KEY}"
    resp, _ = await exchange(port, request("POST", target, HOST, "Connection: close", body=body))
    assert resp.status == 200 and resp.json()["success"] is True, resp
    (sent,) = forwarded(sims[0], "POST", SEND)
    assert sent.json is not None and sent.json["api_key"] == API_KEY
    assert sent.json["caption"] == "\ud83d" and "api_key" not in sent.query


@pytest.mark.parametrize(("depth", "status"), [(300, 200), (1000, 400)])
async def test_the_node_key_goes_into_a_deep_body_or_the_caller_hears_why_not(
    sims: list[SimInstance], start_router: StartRouter, depth: int, status: int
) -> None:
    """orjson reads 1024 levels and writes 255: a deeper body is written again another way,
    and one too deep for that is a 400 that says so (once a 500), sent nowhere."""
    port, _ = await serve(start_router, sims, upstream={"client_keys": [CLIENT_KEY]})
    doc = {k: v for k, v in send_body("s1").items() if k != "api_key"}
    body = json.dumps(doc).encode()[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    target = f"{SEND}?api_key={CLIENT_KEY}"
    resp, _ = await exchange(port, request("POST", target, HOST, "Connection: close", body=body))
    assert resp.status == status, resp
    if status == 400:
        assert resp.error == "bad_request" and "nested too deeply" in resp.json()["message"]
        assert nothing_forwarded(sims)
    else:
        (sent,) = forwarded(sims[0], "POST", SEND)
        assert sent.json is not None and sent.json["api_key"] == API_KEY


async def test_a_key_holding_a_lone_surrogate_is_no_client_key_and_goes_as_it_came(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """A key no URL or header can carry is nobody's key (once a 500: it could not be
    encoded): the session is looked for without one, the instances refuse that, and the
    caller hears 401; nothing is sent."""
    port, _ = await serve(start_router, sims, upstream={"client_keys": [CLIENT_KEY]})
    body = json.dumps({**send_body("s1"), "api_key": CLIENT_KEY + "\ud83d"}).encode()
    resp, _ = await exchange(port, request("POST", SEND, HOST, "Connection: close", body=body))
    assert resp.status == 401 and resp.error == "unauthorized", resp
    assert nothing_forwarded(sims)


async def test_chunked_request_body_is_forwarded_whole(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    port, _ = await serve(start_router, sims)
    head = f"POST {SEND} HTTP/1.1\r\n{HOST}\r\nContent-Type: application/json\r\n"
    raw = f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunked(SEND_JSON, 1, 17, 40)
    conn = await Conn.open(port)
    try:
        await conn.send(raw)
        resp = await conn.response()
        assert resp.status == 200, resp
        assert resp.json()["message_id"]
    finally:
        await conn.close()
    got = forwarded(sims[0], "POST", SEND)
    assert len(got) == 1 and got[0].json == json.loads(SEND_JSON)
    assert "Transfer-Encoding" not in got[0].headers or "Content-Length" not in got[0].headers


@pytest.mark.parametrize(
    "asks", [None, "Connection: keep-alive", "Proxy-Connection: keep-alive"]
)  # llhttp keeps a 1.0 connection open for either field
async def test_http_10_request_is_answered_and_closed_unless_kept_alive(
    sims: list[SimInstance], start_router: StartRouter, asks: str | None
) -> None:
    port, _ = await serve(start_router, sims)
    keep_alive = asks is not None
    extra = [asks] if asks is not None else []
    conn = await Conn.open(port)
    try:
        await conn.send(request("GET", STATUS, HOST, *extra, version="1.0"))
        resp = await conn.response()
        assert resp.status == 200 and resp.json()["status"] == "connected"
        if not keep_alive:
            assert await conn.closed()
            return
        assert resp.headers.get("Connection", "").lower() == "keep-alive"
        await conn.send(request("GET", STATUS, HOST, *extra, version="1.0"))
        assert (await conn.response()).status == 200
    finally:
        await conn.close()


def _send_chunked() -> bytes:
    head = f"POST {SEND} HTTP/1.1\r\n{HOST}\r\nContent-Type: application/json\r\n"
    return f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunked(SEND_JSON, 30)


PIPELINE_THIRD: dict[str, bytes] = {
    "get": request("GET", STATUS, HOST),
    "post": request("POST", SEND, HOST, body=SEND_JSON),
    "post_chunked": _send_chunked(),
}


@pytest.mark.parametrize("third", PIPELINE_THIRD.values(), ids=PIPELINE_THIRD.keys())
async def test_pipelined_requests_across_the_handover_are_answered_in_order(
    sims: list[SimInstance], start_router: StartRouter, third: bytes
) -> None:
    """A lean route, then /healthz (aiohttp's: the connection is handed over with what was
    read of it), then a lean route again, all in one write."""
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    try:
        await conn.send(request("GET", STATUS, HOST) + request("GET", "/healthz", HOST) + third)
        first, second, last = [await conn.response() for _ in range(3)]
        assert first.status == 200 and first.json()["status"] == "connected"
        assert second.status == 200 and second.json() == {"status": "alive"}
        assert last.status == 200, last
        assert last.json().get("message_id" if third.startswith(b"POST") else "status")
        # And the connection still works.
        await conn.send(request("GET", STATUS, HOST))
        assert (await conn.response()).json()["status"] == "connected"
    finally:
        await conn.close()
    if third.startswith(b"POST"):
        got = forwarded(sims[0], "POST", SEND)
        assert len(got) == 1 and got[0].json == json.loads(SEND_JSON)


async def test_a_head_in_pieces_then_the_next_request_each_have_their_own_target_and_fields(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """A request's head written in pieces (its method alone, its target cut in two, a
    fragment), then another on the same connection: each goes where its own target says,
    with its own fields only (a request begins with its target's first bytes)."""
    port, _ = await serve(start_router, sims)
    sims[1].add_session("s2")
    conn = await Conn.open(port)
    try:
        first = request("GET", STATUS + "#part", HOST, "X-Trace: first")
        for at, end in ((0, 3), (3, 10), (10, 24), (24, len(first))):
            await conn.send(first[at:end])
        resp = await conn.response()
        assert resp.status == 200 and resp.json()["status"] == "connected", resp
        await conn.send(request("GET", f"/api/sessions/s2/status?api_key={API_KEY}", HOST))
        resp = await conn.response()
        assert resp.status == 200 and resp.json()["status"] == "connected", resp
    finally:
        await conn.close()
    (one,) = forwarded(sims[0], "GET", "/api/sessions/s1/status")
    assert one.query == {"api_key": API_KEY} and one.headers.get("X-Trace") == "first"
    (two,) = forwarded(sims[1], "GET", "/api/sessions/s2/status")
    assert "X-Trace" not in two.headers


UPGRADES = {
    "websocket": (
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ),
    "h2c": (
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAAQAAP__",
    ),
    "upgrade_without_connection": ("Upgrade: websocket",),
}


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_a_caller_that_half_closes_after_its_send_still_gets_the_answer(
    sims: list[SimInstance], start_router: StartRouter, version: str
) -> None:
    """A caller may shut its sending side once its request is out and read on (RFC 9112
    9.6). The send went to Node, so its answer must come back: lost, the caller would retry
    and the message go out twice. (Once, the EOF closed the connection unanswered.)"""
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    try:
        await conn.send(request("POST", SEND, HOST, body=SEND_JSON, version=version))
        conn.writer.write_eof()
        resp = await conn.response()
        assert resp.status == 200 and resp.json().get("success") is True, resp
        assert await conn.closed()
    finally:
        await conn.close()
    assert len(forwarded(sims[0], "POST", SEND)) == 1


async def leave(conn: Conn, how: str) -> Response | None:
    """The caller goes away: closes, resets, or half-closes (then reads what comes)."""
    if how == "half_close":
        conn.writer.write_eof()
        resp = await conn.response()
        assert await conn.closed()
        return resp
    if how == "reset":
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await conn.close()
    return None


async def leave_seen(conn: Conn, lean: LeanServer, how: str) -> None:
    """The caller goes as `leave` says, and the router has seen it go (a half-closed one
    stays, to read what comes)."""
    if how == "half_close":
        conn.writer.write_eof()
        await wait_for(lambda: any(c.half_closed for c in lean.connections), 5, "the EOF")
    else:
        await leave(conn, how)
        await wait_for(lambda: not lean.connections, 5, "the caller gone")


def told_nothing_was_sent(resp: Response | None, how: str) -> None:
    """A caller that can still read hears that its send waits no more and went nowhere."""
    if how != "half_close":
        return
    assert resp is not None and resp.status == 503, resp
    doc = resp.json()
    assert (doc["error"], doc["reason"]) == ("session_unavailable", "caller_closed"), doc
    assert "Nothing was sent" in doc["message"] and resp.headers.get("Connection") == "close"


async def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp, _ = await exchange(port, request("GET", "/metrics", HOST, "Connection: close"))
    assert resp.status == 200, resp
    return samples(resp.body.decode())


async def sent_once_more_when_back(port: int, sims: list[SimInstance], before: int) -> None:
    """s1 comes back on sims[0]: a new send gets there, and it is the only one (the send
    given up is never sent)."""
    await sims[0].start()
    sims[0].add_session("s1", notify=True)
    resp, _ = await exchange(port, request("POST", SEND, HOST, "Connection: close", body=SEND_JSON))
    assert resp.status == 200, resp
    assert len(forwarded(sims[0], "POST", SEND)) == before + 1


@pytest.mark.parametrize("how", ["close", "half_close", "reset"])
async def test_a_send_waiting_for_its_session_is_given_up_when_its_caller_goes(
    sims: list[SimInstance], start_router: StartRouter, how: str
) -> None:
    """A send parked (its owner down) whose caller closes, half-closes or resets: given up,
    never sent later to nobody, since a caller that retries would have it sent twice. A
    half-closed caller, which may still read, hears 503: nothing was sent."""
    port, router = await serve(start_router, sims)
    resp, _ = await exchange(port, request("POST", SEND, HOST, "Connection: close", body=SEND_JSON))
    assert resp.status == 200
    await sims[0].stop()  # s1's owner is down: the next send waits for it
    conn = await Conn.open(port)
    try:
        await conn.send(request("POST", SEND, HOST, body=SEND_JSON))
        await wait_for(lambda: router.parking.parked == 1, 5, "the send parked")
        told_nothing_was_sent(await leave(conn, how), how)
    finally:
        await conn.close()
    await wait_for(lambda: router.parking.parked == 0, 5, "the parked send given up")
    m = await metrics(port)
    assert value(m, "wa_router_parked_total", outcome="abandoned") == 1
    assert value(m, "wa_router_parked_total", outcome="woken") == 0
    dropped = "wa_router_requests_dropped_total"
    assert value(m, dropped, reason="caller_gone_while_waiting") == 1
    assert value(m, dropped, reason="caller_gone") == 0
    await sent_once_more_when_back(port, sims, 1)


@pytest.mark.parametrize("how", ["close", "half_close", "reset"])
async def test_a_send_whose_caller_goes_while_its_session_is_looked_for_never_waits(
    sims: list[SimInstance], start_router: StartRouter, how: str
) -> None:
    """The caller goes while the router looks for its session (the owner refused the
    connection; the others are slow to say they do not have it): the send is not parked
    when the search comes back empty, so it is never sent later to nobody. (Once, only a
    send already waiting at the moment the caller left was given up.)"""
    port, lean = await serve_lean(start_router, sims)
    router = lean.router
    resp, _ = await exchange(port, request("POST", SEND, HOST, "Connection: close", body=SEND_JSON))
    assert resp.status == 200
    await sims[0].stop()
    for sim in sims[1:]:
        sim.pause()  # they take the rediscovery's questions and answer only once resumed
    asked = [len(sim.received) for sim in sims[1:]]
    conn = await Conn.open(port)
    try:
        await conn.send(request("POST", SEND, HOST, body=SEND_JSON))
        await wait_for(
            lambda: any(len(s.received) > n for s, n in zip(sims[1:], asked, strict=True)),
            5,
            "the session looked for",
        )
        await leave_seen(conn, lean, how)
        for sim in sims[1:]:
            sim.resume()
        if how == "half_close":
            told_nothing_was_sent(await conn.response(), how)
            assert await conn.closed()
    finally:
        await conn.close()
    await wait_for(
        lambda: router.proxy.stats.unavailable["caller_closed"] == 1, 5, "the send given up"
    )
    m = await metrics(port)
    assert value(m, "wa_router_session_unavailable_total", reason="caller_closed") == 1
    assert router.parking.parked == 0 and not router.parking.stats.outcomes
    assert nothing_forwarded(sims[1:])
    await sent_once_more_when_back(port, sims, 1)


@pytest.mark.parametrize("how", ["reset", "half_close"])
async def test_a_send_found_elsewhere_after_its_caller_left_is_sent_only_if_it_can_read(
    sims: list[SimInstance], start_router: StartRouter, how: str
) -> None:
    """s1 moved to sims[1] while its old owner is down; the router finds it there, but the
    caller leaves while it looks. Reset, its send is not made (nobody would read the answer;
    a caller that retries would have it twice); half-closed, it can still read: sent, and
    answered. (A plain close looks like a half-close until a write fails.)"""
    port, lean = await serve_lean(start_router, sims)
    router = lean.router
    resp, _ = await exchange(port, request("POST", SEND, HOST, "Connection: close", body=SEND_JSON))
    assert resp.status == 200
    await sims[0].stop()
    sims[1].add_session("s1")
    sims[1].pause()  # it has s1, and answers the rediscovery's question once resumed
    asked = len(sims[1].received)
    conn = await Conn.open(port)
    try:
        await conn.send(request("POST", SEND, HOST, body=SEND_JSON))
        await wait_for(lambda: len(sims[1].received) > asked, 5, "s1 looked for on sims[1]")
        await leave_seen(conn, lean, how)
        sims[1].resume()
        if how == "half_close":
            resp = await conn.response()
            assert resp.status == 200 and resp.json()["success"] is True, resp
            assert await conn.closed()
            assert len(forwarded(sims[1], "POST", SEND)) == 1
            return
    finally:
        await conn.close()
    await wait_for(lambda: router.proxy.stats.dropped["caller_gone"] == 1, 5, "the send not made")
    assert not forwarded(sims[1], "POST", SEND)
    m = await metrics(port)
    assert value(m, "wa_router_requests_dropped_total", reason="caller_gone") == 1


async def test_a_caller_reset_as_the_lane_hands_over_leaves_nothing_in_flight(
    sims: list[SimInstance], start_router: StartRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lane's attempt is refused (s1 is not on its owner any more) and the caller's
    reset is read in the same loop pass (forced here: the order of two events of one pass
    cannot be arranged on a socket). Nothing is left counted in flight: once a done task
    stayed there, and the next shutdown waited its whole grace for it."""
    port, lean = await serve_lean(start_router, sims)
    router = lean.router
    resp, _ = await exchange(port, request("POST", SEND, HOST, "Connection: close", body=SEND_JSON))
    assert resp.status == 200
    sims[0].sessions.pop("s1")  # the lane's next attempt: 404 Session not found
    handed_over = lean_module.LeanConnection.express_fallback

    def reset_then_hand_over(self: lean_module.LeanConnection, req: Any) -> None:
        self.abort()  # the caller's reset, handled before the worker first runs
        handed_over(self, req)

    monkeypatch.setattr(lean_module.LeanConnection, "express_fallback", reset_then_hand_over)
    conn = await Conn.open(port)
    try:
        await conn.send(request("POST", SEND, HOST, body=SEND_JSON))
        await wait_for(lambda: router.proxy.stats.express["handed_over"] == 1, 5, "hand-over")
        await wait_for(lambda: not lean.connections, 5, "the caller gone")
    finally:
        await conn.close()
    await wait_for(lambda: not router.inflight.tasks, 5, "nothing in flight")
    assert router.proxy.stats.dropped["caller_gone"] == 1  # taken nowhere else


async def test_after_a_half_close_what_came_whole_is_answered_in_order_and_the_rest_dropped(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """Pipelined: a proxied request, one aiohttp answers, and the start of a third, then
    the caller's EOF. The two whole ones are answered in order; the third, cut short, goes
    nowhere; then the router closes."""
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    try:
        cut = request("GET", STATUS, HOST)[:20]
        await conn.send(request("GET", STATUS, HOST) + request("GET", "/healthz", HOST) + cut)
        conn.writer.write_eof()
        first, second = await conn.response(), await conn.response()
        assert first.json().get("status") == "connected", first
        assert (second.status, second.json()) == (200, {"status": "alive"}), second
        assert await conn.closed()
    finally:
        await conn.close()
    assert len(forwarded(sims[0])) == 1 and nothing_forwarded(sims[1:])


@pytest.mark.parametrize("front", ["lean", "aiohttp"])
@pytest.mark.parametrize("headers", UPGRADES.values(), ids=UPGRADES.keys())
async def test_upgrade_is_refused_with_a_clear_4xx(
    sims: list[SimInstance], start_router: StartRouter, headers: tuple[str, ...], front: str
) -> None:
    port, _ = await serve(start_router, sims, server={"front": front})
    resp, closed = await exchange(port, request("GET", STATUS, HOST, *headers))
    assert 400 <= resp.status < 500 and resp.status != 404, resp
    assert resp.error == "upgrade_refused"
    assert closed
    assert nothing_forwarded(sims)


# -- 8. nothing of a refused request is logged --------------------------------------------------

MARKER = "zz-secret-marker-91c4"
_M = MARKER.encode()
REFUSED_WITH_MARKER: dict[str, bytes] = {
    "bare_lf": b"GET /api/sessions/" + _M + b"/status?k=" + _M + b" HTTP/1.1\nX-S: " + _M + b"\n\n",
    "obs_fold": (
        b"GET /api/sessions/"
        + _M
        + b"/status HTTP/1.1\r\nHost: r\r\nX-S: "
        + _M
        + b"\r\n "
        + _M
        + b"\r\n\r\n"
    ),
    "encoded_crlf": (
        b"GET /api/sessions/" + _M + b"%0d%0a/status?api_key=" + _M + b" HTTP/1.1\r\n"
        b"Host: r\r\nX-S: " + _M + b"\r\n\r\n"
    ),
    "raw_control": b"GET /api/" + _M + b"\x01/x HTTP/1.1\r\nHost: r\r\nX-S: " + _M + b"\r\n\r\n",
    "no_rule": b"GET /nowhere/" + _M + b" HTTP/1.1\r\nHost: r\r\nX-S: " + _M + b"\r\n\r\n",
    "dot_segments": (
        b"GET /api/sessions/%2e%2e/" + _M + b" HTTP/1.1\r\nHost: r\r\nX-S: " + _M + b"\r\n\r\n"
    ),
    "content_length_with_te": (
        b"POST /api/messages/send?x="
        + _M
        + b" HTTP/1.1\r\nHost: r\r\nX-S: "
        + _M
        + b"\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "header_too_large": (
        b"GET /api/sessions/"
        + _M
        + b"/status HTTP/1.1\r\nHost: r\r\nX-S: "
        + _M * 400
        + b"\r\n\r\n"
    ),
    "upgrade": (
        b"GET /api/sessions/" + _M + b"/status HTTP/1.1\r\nHost: r\r\nConnection: Upgrade\r\n"
        b"Upgrade: " + _M + b"\r\n\r\n"
    ),
    # The first request is aiohttp's: the connection, and the malformed one, go to it.
    "bad_chunk_after_handover": (
        b"GET /healthz?x=" + _M + b" HTTP/1.1\r\nHost: r\r\n\r\n"
        b"POST /api/messages/send?x="
        + _M
        + b" HTTP/1.1\r\nHost: r\r\nX-S: "
        + _M
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        + _M
        + b"\r\n\r\n"
    ),
    "bad_chunk": (
        b"POST /api/messages/send?x="
        + _M
        + b" HTTP/1.1\r\nHost: r\r\nX-S: "
        + _M
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        + _M
        + b"\r\n\r\n"
    ),
}


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The router's log (structlog and the standard library's loggers) as JSON lines."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buf = io.StringIO()
    setup_logging(LogConfig(level="debug", format="json"), stream=buf)
    try:
        yield buf
    finally:
        structlog.reset_defaults()
        root.handlers, root.level = handlers, level


@pytest.mark.parametrize("raw", REFUSED_WITH_MARKER.values(), ids=REFUSED_WITH_MARKER.keys())
async def test_refused_request_line_and_headers_are_never_logged(
    sims: list[SimInstance],
    start_router: StartRouter,
    json_log: io.StringIO,
    capfd: pytest.CaptureFixture[str],
    raw: bytes,
) -> None:
    port, _ = await serve(start_router, sims, limits={"max_header_bytes": 2048})
    conn = await Conn.open(port)
    try:
        await conn.send(raw)
        answered = await conn.read_to_end()
    finally:
        await conn.close()
    assert answered.startswith(b"HTTP/1."), answered
    out = json_log.getvalue()
    assert "router_started" in out  # the capture does see the router
    if not raw.startswith(b"GET /healthz"):
        assert "request_refused" in out
    captured = capfd.readouterr()
    for where, text in (("log", out), ("stdout", captured.out), ("stderr", captured.err)):
        assert MARKER not in text, f"{MARKER} in the {where}: {text}"
    assert nothing_forwarded(sims)


# -- 9. the client key, swapped for the Node key ------------------------------------------------

CLIENT_KEY = "client-key-of-laravel"


@pytest.mark.parametrize("key_in_body", [False, True], ids=["query_only", "query_and_body"])
async def test_client_key_in_the_query_is_replaced_by_the_node_key(
    sims: list[SimInstance], start_router: StartRouter, key_in_body: bool
) -> None:
    port, _ = await serve(start_router, sims, upstream={"client_keys": [CLIENT_KEY]})
    doc = {k: v for k, v in send_body("s1").items() if k != "api_key"}
    if key_in_body:
        doc["api_key"] = CLIENT_KEY
    body = json.dumps(doc).encode()
    resp, _ = await exchange(port, request("POST", f"{SEND}?api_key={CLIENT_KEY}", HOST, body=body))
    assert resp.status == 200, resp
    got = forwarded(sims[0], "POST", SEND)
    assert len(got) == 1
    assert got[0].json == {**doc, "api_key": API_KEY}  # the Node key, in the body
    assert CLIENT_KEY not in got[0].query.values(), f"client key forwarded: {got[0].query}"
    assert CLIENT_KEY not in json.dumps(dict(got[0].headers))


# -- found in review: each once wrong, each pinned here -------------------------------------


async def test_no_100_continue_is_owed_once_the_body_came(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """An `Expect` behind another answer, with its body sent at once (RFC 9110 10.1.1):
    no 100 after its final answer, where it would read as the next request's."""
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    post = request("POST", SEND, HOST, "Expect: 100-continue", body=SEND_JSON)
    await conn.send(request("GET", STATUS, HOST) + post)
    statuses = [(await conn.response()).status for _ in range(2)]
    await conn.send(request("GET", STATUS, HOST))
    statuses.append((await conn.response()).status)
    assert statuses == [200, 200, 200]
    await conn.close()


async def test_connect_gets_one_refusal_and_reaches_nothing(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    await conn.send(b"CONNECT /healthz HTTP/1.1\r\nHost: r\r\n\r\n")
    raw = await conn.read_to_end()
    assert raw.count(b"HTTP/1.1 ") == 1 and b'"upgrade_refused"' in raw, raw
    await conn.close()


async def test_a_refusal_after_an_idle_gap_is_timed_from_its_own_bytes(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """A request refused before its target (a bad method) is timed from when it came, not
    from the start of the request before it on the connection: once, the idle gap between
    them was in the rejected request's duration."""
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    try:
        await conn.send(request("GET", STATUS, HOST))
        assert (await conn.response()).status == 200
        idle_s = 0.6
        # The gap is what is under test (a caller pausing between requests), not a wait for
        # something to happen: nothing is expected of the router during it.
        await asyncio.sleep(idle_s)
        await conn.send(b"BREW / HTTP/1.1\r\nHost: r\r\n\r\n")
        await conn.refused(400, "bad_request")
    finally:
        await conn.close()
    resp, _ = await exchange(port, request("GET", "/metrics", HOST, "Connection: close"))
    lines = resp.body.decode().splitlines()
    name = "wa_router_request_duration_seconds"
    count = [v for v in lines if v.startswith(f'{name}_count{{route_kind="rejected"}}')]
    total = [v for v in lines if v.startswith(f'{name}_sum{{route_kind="rejected"}}')]
    assert [float(v.rsplit(" ", 1)[1]) for v in count] == [1.0], lines
    assert float(total[0].rsplit(" ", 1)[1]) < idle_s / 2, total


async def test_http10_keep_alive_is_said_on_a_head_answer(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    await conn.send(request("HEAD", STATUS, HOST, "Connection: keep-alive", version="1.0"))
    answer = await conn.response(head_only=True)
    assert answer.status == 200 and answer.headers.get("Connection") == "keep-alive"
    await conn.close()


async def test_a_trailer_never_becomes_a_header(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    await conn.send(
        b"GET /healthz HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\nHost: evil\r\n\r\n"
    )
    assert (await conn.response()).status == 200  # not aiohttp's duplicate-Host 400
    await conn.close()


async def test_an_endless_trailer_section_is_refused_like_an_endless_head(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """A chunked send whose trailer goes on past the head's limit: 431, closed, and the
    send goes nowhere (once the trailer was read and dropped for as long as it came)."""
    port, _ = await serve(start_router, sims, limits={"max_header_bytes": 4096})
    head = f"POST {SEND} HTTP/1.1\r\n{HOST}\r\nContent-Type: application/json\r\n"
    body = chunked(SEND_JSON)[: -len(b"\r\n")]  # the last chunk, its trailer to come
    trailer = b"".join(b"X-T%d: %s\r\n" % (n, b"v" * 100) for n in range(60))
    conn = await Conn.open(port)
    try:
        await conn.send(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + body + trailer)
        await conn.refused(431, "header_fields_too_large")
    finally:
        await conn.close()
    assert nothing_forwarded(sims)


async def test_non_ascii_header_bytes_reach_node_unchanged(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    note = "caf\u00e9 \u20ac"
    await conn.send(f"GET {STATUS} HTTP/1.1\r\n{HOST}\r\nX-Note: {note}\r\n\r\n".encode())
    assert (await conn.response()).status == 200
    got = [r for r in sims[0].received if "X-Note" in r.headers][-1].headers["X-Note"]
    assert got.encode("utf-8", "surrogateescape") == note.encode()
    await conn.close()


async def test_a_request_read_while_stopping_is_refused_not_sent(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """Half sent when the router begins to stop, whole during the grace: answered 503
    shutting_down and never sent (past the drain nobody would answer it)."""
    port, lean = await serve_lean(start_router, sims, shutdown_grace_s=5.0)
    warm = await Conn.open(port)
    await warm.send(request("GET", STATUS, HOST))
    assert (await warm.response()).status == 200
    await warm.close()
    before = len(forwarded(sims[0]))
    half = await Conn.open(port)
    whole = request("GET", STATUS, HOST)
    await half.send(whole[:20])
    await wait_for(lambda: any(c.mid_request for c in lean.connections), READ_S, "half a head")
    lean.pre_shutdown()  # what the runner does first when the router stops
    await half.send(whole[20:])
    answer = await half.response()
    assert (answer.status, answer.error) == (503, "shutting_down")
    assert len(forwarded(sims[0])) == before
    await half.close()


async def test_the_head_clock_stops_while_the_router_is_not_reading(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """Eight answers queued (reading paused): the ninth request, whole on the wire, is
    answered, not timed out by our own pause."""
    sims[0].route_delay_s = {"/api/sessions/s1/status": 0.3}
    port, _ = await serve(start_router, sims, server={"header_timeout_s": 1.0})
    conn = await Conn.open(port)
    await conn.send(request("GET", STATUS, HOST) * 9)
    statuses = [(await conn.response(timeout_s=6)).status for _ in range(9)]
    assert statuses == [200] * 9
    await conn.close()


async def test_a_lent_request_has_the_lean_limits_not_aiohttps(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """A 9 KB header is under limits.max_header_bytes (32 KiB) and over aiohttp's default
    8190-byte line: the probe is answered, not refused by aiohttp in plain text."""
    port, _ = await serve(start_router, sims)
    conn = await Conn.open(port)
    await conn.send(request("GET", "/healthz", HOST, "X-Pad: " + "x" * 9000))
    answer = await conn.response()
    assert answer.status == 200, answer.body[:200]
    await conn.close()


async def test_a_caller_that_reads_nothing_is_cut_off(
    start_router: StartRouter, aiohttp_server: Any
) -> None:
    """A streamed answer waits for its caller to read, holding a connection to its
    instance: a caller that reads nothing for `server.write_timeout_s` is cut off."""
    from aiohttp import web

    from wa_router.config import config_from_dict

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"session_id": "s1", "status": "connected"})

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # no length: streamed through the router
        await resp.prepare(request)
        for _ in range(256):
            await resp.write(b"x" * 32768)
        return resp

    upstream = web.Application()
    upstream.router.add_get("/health", health)
    upstream.router.add_get("/api/sessions/s1/status", status)
    upstream.router.add_get("/api/sessions/s1/chats", big)
    node = await aiohttp_server(upstream)
    raw: dict[str, Any] = {
        "instances": [{"name": "n1", "url": str(node.make_url("")).rstrip("/")}],
        "server": {"write_timeout_s": 0.5},
        "upstream": {"api_key": API_KEY},
    }
    if FRONT:
        raw["server"]["front"] = FRONT
    client, _ = await start_router(config_from_dict(raw))
    assert client.port is not None and client.server.runner is not None
    lean = client.server.runner.server
    assert isinstance(lean, LeanServer)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", client.port))
    try:
        chats = f"/api/sessions/s1/chats?api_key={API_KEY}"
        await asyncio.get_running_loop().sock_sendall(sock, request("GET", chats, HOST))
        await wait_for(lambda: bool(lean.connections), READ_S, "the connection")
        await wait_for(lambda: not lean.connections, 10, "the caller cut off")
    finally:
        sock.close()


async def test_a_lent_answer_during_the_drain_says_the_connection_closes(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """A pool-wide listing (answered by aiohttp) under way when the router begins to stop:
    its answer says `Connection: close`, so the caller sends nothing more on a connection
    about to end, and the connection ends after it."""
    for sim in sims:
        sim.route_delay_s = {"/api/sessions": 0.5}
    port, lean = await serve_lean(start_router, sims, shutdown_grace_s=5.0)
    conn = await Conn.open(port)

    def listings() -> int:
        return sum(r.path == "/api/sessions" for r in sims[0].received)

    listed = listings()
    await conn.send(request("GET", f"/api/sessions?api_key={API_KEY}", HOST))
    await wait_for(lambda: listings() > listed, READ_S, "the listing under way")
    lean.pre_shutdown()  # what the runner does first when the router stops
    answer = await conn.response()
    assert answer.status == 200, answer.body[:200]
    assert answer.headers.get("Connection", "").lower() == "close", answer.headers
    assert await conn.closed()


# -- answers no instance should give --------------------------------------------------------------


class OddInstance:
    """An instance that answers the callers' requests for `path` (those with
    X-Forwarded-For) with `answer`, raw bytes; the rest (the router's listings, probes and
    health checks) it relays to `sim`, one exchange per connection."""

    def __init__(self, sim: SimInstance, path: bytes, answer: bytes) -> None:
        self.sim, self.path, self.answer = sim, path, answer
        self.asked = 0
        self.name = "node-odd"
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head[:-4].split(b"\r\n")
                fields = {
                    n.strip().lower(): v.strip()
                    for n, _, v in (x.partition(b":") for x in lines[1:])
                }
                body = await reader.readexactly(int(fields.get(b"content-length", b"0")))
                if lines[0].split(b" ")[1].startswith(self.path) and b"x-forwarded-for" in fields:
                    self.asked += 1
                    writer.write(self.answer)
                    await writer.drain()
                    continue
                kept = [x for x in lines if not x.lower().startswith(b"connection:")]
                sim_host, sim_port = self.sim.url.removeprefix("http://").split(":")
                up_reader, up_writer = await asyncio.open_connection(sim_host, int(sim_port))
                up_writer.write(b"\r\n".join([*kept, b"Connection: close", b"", b""]) + body)
                writer.write(await up_reader.read())  # the sim's answer, which says close
                up_writer.close()
                await writer.drain()
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def serve_odd(
    start_router: StartRouter, sims: list[SimInstance], path: str, answer: bytes
) -> tuple[int, OddInstance]:
    """The router in front of one OddInstance (s1 on the sim behind it); its port."""
    sims[0].add_session("s1")
    odd = OddInstance(sims[0], path.encode(), answer)
    await odd.start()
    client, _ = await start_router(pool_config([odd], upstream={"api_key": API_KEY}))  # type: ignore[list-item]
    assert client.port is not None
    return client.port, odd


async def test_a_switch_of_protocols_nobody_asked_for_is_a_502_never_relayed(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """The router never asks an instance to upgrade: a 101 is a broken answer (what follows
    it is not HTTP), and a send it answered is not sent again."""
    switched = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nNOT HTTP"
    )
    port, odd = await serve_odd(start_router, sims, SEND, switched)
    try:
        resp, _ = await exchange(port, request("POST", SEND, HOST, body=SEND_JSON))
        assert resp.status == 502, resp
        assert resp.error is not None
        assert odd.asked == 1
    finally:
        await odd.stop()


async def test_a_204_goes_back_without_its_content_length(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """RFC 9110 8.6: a 204 has no Content-Length. Relayed with one, a caller would wait
    for bytes that never come (or take the next answer's for them)."""
    no_content = b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\nX-Kept: 1\r\n\r\n"
    port, odd = await serve_odd(start_router, sims, "/api/sessions/s1/status", no_content)
    conn = await Conn.open(port)
    try:
        await conn.send(request("GET", STATUS, HOST) * 2)
        for _ in range(2):
            resp = await conn.response()
            assert resp.status == 204 and resp.headers.get("X-Kept") == "1", resp
            assert "Content-Length" not in resp.headers, resp.headers
        assert odd.asked == 2
    finally:
        await conn.close()
        await odd.stop()
