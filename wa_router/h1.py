"""A lean pooled HTTP/1.1 client behind the forwarder seam (`forward.Forwarder`).

aiohttp's ClientSession spends most of the router's client CPU on things a reverse proxy to a
few known hosts never needs (request objects, auto headers, tracing hooks, per-request timers
and tasks). This client writes each request with one `transport.write()` and has llhttp parse
the answer as it arrives on an `asyncio.Protocol` (`h1response.py`): for the common small
answer with a Content-Length, one future and one timer per request, no task.

Here: the per-instance pools (idle connections, the `limit_per_host` bound, a bounded FIFO
wait at it) and the request's encoding. Failures map to `errors.py` through the one table in
`h1errors.py`: the wait for a connection and the connect are `NotReached` (nothing was sent);
anything after the write is `SentNoAnswer`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque

from .forward import UpstreamRequest, UpstreamResponse
from .h1errors import Closed, Closing, Phase, mapped
from .h1response import _CODEC, MAX_HEAD_BYTES, Conn, H1Response
from .pool import Instance

# RFC 9110 8.6: no Content-Length for an empty body when the method gives content no meaning.
_NO_LENGTH = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
_NO_LENGTH_BYTES = frozenset(m.encode() for m in _NO_LENGTH)


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
        # The request line and Host as the express lane writes them (`LeanForwarder.write`).
        self.line_mid = self.prefix.encode("ascii")
        self.host_line = b" HTTP/1.1\r\nHost: " + self.authority.encode("ascii") + b"\r\n"
        self.idle: deque[Conn] = deque()
        self.open = 0  # connections open or being opened, idle ones included
        self.waiters: deque[asyncio.Future[Conn | None]] = deque()

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

    def pick(self) -> Conn | None:
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

    async def acquire(self) -> Conn:
        """An idle connection, a new one, or (at the limit) the first one given back within
        `pool_wait_s`."""
        fw = self.fw
        while True:
            conn = self.pick()
            if conn is not None:
                return conn
            if self.open < fw.limit_per_host:
                self.open += 1
                break
            got = await self._wait()
            if got is None:
                break  # a slot was handed over: open a connection in it
            if not (got.closed or got.tr.is_closing()):
                return got
            got.tr.close()  # closed or spoke in the meantime: its slot opens a new one
            break
        try:
            return await self._connect()
        except BaseException:
            self.free_slot()
            raise

    async def _wait(self) -> Conn | None:
        """The first connection (or free slot: None) given back, FIFO; bounded."""
        fut: asyncio.Future[Conn | None] = self.loop.create_future()
        self.waiters.append(fut)
        bound_s = self.fw.pool_wait_s
        why = f"all {self.fw.limit_per_host} busy for {bound_s:g} s"
        # An exception set on the future, not a cancel: a hand-over and the timeout cannot
        # both happen to one waiter.
        timer = self.loop.call_later(bound_s, _expire, fut, why)
        try:
            with mapped(self.name, Phase.WAIT):
                return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                got = fut.result()  # handed over as we were cancelled: pass it on
                if got is None:
                    self.free_slot()
                else:
                    self.put(got)
            raise
        finally:
            timer.cancel()

    async def _connect(self) -> Conn:
        host, port = self.addr
        with mapped(self.name, Phase.CONNECT):
            async with asyncio.timeout(self.fw.connect_timeout_s):
                tr, conn = await self.loop.create_connection(
                    lambda: Conn(self),
                    host,
                    port,
                    ssl=self.ssl,
                    server_hostname=host if self.ssl else None,
                )
            if conn.closed:
                raise Closed()  # the server hung up at once: nothing was written yet
        sock = tr.get_extra_info("socket")
        if sock is not None:  # whichever loop runs us: a request is one small write
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def put(self, conn: Conn) -> None:
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

    def drop(self, conn: Conn) -> None:
        conn.idle = False
        conn.tr.close()
        self.free_slot()

    def forget(self, conn: Conn) -> None:
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


def _expire(fut: asyncio.Future[Conn | None], why: str) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError(why))


class LeanForwarder:
    """Per-instance pools of keep-alive connections, `limit_per_host` open at most; a
    request waits at most `pool_wait_s` for one of them to be free."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        keepalive_s: float,
        limit_per_host: int,
        pool_wait_s: float,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.limit_per_host = limit_per_host
        self.pool_wait_s = pool_wait_s
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
                    w.set_exception(Closing())
        self._hosts.clear()
        await asyncio.sleep(0)  # let the transports finish closing (connection_lost)

    def stats(self) -> dict[str, tuple[int, int]]:
        """`instance.base` -> (connections open, of which idle)."""
        return {base: (h.open, len(h.idle)) for base, h in self._hosts.items()}

    def write(
        self,
        instance: Instance,
        method: bytes,
        target: bytes,
        fields: bytes,
        body: bytes,
        read_timeout_s: float,
    ) -> H1Response | None:
        """The express lane's send (`express.py`): the request written now on an idle
        pooled connection, and its answer (being read); None when no connection is idle
        (the full path waits for one or opens one). `target` is the path and query as
        the caller sent them; `fields` the header lines, each ending in CRLF."""
        if self.closed:
            return None
        host = self._hosts.get(instance.base)
        if host is None:
            return None
        conn = host.pick()
        if conn is None:
            return None
        answer = H1Response(conn, method.decode("ascii"), read_timeout_s)
        if body or method not in _NO_LENGTH_BYTES:
            fields += b"Content-Length: %d\r\n" % len(body)
        conn.tr.write(
            b"".join((method, b" ", host.line_mid, target, host.host_line, fields, b"\r\n", body))
        )
        return answer

    async def send(self, instance: Instance, request: UpstreamRequest) -> UpstreamResponse:
        if self.closed:
            raise RuntimeError("forwarder not started")
        host = self._hosts.get(instance.base)
        if host is None:
            host = self._hosts[instance.base] = _Host(self, instance)
        data = host.encode(request)
        conn = host.pick() or await host.acquire()
        answer = H1Response(conn, request.method, request.read_timeout_s)
        conn.tr.write(data)
        try:
            await answer.head()
        except BaseException:
            answer.release()  # not parsed to its end: dropped
            raise
        return answer


__all__ = ["MAX_HEAD_BYTES", "H1Response", "LeanForwarder"]
