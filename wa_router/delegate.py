"""One request the lean server does not answer itself (webhooks, admin, status page, metrics,
probes, pool-wide routes), answered by aiohttp's own protocol on a lent transport.

The lean server has read the request whole, under its own limits and timeouts and llhttp's
framing rules; it writes it out again for a fresh aiohttp `RequestHandler` (with a
Content-Length, whatever framing it came with), which answers through `Lent`: its bytes go
to the caller's connection as they are, and are parsed on the way only to see where the
answer ends. Then the handler is let go and the connection stays the lean server's, so
every later request on it is checked the same way (aiohttp never owns a caller's socket).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from aiohttp import web

# Not passed on: the request is re-framed with a Content-Length, its body already read (and
# answered 100 Continue, or not, by the lean server).
_REFRAMED = frozenset({b"content-length", b"transfer-encoding", b"expect"})


def request_bytes(
    method: str, target: bytes, version: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> bytes:
    out = bytearray(method.encode("ascii") + b" " + target + b" HTTP/" + version.encode() + b"\r\n")
    for name, value in headers:
        if name.lower() not in _REFRAMED:
            out += name + b": " + value + b"\r\n"
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        out += b"Content-Length: %d\r\n" % len(body)
    out += b"\r\n"
    out += body
    return bytes(out)


class Lent(asyncio.Transport):
    """The transport a lent handler writes its answer to: the caller's, until the answer
    is whole. `done` holds whether the connection may be kept (the answer's keep-alive),
    once the answer has ended or the handler closed its side."""

    def __init__(
        self, real: asyncio.Transport, loop: asyncio.AbstractEventLoop, *, head_only: bool
    ) -> None:
        super().__init__()
        self._real = real
        self._head_only = head_only
        self._parser = httptools.HttpResponseParser(self)
        self._closed = False
        self._whole = False
        self.done: asyncio.Future[bool] = loop.create_future()
        self.handler: web.RequestHandler | None = None

    # -- what the handler calls ---------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or self._whole:
            return
        chunk = bytes(data)
        self._real.write(chunk)
        try:
            self._parser.feed_data(chunk)
        except httptools.HttpParserError:
            # Our own server's answer, unreadable: the caller cannot tell where it ends.
            self._real.abort()
            self._finish(False)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self._closed or self._real.is_closing()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._whole:  # closed mid-answer: only closing the caller's says so
                self._real.close()
            self._finish(False)

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._whole:
                self._real.abort()
            self._finish(False)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def pause_reading(self) -> None:
        pass  # the lean server reads; the request is already in the handler

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # the caller's transport has its own; its pauses are forwarded (lean.py)

    def can_write_eof(self) -> bool:
        return False

    # -- the answer's end (parser callbacks) ---------------------------------------------------

    def on_headers_complete(self) -> None:
        if self._head_only and self._parser.get_status_code() >= 200:
            self._whole = True  # a HEAD answer has no body, whatever its Content-Length says
            self._finish(self._parser.should_keep_alive())

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() < 200:
            return  # an interim 1xx; the answer follows
        self._whole = True
        self._finish(self._parser.should_keep_alive())

    def _finish(self, keep: bool) -> None:
        if not self.done.done():
            self.done.set_result(keep and not self._closed)

    def release(self) -> None:
        """Let the handler go (it would wait for a next request that never comes)."""
        handler, self.handler = self.handler, None
        self._closed = True
        self._finish(False)
        if handler is not None:
            handler.connection_lost(None)


async def answer_by_aiohttp(
    server: web.Server, lent: Lent, raw: bytes, *, paused: bool = False
) -> bool:
    """Have aiohttp answer the request in `raw` through `lent`; whether the connection may
    stay open. `paused`: the caller's transport is paused for writing already."""
    handler = server()
    lent.handler = handler
    handler.connection_made(lent)
    if paused:
        handler.pause_writing()
    try:
        handler.data_received(raw)
        return await lent.done
    finally:
        lent.release()
