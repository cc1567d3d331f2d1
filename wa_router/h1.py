"""A lean pooled HTTP/1.1 client behind the forwarder seam (`forward.Forwarder`).

aiohttp's ClientSession spends most of the router's client CPU on things a reverse proxy to a
few known hosts never needs (request objects, auto headers, tracing hooks, per-request timers
and tasks). This client writes each request with one `transport.write()` and parses the answer
in pure Python straight from an `asyncio.Protocol`'s buffer: for the common small answer with a
Content-Length, one future and one timer per request, no task.

Failures map to `errors.py` by what they tell about the request's fate, as in `forward.py`:
connect errors are `NotReached` (nothing was sent); anything after the write is `SentNoAnswer`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections import deque
from typing import cast

from .errors import ConnectFailed, ConnectTimeout, Disconnected, ReadTimeout
from .forward import UpstreamRequest, UpstreamResponse
from .h1response import _CODEC, MAX_HEAD_BYTES, H1Response
from .pool import Instance

# Reading pauses past this much unconsumed body, so a slow caller cannot make us buffer a
# fast instance's whole answer (backpressure, like aiohttp's StreamReader high-water mark).
_HIGH_WATER = 1024 * 1024
# RFC 9110 8.6: no Content-Length for an empty body when the method gives content no meaning.
_NO_LENGTH = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class _Conn(asyncio.Protocol):
    """One keep-alive connection: a byte buffer, and a waiter woken by any news."""

    tr: asyncio.Transport

    def __init__(self, host: _Host) -> None:
        self.host = host
        self.buf = bytearray()
        self.closed = False  # EOF or connection lost: no more bytes will come
        self.error: Exception | None = None
        self.idle = False
        self.idle_at = 0.0
        self.paused = False
        self.read_s = 0.0  # the current request's read timeout
        self.waiter: asyncio.Future[bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses

    def data_received(self, data: bytes) -> None:
        if self.idle:
            # Nothing was asked: the stream is out of step (or a 408 before a close), so the
            # next answer read from it could be the wrong one.
            self.tr.close()
            return
        self.buf += data
        if len(self.buf) > _HIGH_WATER and not self.paused:
            self.paused = True
            self.tr.pause_reading()
        self._wake(True)

    def eof_received(self) -> bool:
        self.closed = True
        self._wake(True)
        return False  # close our side too: an HTTP/1.1 connection is not half-open

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._wake(True)
        if self.idle:
            self.host.forget(self)

    def _wake(self, news: bool) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(news)

    async def more(self, head: bool = False) -> None:
        """Wait for bytes; the end of the stream, or `read_s` of silence, is an error."""
        if self.closed:
            why = f": {self.error}" if self.error else ""
            what = "connection lost before the answer" if head else "answer broken off"
            raise Disconnected(self.host.name, what + why)
        fut: asyncio.Future[bool] = self.host.loop.create_future()
        self.waiter = fut
        timer = self.host.loop.call_later(self.read_s, self._wake, False)
        try:
            news = await fut
        finally:
            timer.cancel()
            self.waiter = None
        if not news:
            what = "no answer" if head else "no data"
            raise ReadTimeout(self.host.name, f"{what} within the read timeout")

    def take(self, n: int) -> bytes:
        buf = self.buf
        if n >= len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        if self.paused and len(buf) <= _HIGH_WATER:
            # Paused only while the buffer is over the mark: so a reader waiting for bytes
            # is never stalled, and an idle connection still sees the server's close.
            self.paused = False
            self.tr.resume_reading()
        return data


class _Host:
    """The connections to one `instance.base`: idle ones (LIFO), a count, FIFO waiters."""

    def __init__(self, fw: LeanForwarder, instance: Instance) -> None:
        u = instance.url
        self.loop = fw.loop
        self.fw = fw
        self.name = instance.name
        self.addr = (u.raw_host or "", u.port or 80)
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        # Laravel's URL may carry a base path: every request path goes under it.
        self.prefix = u.raw_path.rstrip("/")
        self.authority = u.host_port_subcomponent or ""
        self.idle: deque[_Conn] = deque()
        self.open = 0  # connections open or being opened, idle ones included
        self.waiters: deque[asyncio.Future[_Conn | None]] = deque()

    def encode(self, req: UpstreamRequest) -> bytes:
        lines = [f"{req.method} {self.prefix}{req.path_qs} HTTP/1.1", f"Host: {self.authority}"]
        for k, v in req.headers.items():
            line = f"{k}: {v}"
            # A CR or LF would let a header value start a header (or a request) of its own.
            if "\r" in line or "\n" in line:
                raise ValueError(f"header {k!r} contains CR or LF")
            lines.append(line)
        body = req.body
        if body or req.method not in _NO_LENGTH:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("\r\n")
        head = "\r\n".join(lines).encode(*_CODEC)
        return head + body if body else head

    def pick(self) -> _Conn | None:
        """The newest idle connection still fit to carry a request, if any."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if self.loop.time() - conn.idle_at > self.fw.keepalive_s:
                # The newest is stale, so all are: close them before the server does (Node
                # closes idle connections after 5 s; a request written into a socket it is
                # closing might have run or not, we could not tell).
                self.drop(conn)
                while idle:
                    self.drop(idle.pop())
                return None
            if conn.closed or conn.tr.is_closing():
                self.drop(conn)  # the server closed it while idle: nothing was written
                continue
            conn.idle = False
            return conn
        return None

    async def acquire(self) -> _Conn:
        """An idle connection, a new one, or (at the limit) the first one given back."""
        fw = self.fw
        while True:
            conn = self.pick()
            if conn is not None:
                return conn
            if self.open < fw.limit_per_host:
                self.open += 1
                break
            fut: asyncio.Future[_Conn | None] = self.loop.create_future()
            self.waiters.append(fut)
            try:
                got = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # handed over as we were cancelled
                    got = fut.result()
                    if got is None:
                        self.free_slot()
                    else:
                        self.put(got)
                raise
            if got is None:
                break  # a slot was handed over: open a connection in it
            if not (got.closed or got.buf or got.tr.is_closing()):
                return got
            got.tr.close()  # closed or spoke in the meantime: its slot opens a new one
            break
        try:
            return await self._connect()
        except BaseException:
            self.free_slot()
            raise

    async def _connect(self) -> _Conn:
        host, port = self.addr
        try:
            async with asyncio.timeout(self.fw.connect_timeout_s):
                tr, conn = await self.loop.create_connection(
                    lambda: _Conn(self),
                    host,
                    port,
                    ssl=self.ssl,
                    server_hostname=host if self.ssl else None,
                )
        except TimeoutError:
            raise ConnectTimeout(self.name, "connect timed out") from None
        except OSError as exc:
            # asyncio's text is "Connect call failed (addr)"; the errno's says why.
            why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or exc
            raise ConnectFailed(self.name, f"connect failed: {why}") from None
        sock = tr.get_extra_info("socket")
        if sock is not None:  # whichever loop runs us: a request is one small write
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def put(self, conn: _Conn) -> None:
        """A connection that answered in full and may carry another request."""
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(conn)
                return
        if self.fw.closed:
            self.drop(conn)
            return
        conn.idle = True
        now = conn.idle_at = self.loop.time()
        idle = self.idle
        idle.append(conn)
        while now - idle[0].idle_at > self.fw.keepalive_s:  # the oldest are on the left
            self.drop(idle.popleft())

    def drop(self, conn: _Conn) -> None:
        conn.idle = False
        conn.tr.close()
        self.free_slot()

    def forget(self, conn: _Conn) -> None:
        """An idle connection the server closed: free its slot now, not at the next pick."""
        try:
            self.idle.remove(conn)
        except ValueError:
            return
        conn.idle = False
        self.free_slot()

    def free_slot(self) -> None:
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(None)  # the slot passes to the first waiter, FIFO
                return
        self.open -= 1


class LeanForwarder:
    """Per-instance pools of keep-alive connections, `limit_per_host` open at most."""

    def __init__(
        self, *, connect_timeout_s: float, keepalive_s: float, limit_per_host: int
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.limit_per_host = limit_per_host
        self.closed = True
        self.loop: asyncio.AbstractEventLoop
        self._hosts: dict[str, _Host] = {}

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        for host in self._hosts.values():
            while host.idle:
                host.drop(host.idle.pop())
            for w in host.waiters:  # nothing was sent for them: NotReached is the truth
                if not w.done():
                    w.set_exception(ConnectFailed(host.name, "the forwarder is closing"))
        self._hosts.clear()
        await asyncio.sleep(0)  # let the transports finish closing (connection_lost)

    def stats(self) -> dict[str, tuple[int, int]]:
        """`instance.base` -> (connections open, of which idle)."""
        return {base: (h.open, len(h.idle)) for base, h in self._hosts.items()}

    async def send(self, instance: Instance, request: UpstreamRequest) -> UpstreamResponse:
        if self.closed:
            raise RuntimeError("forwarder not started")
        host = self._hosts.get(instance.base)
        if host is None:
            host = self._hosts[instance.base] = _Host(self, instance)
        data = host.encode(request)
        conn = host.pick() or await host.acquire()
        conn.tr.write(data)
        conn.read_s = request.read_timeout_s
        resp = H1Response(conn)
        try:
            await resp._head(conn, request.method)
        except BaseException:
            host.drop(conn)
            raise
        return resp


__all__ = ["MAX_HEAD_BYTES", "H1Response", "LeanForwarder"]
