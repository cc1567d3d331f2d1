"""The `floor` configuration of the throughput part: the least a Python proxy does.

uvloop, one asyncio Protocol per caller connection, httptools parsing the request and the
answer, and one upstream connection per caller connection, opened with it (a keep-alive
pool of exactly the callers' size). The request goes upstream as its method, target and
header lines; the answer comes back in its own bytes, unchanged. No routing, no directory,
no metrics, no limits, no error handling: a wrong answer is not its concern. It is here
to tell apart what a Python proxy costs on this machine from what wa-router's features
cost on top (`wa-uvloop` minus `floor`).
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import httptools


class _Upstream(asyncio.Protocol):
    """The caller's own connection to the instance: each answer relayed whole."""

    def __init__(self, caller: _Caller) -> None:
        self.caller = caller
        self.parser = httptools.HttpResponseParser(self)
        self.pieces: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.caller.up = self
        self.caller.upstream_ready()

    def data_received(self, data: bytes) -> None:
        self.pieces.append(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        data = b"".join(self.pieces)
        self.pieces.clear()
        self.caller.answer(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.caller.close()


class _Caller(asyncio.Protocol):
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.up: _Upstream | None = None
        self.waiting: list[bytes] = []  # requests read before the upstream connection was up
        self.connecting: asyncio.Task[object] | None = None
        self.url = b""
        self.lines: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        connect = loop.create_connection(lambda: _Upstream(self), self.host, self.port)
        self.connecting = loop.create_task(connect)

    def upstream_ready(self) -> None:
        for request in self.waiting:
            self._send(request)
        self.waiting.clear()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.lines.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        head = b"%s %s HTTP/1.1\r\n" % (self.parser.get_method(), self.url)
        request = b"".join([head, *self.lines, b"\r\n", *self.body])
        self.lines.clear()
        self.body.clear()
        if self.up is not None and self.up.transport is not None:
            self._send(request)
        else:
            self.waiting.append(request)

    def _send(self, request: bytes) -> None:
        assert self.up is not None and self.up.transport is not None
        self.up.transport.write(request)

    def answer(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


def floor_proxy(argv: list[str]) -> None:
    """`python -c ... floor_proxy(sys.argv)`: PORT UPSTREAM_URL (http://host:port)."""
    import uvloop

    port = int(argv[1])
    host, _, up_port = argv[2].removeprefix("http://").partition(":")

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Caller(host, int(up_port)), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    floor_proxy(sys.argv)
