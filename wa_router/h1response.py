"""One HTTP/1.1 answer read from a lean-client connection (`h1.py`): the head parsed in pure
Python from the protocol's buffer, the body framed by RFC 9112 6.3 (Content-Length, chunked
with extensions ignored and trailers dropped, or until close), then the connection handed
back to its pool or dropped.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from .errors import Disconnected


class _Host(Protocol):
    """The pool a connection goes back to (h1.py's): what an answer needs of it."""

    @property
    def name(self) -> str: ...

    def put(self, conn: Any) -> None: ...

    def drop(self, conn: Any) -> None: ...


class _Conn(Protocol):
    """One pooled connection (h1.py's), as the answer reads it: its buffer, whether more
    can come, and the pool it belongs to. A narrow view, so this module needs no h1."""

    @property
    def host(self) -> _Host: ...

    buf: bytearray
    closed: bool
    error: Exception | None

    async def more(self, head: bool = False) -> None: ...

    def take(self, n: int) -> bytes: ...


MAX_HEAD_BYTES = 64 * 1024
_MAX_LINE_BYTES = 8 * 1024  # a chunk-size or trailer line
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
# Body framing (RFC 9112 6.3); _DONE once the body is read to its end.
_DONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = -1, 0, 1, 2
# Header text is utf-8 with surrogateescape both ways: that is how aiohttp's server decodes the
# caller's headers and how it encodes the ones we relay, so any byte goes through unchanged.
_CODEC = ("utf-8", "surrogateescape")


class H1Response:
    __slots__ = ("_body", "_conn", "_keep", "_left", "_mode", "headers", "reason", "status")
    status: int
    reason: str
    headers: CIMultiDictProxy[str]

    def __init__(self, conn: _Conn) -> None:
        self._conn: _Conn | None = conn
        self._body: bytes | None = None

    async def _head(self, conn: _Conn, method: str) -> None:
        buf = conn.buf
        start = 0
        while True:
            end = buf.find(b"\r\n\r\n", start)
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise Disconnected(conn.host.name, "malformed response: head too large")
                start = max(0, len(buf) - 3)
                await conn.more(head=True)
                continue
            if end > MAX_HEAD_BYTES:
                raise Disconnected(conn.host.name, "malformed response: head too large")
            try:
                final = self._parse(bytes(buf[:end]), method)
            except ValueError as exc:
                raise Disconnected(conn.host.name, f"malformed response: {exc}") from None
            del buf[: end + 4]
            if final:
                return
            start = 0  # a 1xx interim answer (100 Continue, 103 Early Hints): skip it

    def _parse(self, head: bytes, method: str) -> bool:
        """Status, headers and body framing from a head; False for an interim 1xx."""
        text = head.decode(*_CODEC)
        lines = text.split("\r\n")
        # A bare CR or LF inside a line would smuggle a line break into a relayed header.
        if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
            raise ValueError("bare CR or LF")
        version, _, rest = lines[0].partition(" ")
        code, _, self.reason = rest.partition(" ")
        if version not in ("HTTP/1.1", "HTTP/1.0") or not (code.isascii() and code.isdigit()):
            raise ValueError("bad status line")
        status = self.status = int(code)
        if len(code) != 3 or status < 100:
            raise ValueError("bad status code")
        headers: CIMultiDict[str] = CIMultiDict()
        add = headers.add
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            # RFC 9112 5.1/5.2: no whitespace around the name, no obsolete line folding.
            if not colon or not name or name != name.strip():
                raise ValueError("bad header line")
            add(name, value.strip(" \t"))
        if status < 200 and status != 101:
            return False
        self.headers = CIMultiDictProxy(headers)
        te = headers.get("Transfer-Encoding")
        cl = headers.get("Content-Length")
        self._left = 0
        self._mode = _LENGTH
        if method == "HEAD" or status < 200 or status in (204, 304):  # RFC 9112 6.3 rules 1-2
            pass
        elif te is not None:
            if cl is not None:  # RFC 9112 6.3 rule 3: a smuggling signal, handled as an error
                raise ValueError("both Transfer-Encoding and Content-Length")
            chunked = te.rpartition(",")[2].strip().lower() == "chunked"
            self._mode = _CHUNKED if chunked else _UNTIL_CLOSE
        elif cl is not None:
            if len(set(headers.getall("Content-Length"))) > 1 or not (
                cl.isascii() and cl.isdigit()
            ):
                raise ValueError("bad Content-Length")
            self._left = int(cl)
        else:
            self._mode = _UNTIL_CLOSE
        # RFC 9112 9.3: 1.1 persists unless "close"; 1.0 only with "keep-alive".
        keep = version == "HTTP/1.1"
        if "Connection" in headers:
            tokens = ",".join(headers.getall("Connection")).lower()
            if tokens == "keep-alive":  # what Node sends: skip the split
                keep = True
            else:
                names = [t.strip() for t in tokens.split(",")]
                keep = "keep-alive" in names if version == "HTTP/1.0" else "close" not in names
        self._keep = keep and self._mode != _UNTIL_CLOSE and status != 101
        return True

    async def read(self) -> bytes:
        if self._body is not None:
            return self._body
        conn = self._conn
        if conn is not None and self._mode == _LENGTH and len(conn.buf) >= self._left:
            # The common case: the whole answer came with the head. No future, no task.
            self._body = conn.take(self._left)
            self._mode = _DONE
        else:
            self._body = b"".join([piece async for piece in self.chunks()])
        return self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None or self._mode == _DONE:
            return
        try:
            if self._mode == _LENGTH:
                while self._left:
                    if not conn.buf:
                        await conn.more()
                        continue
                    piece = conn.take(self._left)
                    self._left -= len(piece)
                    yield piece
            elif self._mode == _UNTIL_CLOSE:
                while conn.buf or not conn.closed:
                    if conn.buf:
                        yield conn.take(len(conn.buf))
                    else:
                        await conn.more()
                if conn.error is not None:  # a reset: we cannot tell the end from a cut
                    raise Disconnected(conn.host.name, f"answer broken off: {conn.error}")
            else:
                async for piece in self._chunked(conn):
                    yield piece
        except BaseException:
            self.release()  # not read to its end: the connection cannot be reused
            raise
        self._mode = _DONE

    async def _chunked(self, conn: _Conn) -> AsyncIterator[bytes]:
        buf = conn.buf
        while True:
            line = await self._line(conn)
            size = line.partition(b";")[0].strip(b" \t")  # chunk extensions are ignored
            if not _HEX.fullmatch(size):
                raise Disconnected(conn.host.name, "malformed chunked body")
            left = int(size, 16)
            if left == 0:
                break
            while left:
                if not buf:
                    await conn.more()
                    continue
                piece = conn.take(left)
                left -= len(piece)
                yield piece
            if await self._line(conn):
                raise Disconnected(conn.host.name, "malformed chunked body")
        while await self._line(conn):  # trailer fields: not relayed (RFC 9110 6.5.1)
            pass

    async def _line(self, conn: _Conn) -> bytes:
        while (i := conn.buf.find(b"\r\n")) < 0:
            if len(conn.buf) > _MAX_LINE_BYTES:
                raise Disconnected(conn.host.name, "malformed chunked body")
            await conn.more()
        line = conn.take(i)
        del conn.buf[:2]
        return line

    def release(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        reusable = self._mode == _DONE or (self._mode == _LENGTH and self._left == 0)
        # Bytes past the answer mean the stream is out of step: never reuse it.
        if reusable and self._keep and not conn.buf and not conn.closed:
            conn.host.put(conn)
        else:
            conn.host.drop(conn)
