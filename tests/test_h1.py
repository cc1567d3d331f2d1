"""The lean HTTP/1.1 client against real loopback servers, some misbehaving on purpose."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httptools
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict
from yarl import URL

from wa_router.errors import (
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    NotReached,
    PoolTimeout,
    ReadTimeout,
    SentNoAnswer,
    UpstreamError,
)
from wa_router.forward import UpstreamRequest
from wa_router.h1 import LeanForwarder
from wa_router.h1errors import Closed, Closing, Phase, upstream_error
from wa_router.h1response import H1Response
from wa_router.pool import Instance
from wa_router.wire import relay_head

from .conftest import free_port, wait_for

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def instance(url: str) -> Instance:
    return Instance("up", URL(url), url.rstrip("/"))


def req(
    path: str = "/",
    method: str = "GET",
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    timeout_s: float = 5.0,
) -> UpstreamRequest:
    return UpstreamRequest(method, path, CIMultiDict(headers or []), body, timeout_s)


async def read_request(r: Reader) -> bytes | None:
    """One request (head and Content-Length body), or None at EOF."""
    try:
        head = await r.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await r.readexactly(length)


class Raw:
    """A loopback server running `script` on every connection; counts them."""

    def __init__(self, script: Callable[[Raw, Reader, Writer], Awaitable[None]]) -> None:
        self.script = script
        self.connections = 0
        self.open = 0
        self.max_open = 0
        self.requests: list[bytes] = []
        self.gate = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Raw:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.inst = instance(self.url)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, r: Reader, w: Writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await self.script(self, r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            w.close()
            self._tasks.discard(task)

    async def next(self, r: Reader) -> bytes | None:
        data = await read_request(r)
        if data is not None:
            self.requests.append(data)
        return data


def answering(*answers: bytes, then_close: bool = False) -> Any:
    """Answer each request on a connection with the next of `answers` (the last repeats)."""

    async def script(srv: Raw, r: Reader, w: Writer) -> None:
        n = 0
        while await srv.next(r) is not None:
            w.write(answers[min(n, len(answers) - 1)])
            n += 1
            if then_close:
                return
        await w.drain()

    return script


def lean(
    *, connect_timeout_s: float, keepalive_s: float, limit_per_host: int, pool_wait_s: float = 5.0
) -> LeanForwarder:
    return LeanForwarder(
        connect_timeout_s=connect_timeout_s,
        keepalive_s=keepalive_s,
        limit_per_host=limit_per_host,
        pool_wait_s=pool_wait_s,
    )


@pytest.fixture
async def fw() -> AsyncIterator[LeanForwarder]:
    f = lean(connect_timeout_s=1.0, keepalive_s=2.0, limit_per_host=8)
    await f.start()
    yield f
    await f.close()


async def get(fw: LeanForwarder, inst: Instance, r: UpstreamRequest | None = None) -> bytes:
    resp = await fw.send(inst, r or req())
    try:
        return await resp.read()
    finally:
        resp.release()


# -- requests and answers -----------------------------------------------------------------


async def test_request_bytes_exact_and_answer_parsed(fw: LeanForwarder) -> None:
    answer = b"HTTP/1.1 201 Created\r\nX-Dup: a\r\nx-dup: b\r\nX-U: \xc3\xa9\xff\r\n"
    async with Raw(answering(answer + b"Content-Length: 2\r\n\r\nok")) as srv:
        hdrs = [("X-A", "1"), ("x-b", "2"), ("X-A", "3"), ("X-U", "é\udcff")]
        resp = await fw.send(srv.inst, req("/p/%41?q=1&q=2", "POST", b"hello", hdrs))
        assert (resp.status, resp.reason) == (201, "Created")
        assert resp.headers.getall("X-Dup") == ["a", "b"]
        assert resp.headers["X-U"] == "é\udcff"  # as aiohttp would give it: bytes kept
        assert await resp.read() == b"ok"
        resp.release()
        assert await get(fw, srv.inst, req("/g")) == b"ok"
        assert await get(fw, srv.inst, req("/d", "DELETE")) == b"ok"
        assert await get(fw, srv.inst, req("/u", "PUT")) == b"ok"
    port = srv.url.rsplit(":", 1)[1]
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    assert srv.requests == [
        b"POST /p/%41?q=1&q=2 HTTP/1.1\r\n" + host + b"X-A: 1\r\nx-b: 2\r\nX-A: 3\r\n"
        b"X-U: \xc3\xa9\xff\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /g HTTP/1.1\r\n" + host + b"\r\n",
        b"DELETE /d HTTP/1.1\r\n" + host + b"\r\n",
        b"PUT /u HTTP/1.1\r\n" + host + b"Content-Length: 0\r\n\r\n",
    ]
    assert srv.connections == 1


async def test_round_trip_with_an_aiohttp_server(fw: LeanForwarder) -> None:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "headers": list(request.headers.items()),
                "sha": hashlib.sha256(body).hexdigest(),
                "path_qs": request.raw_path,
            },
            headers={"X-Set": "1"},
        )

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        inst = instance(str(server.make_url("/")))
        big = bytes(range(256)) * 16384
        resp = await fw.send(inst, req("/a/b?x=%20", "POST", big, [("X-T", "1"), ("X-T", "2")]))
        doc = json.loads(await resp.read())
        resp.release()
        assert doc["sha"] == hashlib.sha256(big).hexdigest()
        assert doc["path_qs"] == "/a/b?x=%20"
        assert doc["headers"][0] == ["Host", f"127.0.0.1:{server.port}"]
        assert [v for k, v in doc["headers"] if k == "X-T"] == ["1", "2"]
        assert resp.headers["X-Set"] == "1"
    finally:
        await server.close()


async def test_base_path_of_the_instance_url_prefixes_every_request(fw: LeanForwarder) -> None:
    async with Raw(answering(OK)) as srv:
        assert await get(fw, instance(srv.url + "/hooks/"), req("/in?a=1")) == b"ok"
    assert srv.requests[0].startswith(b"GET /hooks/in?a=1 HTTP/1.1\r\n")


async def test_header_with_cr_or_lf_is_refused_before_connecting(fw: LeanForwarder) -> None:
    async with Raw(answering(OK)) as srv:
        for bad in ("a\r\nX-Evil: 1", "a\nb", "a\rb"):
            with pytest.raises(ValueError):
                await fw.send(srv.inst, req(headers=[("X-A", bad)]))
    assert srv.connections == 0


# -- keep-alive -----------------------------------------------------------------------------


async def test_one_connection_serves_sequential_requests(fw: LeanForwarder) -> None:
    async with Raw(answering(OK)) as srv:
        for _ in range(50):
            assert await get(fw, srv.inst) == b"ok"
        assert srv.connections == 1
        assert fw.stats() == {srv.url: (1, 1)}


async def test_idle_connection_older_than_keepalive_is_not_reused() -> None:
    f = lean(connect_timeout_s=1.0, keepalive_s=0.05, limit_per_host=8)
    await f.start()
    loop = asyncio.get_running_loop()
    async with Raw(answering(OK)) as srv:
        await get(f, srv.inst)
        released = loop.time()
        await wait_for(lambda: loop.time() > released + 0.06, what="keepalive to pass")
        await get(f, srv.inst)
        assert srv.connections == 2
        await wait_for(lambda: srv.open == 1, what="the stale connection closed")
    await f.close()


async def test_server_closing_an_idle_connection_costs_nothing(fw: LeanForwarder) -> None:
    async with Raw(answering(OK, then_close=True)) as srv:
        await get(fw, srv.inst)
        await wait_for(lambda: fw.stats()[srv.url] == (0, 0), what="the close to be seen")
        assert await get(fw, srv.inst) == b"ok"
        assert srv.connections == 2


async def test_idle_connection_found_closing_at_pick_time_is_skipped(fw: LeanForwarder) -> None:
    async with Raw(answering(OK)) as srv:
        await get(fw, srv.inst)
        (idle,) = fw._hosts[srv.url].idle
        idle.tr.close()  # the keep-alive race: closed, connection_lost not yet delivered
        assert await get(fw, srv.inst) == b"ok"
        assert srv.connections == 2
        assert fw.stats()[srv.url] == (1, 1)


async def test_stray_bytes_on_an_idle_connection_discard_it(fw: LeanForwarder) -> None:
    async def script(srv: Raw, r: Reader, w: Writer) -> None:
        await srv.next(r)
        w.write(OK)
        await srv.gate.wait()
        w.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        await r.read()

    async with Raw(script) as srv:
        await get(fw, srv.inst)
        srv.gate.set()
        await wait_for(lambda: srv.open == 0, what="the stray answer to close it")
        srv.script = answering(OK)
        assert await get(fw, srv.inst) == b"ok"
        assert srv.connections == 2


async def test_connection_close_and_http10_are_not_reused(fw: LeanForwarder) -> None:
    close = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok"
    http10 = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    http10_ka = b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok"
    for answer, connections in ((close, 3), (http10, 3), (http10_ka, 1)):
        async with Raw(answering(answer)) as srv:
            for _ in range(3):
                assert await get(fw, srv.inst) == b"ok"
            assert srv.connections == connections, answer
    # A HEAD answer's persistence is read from its version and Connection alone.
    for answer, connections in ((close, 3), (http10, 3), (http10_ka, 1), (OK, 1)):
        head = answer.removesuffix(b"ok")
        async with Raw(answering(head)) as srv:
            for _ in range(3):
                resp = await fw.send(srv.inst, req(method="HEAD"))
                assert resp.status == 200 and await resp.read() == b""
                resp.release()
            assert srv.connections == connections, head


async def test_release_without_reading_closes_the_connection(fw: LeanForwarder) -> None:
    async with Raw(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")) as srv:
        (await fw.send(srv.inst, req())).release()
        await wait_for(lambda: srv.open == 0, what="the server to see the close")
        assert await get(fw, srv.inst) == b"hello"
        assert srv.connections == 2


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("GET", OK + b"X"),
        ("GET", OK + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nokX"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ],
    ids=["garbage", "a second answer", "after close", "a HEAD answer's body"],
)
async def test_bytes_past_the_answer_in_its_read_are_never_reused(
    fw: LeanForwarder, method: str, answer: bytes
) -> None:
    async with Raw(answering(answer)) as srv:
        for _ in range(2):
            resp = await fw.send(srv.inst, req(method=method))
            assert resp.status == 200
            assert await resp.read() == (b"" if method == "HEAD" else b"ok")
            resp.release()
        assert srv.connections == 2


async def test_head_answer_without_a_length_keeps_the_connection(fw: LeanForwarder) -> None:
    async with Raw(answering(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n")) as srv:
        for _ in range(3):
            resp = await fw.send(srv.inst, req(method="HEAD"))
            assert resp.headers["X-A"] == "1" and await resp.read() == b""
            resp.release()
        assert srv.connections == 1


async def test_whole_small_answer_is_read_without_waiting(fw: LeanForwarder) -> None:
    async with Raw(answering(OK)) as srv:
        resp = await fw.send(srv.inst, req())
        reading = resp.read()
        with pytest.raises(StopIteration) as done:
            reading.send(None)  # it completes at its first step: no await on the loop
        assert done.value.value == b"ok"
        resp.release()
        assert fw.stats()[srv.url] == (1, 1)


# -- body framing ---------------------------------------------------------------------------

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n6;ext\r\n world\r\n0\r\nX-Trailer: t\r\nX-More: m\r\n\r\n"
)


async def test_chunked_answer_decoded_and_connection_reused(fw: LeanForwarder) -> None:
    async with Raw(answering(CHUNKED)) as srv:
        assert await get(fw, srv.inst) == b"hello world"
        resp = await fw.send(srv.inst, req())
        assert b"".join([c async for c in resp.chunks()]) == b"hello world"
        assert "X-Trailer" not in resp.headers
        resp.release()
        assert srv.connections == 1


async def dribble(w: Writer, data: bytes) -> None:
    for i in range(len(data)):
        w.write(data[i : i + 1])
        await w.drain()
        await asyncio.sleep(0)  # let the client read each byte as its own segment


async def test_answer_split_byte_by_byte_parses(fw: LeanForwarder) -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok"

    async def script(srv: Raw, r: Reader, w: Writer) -> None:
        while await srv.next(r) is not None:
            await dribble(w, answer if len(srv.requests) == 1 else CHUNKED)

    async with Raw(script) as srv:
        resp = await fw.send(srv.inst, req())
        assert resp.headers["X-A"] == "1" and await resp.read() == b"ok"
        resp.release()
        assert await get(fw, srv.inst) == b"hello world"
        assert srv.connections == 1


async def test_answer_read_until_close(fw: LeanForwarder) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
    async with Raw(answering(answer, then_close=True)) as srv:
        assert await get(fw, srv.inst) == b"until the end"
        assert await get(fw, srv.inst) == b"until the end"
        assert srv.connections == 2


async def test_answer_until_close_cut_by_a_reset_is_disconnected(fw: LeanForwarder) -> None:
    async def reset(srv: Raw, r: Reader, w: Writer) -> None:
        await srv.next(r)
        w.write(b"HTTP/1.1 200 OK\r\n\r\npart")
        await w.drain()
        await srv.gate.wait()
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()  # an RST: the end of the body cannot be told from a cut

    async with Raw(reset) as srv:
        resp = await fw.send(srv.inst, req())
        srv.gate.set()
        with pytest.raises(Disconnected, match="broken off"):
            await resp.read()
        resp.release()
        assert fw.stats()[srv.url] == (0, 0)


async def test_bodyless_answers_do_not_wait_for_a_body(fw: LeanForwarder) -> None:
    async def script(srv: Raw, r: Reader, w: Writer) -> None:
        while (data := await srv.next(r)) is not None:
            if data.startswith(b"HEAD"):
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            elif b" /204 " in data:
                w.write(b"HTTP/1.1 204 No Content\r\nX-E: 1\r\n\r\n")
            else:
                w.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n")

    async with Raw(script) as srv:
        for r in (req("/h", "HEAD"), req("/204"), req("/304")):
            r.read_timeout_s = 2.0  # a wait for a body would time out
            resp = await fw.send(srv.inst, r)
            assert await resp.read() == b""
            resp.release()
        assert srv.connections == 1


async def test_interim_answers_are_skipped(fw: LeanForwarder) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"
    answer = interim + OK
    async with Raw(answering(answer)) as srv:
        resp = await fw.send(srv.inst, req(method="POST", body=b"x"))
        assert resp.status == 200 and "Link" not in resp.headers
        assert await resp.read() == b"ok"
        resp.release()


# -- the final head, read from its own bytes (no callback per field) ----------------------

FINAL = (
    b"HTTP/1.1 201 Created\r\nX-Powered-By: Express\r\nSet-Cookie: a=1\r\n"
    b"Set-Cookie: b=2 \t\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop\r\n"
    b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\n\r\nok"
)
INTERIM = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"


class _Stub:
    """Enough of a pooled connection for an answer to be parsed from bytes."""

    answer: H1Response | None = None
    closed = False
    paused = False

    def resume(self) -> None:
        pass


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize(
    "pieces",
    [
        [FINAL],
        _pieces(FINAL, 1),
        _pieces(FINAL, 7),
        [INTERIM + FINAL],
        _pieces(INTERIM + FINAL, 1),
        [INTERIM[:30], INTERIM[30:] + FINAL[:50], FINAL[50:]],
        # llhttp skips empty lines before a status line (RFC 9112 2.2): so does the head.
        [b"\r\n\r\n" + FINAL],
        [INTERIM + b"\r\n" + FINAL],
        _pieces(b"\r\n" + INTERIM + b"\r\n\n" + FINAL, 3),
    ],
    ids=["one_read", "byte_by_byte", "in_7_byte_reads", "after_interim_heads",
         "after_interim_heads_byte_by_byte", "interim_and_final_cut_mid_head",
         "after_empty_lines", "empty_line_after_interim", "empty_lines_in_3_byte_reads"],
)  # fmt: skip
def test_the_final_head_is_read_from_its_bytes_however_they_arrive(pieces: list[bytes]) -> None:
    answer = H1Response(_Stub(), "GET", 1.0)  # type: ignore[arg-type]
    for piece in pieces:
        answer.feed(piece)
    assert answer.done and not answer.failed
    assert (answer.status, answer.reason) == (201, "Created")
    assert answer.raw_head == FINAL[: FINAL.index(b"\r\n\r\n") + 4]
    assert answer.fields == [
        (b"X-Powered-By", b"Express"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),  # the whitespace around a value is not part of it
        (b"Content-Length", b"2"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
    ]
    assert answer.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert answer.length == 2 and answer.named == {b"keep-alive", b"x-hop"}
    assert answer.body() == b"ok"
    relayed = relay_head(answer.status, answer.kept_head, answer.named, 2, close=False)
    assert relayed == (
        b"HTTP/1.1 201 Created\r\nX-Powered-By: Express\r\nSet-Cookie: a=1\r\n"
        b"Set-Cookie: b=2 \t\r\nContent-Length: 2\r\n\r\n"
    )


def test_an_interim_answer_with_a_body_fails_and_its_body_is_no_head() -> None:
    # llhttp frames a 199 by its Content-Length; a head inside that body is not the answer's.
    inner = b"HTTP/1.1 200 OK\r\nSet-Cookie: evil\r\nContent-Length: 0\r\n\r\n"
    answer = H1Response(_Stub(), "GET", 1.0)  # type: ignore[arg-type]
    answer.feed(b"HTTP/1.1 199 X\r\nContent-Length: %d\r\n\r\n" % len(inner) + inner + OK)
    assert answer.failed and not answer.final
    assert b"evil" not in answer.raw_head


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_heads_over_the_limit_are_malformed_interim_ones_included(
    fw: LeanForwarder, method: str
) -> None:
    # 64 KiB for every head of one answer: endless 1xx heads are no way around it.
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </" + b"s" * 1000 + b">\r\n\r\n"
    answer = interim * 70 + OK
    async with Raw(answering(answer)) as srv:
        with pytest.raises(Disconnected, match="malformed"):
            await fw.send(srv.inst, req(method=method))
        assert fw.stats()[srv.url] == (0, 0)


async def test_large_body_streamed_with_chunks(fw: LeanForwarder) -> None:
    big = bytes(range(256)) * 32768  # 8 MiB

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        if request.path == "/length":
            resp.content_length = len(big)
        await resp.prepare(request)
        for i in range(0, len(big), 65536):
            await resp.write(big[i : i + 65536])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", stream)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        inst = instance(str(server.make_url("/")))
        for path in ("/chunked", "/length"):
            resp = await fw.send(inst, req(path))
            digest, pieces = hashlib.sha256(), 0
            async for piece in resp.chunks():
                digest.update(piece)
                pieces += 1
                await asyncio.sleep(0)  # a slower consumer: reading pauses, then resumes
            resp.release()
            assert digest.digest() == hashlib.sha256(big).digest() and pieces > 1, path
        assert fw.stats()[inst.base] == (1, 1)
    finally:
        await server.close()


# -- failures -------------------------------------------------------------------------------


async def test_connect_refused(fw: LeanForwarder) -> None:
    inst = instance(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConnectFailed, match="refused"):
        await fw.send(inst, req())
    assert fw.stats()[inst.base] == (0, 0)


async def test_connect_timeout(fw: LeanForwarder, monkeypatch: pytest.MonkeyPatch) -> None:
    f = lean(connect_timeout_s=0.05, keepalive_s=2.0, limit_per_host=8)
    await f.start()
    loop = asyncio.get_running_loop()

    async def hang(*_: object, **__: object) -> None:
        await asyncio.Event().wait()  # like SYNs into a full backlog

    monkeypatch.setattr(loop, "create_connection", hang)
    inst = instance("http://127.0.0.1:9")
    with pytest.raises(ConnectTimeout):
        await f.send(inst, req())
    assert f.stats()[inst.base] == (0, 0)
    await f.close()


async def test_no_answer_is_a_read_timeout(fw: LeanForwarder) -> None:
    async def silent(srv: Raw, r: Reader, w: Writer) -> None:
        await srv.next(r)
        await r.read()

    async with Raw(silent) as srv:
        with pytest.raises(ReadTimeout):
            await fw.send(srv.inst, req(timeout_s=0.1))
        await wait_for(lambda: srv.open == 0, what="the connection closed")
        assert fw.stats()[srv.url] == (0, 0)


async def test_body_stalling_is_a_read_timeout(fw: LeanForwarder) -> None:
    async def stall(srv: Raw, r: Reader, w: Writer) -> None:
        await srv.next(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        await r.read()

    async with Raw(stall) as srv:
        resp = await fw.send(srv.inst, req(timeout_s=0.1))
        with pytest.raises(ReadTimeout):
            await resp.read()
        resp.release()
        assert fw.stats()[srv.url] == (0, 0)


@pytest.mark.parametrize(
    "answer",
    [b"", b"HTTP/1.1 200 OK\r\nContent-Le"],
    ids=["closed-at-once", "closed-mid-head"],
)
async def test_close_before_the_head_is_disconnected(fw: LeanForwarder, answer: bytes) -> None:
    async with Raw(answering(answer, then_close=True)) as srv:
        with pytest.raises(Disconnected, match="before the answer"):
            await fw.send(srv.inst, req())
        assert fw.stats()[srv.url] == (0, 0)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nwo",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
    ids=["length", "chunked-mid-chunk", "chunked-no-last-chunk"],
)
@pytest.mark.parametrize("how", ["read", "chunks"])
async def test_close_mid_body_is_disconnected(fw: LeanForwarder, answer: bytes, how: str) -> None:
    async with Raw(answering(answer, then_close=True)) as srv:
        resp = await fw.send(srv.inst, req())
        with pytest.raises(Disconnected, match="broken off"):
            if how == "read":
                await resp.read()
            else:
                async for _ in resp.chunks():
                    pass
        resp.release()
        assert fw.stats()[srv.url] == (0, 0)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 099 OK\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\rX-B: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\nX-B: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70_000 + b"\r\n\r\n",
        # An interim answer has no body: had it one, that body could hold a head of its own.
        b"HTTP/1.1 199 X\r\nContent-Length: 58\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nSet-Cookie: evil\r\nContent-Length: 0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_malformed_head_is_disconnected(
    fw: LeanForwarder, answer: bytes, method: str
) -> None:
    async with Raw(answering(answer)) as srv:
        with pytest.raises(Disconnected, match="malformed"):
            await fw.send(srv.inst, req(method=method))
        assert fw.stats()[srv.url] == (0, 0)


@pytest.mark.parametrize(
    "chunk",
    # llhttp (like Node's own client) takes no whitespace around a chunk extension's ";".
    [b"-5\r\nhello", b"5 ;ext\r\nhello", b"5; ext\r\nhello"],
    ids=["negative", "space-before-ext", "space-after-ext"],
)
async def test_malformed_chunk_size_is_disconnected(fw: LeanForwarder, chunk: bytes) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + b"\r\n0\r\n\r\n"
    async with Raw(answering(answer)) as srv:
        resp = await fw.send(srv.inst, req())
        with pytest.raises(Disconnected, match="malformed"):
            await resp.read()
        resp.release()


# -- the per-instance limit -----------------------------------------------------------------


def gated(srv: Raw, r: Reader, w: Writer) -> Awaitable[None]:
    async def script() -> None:
        while await srv.next(r) is not None:
            await srv.gate.wait()
            w.write(OK)

    return script()


async def test_limit_per_host_is_respected() -> None:
    f = lean(connect_timeout_s=1.0, keepalive_s=2.0, limit_per_host=2)
    await f.start()
    async with Raw(gated) as srv:
        calls = [asyncio.create_task(get(f, srv.inst)) for _ in range(5)]
        await wait_for(lambda: len(srv.requests) == 2, what="two requests in")
        assert f.stats()[srv.url] == (2, 0) and len(f._hosts[srv.url].waiters) == 3
        srv.gate.set()
        assert await asyncio.gather(*calls) == [b"ok"] * 5
        assert srv.max_open == 2 and srv.connections == 2
    await f.close()


async def test_wait_for_a_free_connection_is_bounded_and_sends_nothing() -> None:
    f = lean(connect_timeout_s=1.0, keepalive_s=2.0, limit_per_host=1, pool_wait_s=0.05)
    await f.start()
    async with Raw(gated) as srv:
        first = asyncio.create_task(get(f, srv.inst))
        await wait_for(lambda: len(srv.requests) == 1, what="the first request in")
        with pytest.raises(PoolTimeout, match=r"all 1 busy for 0\.05 s") as failed:
            await f.send(srv.inst, req("/second"))
        assert isinstance(failed.value, NotReached)  # safe to send elsewhere
        srv.gate.set()
        assert await first == b"ok"
        assert len(srv.requests) == 1  # the second never left
        assert await get(f, srv.inst) == b"ok"  # its turn was not kept
        assert f.stats()[srv.url] == (1, 1) and srv.connections == 1
    await f.close()


async def test_cancelled_waiter_gives_its_turn_away() -> None:
    f = lean(connect_timeout_s=1.0, keepalive_s=2.0, limit_per_host=1)
    await f.start()
    async with Raw(gated) as srv:
        first = asyncio.create_task(get(f, srv.inst))
        await wait_for(lambda: len(srv.requests) == 1, what="the first request in")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(f.send(srv.inst, req()), 0.05)
        srv.gate.set()
        assert await first == b"ok"
        assert await get(f, srv.inst) == b"ok"
        assert f.stats()[srv.url] == (1, 1) and srv.connections == 1
    await f.close()


async def test_close_fails_waiters_and_closes_released_connections() -> None:
    f = lean(connect_timeout_s=1.0, keepalive_s=2.0, limit_per_host=1)
    await f.start()
    async with Raw(gated) as srv:
        first = asyncio.create_task(get(f, srv.inst))
        await wait_for(lambda: len(srv.requests) == 1, what="the first request in")
        second = asyncio.create_task(get(f, srv.inst))
        await wait_for(lambda: len(f._hosts[srv.url].waiters) == 1, what="the second to wait")
        await f.close()
        with pytest.raises(ConnectFailed, match="closing"):
            await second
        srv.gate.set()
        assert await first == b"ok"  # a request in flight finishes...
        await wait_for(lambda: srv.open == 0, what="...and its connection is closed")
        with pytest.raises(RuntimeError):
            await f.send(srv.inst, req())


# -- the error table ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "exc", "expected", "detail"),
    [
        (Phase.WAIT, TimeoutError("all 8 busy for 2 s"), PoolTimeout, "no free connection"),
        (Phase.WAIT, Closing(), ConnectFailed, "the forwarder is closing"),
        (Phase.CONNECT, TimeoutError(), ConnectTimeout, "connect timed out"),
        (Phase.CONNECT, ConnectionRefusedError(111, "x"), ConnectFailed, "Connection refused"),
        (Phase.CONNECT, OSError(None, "Multiple exceptions"), ConnectFailed, "Multiple"),
        (Phase.CONNECT, ssl.SSLCertVerificationError(1, "bad"), ConnectFailed, "TLS"),
        (Phase.CONNECT, Closed(), ConnectFailed, None),
        (Phase.HEAD, TimeoutError(), ReadTimeout, "no answer"),
        (Phase.HEAD, Closed(), Disconnected, "before the answer"),
        (Phase.HEAD, ConnectionResetError(104, "x"), Disconnected, "before the answer"),
        (Phase.HEAD, httptools.HttpParserError("bad"), Disconnected, "malformed response: bad"),
        (Phase.BODY, TimeoutError(), ReadTimeout, "no data"),
        (Phase.BODY, Closed(ConnectionResetError(104, "reset")), Disconnected, "broken off: "),
        (Phase.BODY, httptools.HttpParserError("bad"), Disconnected, "malformed response: bad"),
    ],
)
def test_one_table_says_what_each_failure_means(
    phase: Phase, exc: Exception, expected: type[UpstreamError], detail: str | None
) -> None:
    got = upstream_error("up", phase, exc)
    assert type(got) is expected and got.instance == "up"
    # Before the write nothing was sent (safe to re-send anywhere); after it, maybe processed.
    sent = phase in (Phase.HEAD, Phase.BODY)
    assert isinstance(got, SentNoAnswer if sent else NotReached)
    if detail is not None:
        assert detail in got.detail


def test_what_the_table_does_not_know_goes_through() -> None:
    assert upstream_error("up", Phase.HEAD, ValueError("a bug")) is None
    assert upstream_error("up", Phase.WAIT, OSError("not while waiting")) is None


# -- TLS and uvloop -------------------------------------------------------------------------


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_https_instance(
    fw: LeanForwarder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted by the default context
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    srv = Raw(answering(CHUNKED))
    srv.server = await asyncio.start_server(srv._serve, "127.0.0.1", 0, ssl=server_ctx)
    port = srv.server.sockets[0].getsockname()[1]
    inst = instance(f"https://127.0.0.1:{port}")
    try:
        for _ in range(3):
            assert await get(fw, inst) == b"hello world"
        assert srv.connections == 1
        assert srv.requests[0].startswith(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:")
    finally:
        await fw.close()
        await srv.__aexit__()


def test_under_uvloop() -> None:
    """The router runs on uvloop when it is there: its transports are not asyncio's."""
    uvloop = pytest.importorskip("uvloop")
    big = bytes(range(256)) * 16384  # 4 MiB: reading pauses and resumes

    async def scenario() -> None:
        f = lean(connect_timeout_s=1.0, keepalive_s=2.0, limit_per_host=2)
        await f.start()
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(big)}\r\n\r\n".encode()
        async with Raw(answering(OK, CHUNKED, head + big)) as srv:
            assert await get(f, srv.inst) == b"ok"
            assert await get(f, srv.inst) == b"hello world"
            resp = await f.send(srv.inst, req())
            got = b""
            async for piece in resp.chunks():
                got += piece
                await asyncio.sleep(0)
            resp.release()
            assert got == big and srv.connections == 1
        async with Raw(answering(OK, then_close=True)) as srv:
            await get(f, srv.inst)
            await wait_for(lambda: f.stats()[srv.url] == (0, 0), what="the close to be seen")
            assert await get(f, srv.inst) == b"ok"
        with pytest.raises(ConnectFailed):
            await f.send(instance(f"http://127.0.0.1:{free_port()}"), req())
        await f.close()

    uvloop.run(scenario())
