"""One pooled upstream connection (an asyncio Protocol) and the answers read from it.

llhttp (httptools' `HttpResponseParser`, one per answer) parses each answer as its bytes
arrive, in `data_received`: the body into a queue that `read()` and `chunks()` take from
(reading pauses while the queue is over a high-water mark). llhttp calls back once per head,
not once per field: the final head is kept as it came (`raw_head`), its framing read from it
in one pass (`length`, `named`), and `fields`/`headers` only for whoever asks.
Body framing is llhttp's (RFC 9112 6.3: Content-Length, chunked with extensions ignored and
trailers dropped, or until close); it refuses Content-Length together with
Transfer-Encoding, bare CR or LF, obsolete line folding and the like. An answer is then
handed back to the pool (`Pool.put`) or its connection dropped (`Pool.drop`).

Failures are raised as `errors.py` says, through `h1errors.mapped` (the one table).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .forward import HOP_BY_HOP
from .h1errors import Closed, Phase, mapped

MAX_HEAD_BYTES = 64 * 1024  # all heads of one answer, interim ones included
# Reading pauses past this much unconsumed body, so a slow caller cannot make us buffer a
# fast instance's whole answer (backpressure, like aiohttp's StreamReader high-water mark).
_HIGH_WATER = 1024 * 1024
# Header text is utf-8 with surrogateescape both ways: that is how aiohttp's server decodes the
# caller's headers and how it encodes the ones we relay, so any byte goes through unchanged.
_CODEC = ("utf-8", "surrogateescape")
_BODYLESS_STATUSES = frozenset({204, 304})
_ZERO, _ONE = ord("0"), ord("1")  # the minor version digits of HTTP/1.x
_ZERO_OR_ONE = (_ZERO, _ONE)
_CR_LF = (ord("\r"), ord("\n"))
# The fields of a head that frame it or are hop-by-hop (RFC 9110 7.6.1): a proxy relays
# none of them as they came. Found as they stand in a head llhttp has checked ("\r\nName:
# value", no space before the colon, no folding), by one split of the head at them: the
# pieces between are the relayed head, and each cut gives its name and value. (One call:
# it costs less than a lower-case pass for the values plus another to cut them out.)
UNRELAYED = frozenset(n.encode() for n in HOP_BY_HOP) | {b"content-length"}
_UNRELAYED_SPLIT = re.compile(
    rb"\r\n(%s):[ \t]*([^\r]*)" % b"|".join(re.escape(n) for n in sorted(UNRELAYED)),
    re.IGNORECASE,  # bytes patterns fold ASCII case only
)
# What a Connection value names, by value (most answers say "keep-alive"); bounded.
_NAMED: dict[bytes, frozenset[bytes]] = {}
_NAMED_MAX = 64
_NOTHING_NAMED: frozenset[bytes] = frozenset()


class Pool(Protocol):
    """What a connection and its answers need of the pool they belong to (h1.py's)."""

    name: str  # the instance's, for errors
    loop: asyncio.AbstractEventLoop

    def put(self, conn: Conn) -> None: ...

    def drop(self, conn: Conn) -> None: ...

    def forget(self, conn: Conn) -> None: ...


class Conn(asyncio.Protocol):
    """One keep-alive connection: bytes go to the answer being read, if any."""

    tr: asyncio.Transport

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.answer: H1Response | None = None
        self.closed = False  # EOF or connection lost: no more bytes will come
        self.idle = False
        self.idle_at = 0.0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if answer is None:
            # Nothing was asked: the stream is out of step (or a 408 before a close), so the
            # next answer read from it could be the wrong one.
            self.tr.close()
            return
        answer.feed(data)

    def eof_received(self) -> bool:
        self.closed = True
        if self.answer is not None:
            self.answer.ended(None)
        return False  # close our side too: an HTTP/1.1 connection is not half-open

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.answer is not None:
            self.answer.ended(exc)
        elif self.idle:
            self.pool.forget(self)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.tr.pause_reading()

    def resume(self) -> None:
        # Paused only while the queue is over the mark: so a reader waiting for bytes is
        # never stalled, and an idle connection still sees the server's close.
        if self.paused:
            self.paused = False
            self.tr.resume_reading()


class H1Response:
    """One answer: the httptools parser's callbacks fill it as `Conn` feeds it bytes."""

    __slots__ = (
        "_closed",
        "_conn",
        "_error",
        "_fields",
        "_head_at",
        "_headers",
        "_heads",
        "_interim",
        "_keep",
        "_parser",
        "_pieces",
        "_queued",
        "_raw",
        "_read_s",
        "_stray",
        "_timed_out",
        "_until_close",
        "_waiter",
        "_whole",
        "done",
        "failed",
        "final",
        "kept_head",
        "length",
        "listener",
        "named",
        "raw_head",
        "status",
    )
    status: int
    # The callbacks it does not have, said so: httptools looks each one up when a parser is
    # made (one per answer), and a lookup that fails raises and clears an AttributeError
    # (4 of them per answer, some 1,000 instructions).
    on_header = on_status = on_chunk_header = on_chunk_complete = None

    def __init__(self, conn: Conn, method: str, read_s: float) -> None:
        self._conn: Conn | None = conn
        self._read_s = read_s
        # The parser holds this answer (its callbacks) and this answer the parser: a cycle,
        # broken at `release` so the pair is freed at once, not by the cycle collector.
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        # HEAD: llhttp is fed whole heads only (see `_feed_heads`).
        self._heads: bytearray | None = bytearray() if method == "HEAD" else None
        # The bytes fed until the final head was whole, and where the head being parsed
        # starts in them (past the interim ones). llhttp has no callback per field here:
        # the final head is kept as it came (`raw_head`), and what is needed of it is read
        # from its bytes, which llhttp has checked (CRLF lines, `name:` with no space).
        self._raw = b""
        self._head_at = 0
        self.raw_head = b""  # the final head, status line to blank line
        self.kept_head = b""  # ...less its UNRELAYED fields and its blank line
        self._fields: list[tuple[bytes, bytes]] | None = None
        self._headers: CIMultiDictProxy[str] | None = None
        self.length: int | None = None  # the final head's Content-Length, if it has one
        self.named: frozenset[bytes] = _NOTHING_NAMED  # what its Connection fields name
        # Told of every news (bytes, the end, an error) when no one awaits it: the lean
        # front's express lane (`express.py`) reads answers so, with no task.
        self.listener: Callable[[], None] | None = None
        self._timed_out = False
        self._interim = False  # in a 1xx interim answer, skipped
        # Read by the caller, written here only (attributes, not properties: the express
        # lane reads them at every news).
        self.final = False  # the final head is parsed: status, reason, headers are set
        self.done = False  # the whole answer is parsed
        self.failed = False  # a wait for it would raise: parse error, cut, or timed out
        self._keep = False
        self._until_close = False
        self._stray = False  # bytes came past the answer
        self._pieces: list[bytes] = []
        self._queued = 0
        self._error: Exception | None = None
        self._closed: Closed | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self._whole: bytes | None = None
        conn.answer = self

    # -- fed by the connection ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.done:
            self._stray = True  # the stream is out of step: never reused
            return
        if self._error is not None:
            return  # llhttp stopped at the error; the connection is dropped with the answer
        try:
            if self._parser is None:
                return  # released: nothing is read any more
            if self._heads is None:
                if not self.final:
                    self._raw += data  # the first piece is kept, not copied
                self._parser.feed_data(data)
            else:
                self._feed_heads(data)
            if not self.final:  # all heads of one answer are bounded, interim ones too
                uncut = len(self._heads) if self._heads is not None else 0
                if len(self._raw) + uncut > MAX_HEAD_BYTES:
                    raise httptools.HttpParserError("head too large")
        except httptools.HttpParserUpgrade:
            # Never asked for (the router sends no Upgrade): what follows is not HTTP.
            self._error = httptools.HttpParserError("the answer switched protocols")
            self.failed = True
        except httptools.HttpParserError as exc:
            if self.done:
                self._stray = True  # not a valid answer after ours: bytes past the answer
            else:
                # A check of ours raised in a callback: llhttp reports "callback error".
                own = exc.__context__
                self._error = own if isinstance(own, httptools.HttpParserError) else exc
                self.failed = True
        if self._queued > _HIGH_WATER and self._conn is not None:
            self._conn.pause()
        # `_wake(True)`, inline: once per answer at least.
        w = self._waiter
        if w is not None:
            if not w.done():
                w.set_result(True)
        elif self.listener is not None:
            self.listener()

    def _feed_heads(self, data: bytes) -> None:
        # A HEAD answer announces a body it does not have, and httptools gives no way to tell
        # llhttp so (on_headers_complete cannot return "skip the body"). So llhttp gets one
        # whole head at a time, cut at its blank line (a strict CRLF parser accepts no other
        # end), and never what follows the final one.
        pending = self._heads
        assert pending is not None
        pending += data
        while not self.final:
            end = pending.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(pending[: end + 4])
            del pending[: end + 4]
            assert self._parser is not None  # `feed` checked
            self._raw += head
            self._parser.feed_data(head)
        if pending:
            self._stray = True

    def ended(self, exc: Exception | None) -> None:
        """EOF (None) or the connection lost (`exc` when reset)."""
        if self.done or self._closed is not None:
            return
        if exc is None and self.final and self._until_close:
            self.done = True  # a body framed by the close: this was its end
        else:
            self._closed = Closed(exc)  # a reset: we cannot tell the end from a cut
            self.failed = True
        self._wake(True)

    # -- httptools' callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            self._stray = True
            raise httptools.HttpParserError("bytes past the answer")  # stop parsing them

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # called by it
        raw, at = self._raw, self._head_at
        while raw[at] in _CR_LF:
            at += 1  # llhttp skips empty lines before a status line (RFC 9112 2.2)
        # llhttp has just read this head's blank line, and a head holds no other.
        end = raw.index(b"\r\n\r\n", at) + 4
        if end > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("head too large")
        # The version from the status line llhttp has checked ("HTTP/1.1 200 ..."): its
        # version string would be formatted anew at each call.
        if not raw.startswith(b"HTTP/1.", at) or raw[at + 7] not in _ZERO_OR_ONE:
            version = parser.get_http_version()
            raise httptools.HttpParserError(f"HTTP/{version} is not HTTP/1.x")
        status = parser.get_status_code()
        if status < 100:
            raise httptools.HttpParserError(f"bad status code {status}")
        if status == 101:
            # RFC 9110 15.2.2: a switch only to what the request asked for, and the router
            # never asks (it refuses Upgrade). Relayed, its bytes would be another protocol.
            raise httptools.HttpParserError("101 Switching Protocols, never asked for")
        if status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: skipped
            self._head_at = end
            return
        self.status = status
        self.final = True
        self.raw_head = raw[at:end]
        self._raw = b""
        chunked = self._framing()
        if self._heads is not None:
            self.done = True  # RFC 9112 6.3 rule 1: a HEAD answer ends with its head
            self._keep = _persists(raw[at + 7] == _ZERO, self.named)
            return
        self._keep = parser.should_keep_alive()
        if status not in _BODYLESS_STATUSES:
            self._until_close = self.length is None and not chunked

    def on_body(self, body: bytes) -> None:
        if self._interim:
            # RFC 9110 15.2: a 1xx answer ends with its head. llhttp frames one of 104-199
            # by its Content-Length; taken as the final answer's, a body could carry a head
            # of its own.
            raise httptools.HttpParserError("an interim (1xx) answer with a body")
        self._pieces.append(body)
        self._queued += len(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        else:
            self.done = True

    # -- read by the caller ---------------------------------------------------------------------

    @property
    def reason_bytes(self) -> bytes:
        """The final head's reason phrase, as it came (llhttp allows a status code of three
        digits only: "HTTP/1.1 200 OK" has it from its 14th byte)."""
        head = self.raw_head  # b"" until the final head is parsed
        return head[13 : head.index(b"\r\n")] if head else b""

    @property
    def reason(self) -> str:
        return self.reason_bytes.decode(*_CODEC)

    @property
    def fields(self) -> list[tuple[bytes, bytes]]:
        """The final head's fields as they came (bytes), read from it on first use."""
        if self._fields is None:
            self._fields = head_fields(self.raw_head)
        return self._fields

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The final head's fields, decoded on first use."""
        if self._headers is None:
            md: CIMultiDict[str] = CIMultiDict()
            for name, value in self.fields:
                md.add(name.decode(*_CODEC), value.decode(*_CODEC))
            self._headers = CIMultiDictProxy(md)
        return self._headers

    def time_out(self) -> None:
        """The read timeout ran out while nobody waited (the express lane's own timer):
        the next wait raises it, as a wait that timed out itself would have."""
        self._timed_out = self.failed = True
        self._wake(False)

    async def head(self) -> None:
        """Until the final head is parsed."""
        while not self.final:
            await self._wait(Phase.HEAD)

    def _framing(self) -> bool:
        """The final head's Content-Length, what its Connection fields name, and whether
        its body is chunked (the last transfer coding, RFC 9112 6.3 rule 4, as llhttp judges
        it); with neither a length nor chunks, the body runs until the close."""
        connection = codings = b""
        parts = _UNRELAYED_SPLIT.split(self.raw_head)  # kept, name, value, kept, ...
        self.kept_head = b"".join(parts[::3])[:-2]
        for name, value in zip(parts[1::3], parts[2::3], strict=True):
            name = name.lower()
            if name == b"content-length":
                self.length = int(value)  # llhttp has checked it is one number
            elif name == b"connection":
                value = value.lower()
                connection += b"," + value if connection else value
            elif name == b"transfer-encoding":
                value = value.lower()
                codings += b"," + value if codings else value
        if connection:
            named = _NAMED.get(connection)
            if named is None:
                # RFC 9110 5.6.1: empty list items ("keep-alive, ,") name nothing.
                named = frozenset(t.strip() for t in connection.split(b",")) - {b""}
                if len(_NAMED) < _NAMED_MAX:
                    _NAMED[connection] = named
            self.named = named
        return codings.rpartition(b",")[2].strip() == b"chunked"

    def body(self) -> bytes:
        """The whole body of an answer parsed to its end (`done`)."""
        if self._whole is None:
            self._whole = self._take() if self._pieces else b""
        return self._whole

    async def read(self) -> bytes:
        if self._whole is None:
            if self.done:
                # The common case: the whole answer came with the head. No future, no task.
                self._whole = self._take() if self._pieces else b""
            else:
                self._whole = b"".join([piece async for piece in self.chunks()])
        return self._whole

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                if self._pieces:
                    yield self._take()
                elif self.done or self._conn is None:
                    return
                else:
                    await self._wait(Phase.BODY)
        except BaseException:
            self.release()  # not read to its end: the connection cannot be reused
            raise

    def release(self) -> None:
        self._parser = None
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        conn.answer = None
        # Bytes past the answer mean the stream is out of step: never reuse it.
        if self.done and self._keep and not (self._pieces or self._stray or conn.closed):
            conn.pool.put(conn)
        else:
            conn.pool.drop(conn)

    def _take(self) -> bytes:
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._queued = 0
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()
        return data

    async def _wait(self, phase: Phase) -> None:
        """For news from the connection; `read_s` of silence, the end of the stream or a
        parse error is raised as `errors.py` says it for `phase`."""
        conn = self._conn
        assert conn is not None
        pool = conn.pool
        with mapped(pool.name, phase):
            if self._error is not None:
                raise self._error
            if self._closed is not None:
                raise self._closed
            if self._timed_out:
                raise TimeoutError
            fut: asyncio.Future[bool] = pool.loop.create_future()
            self._waiter = fut
            timer = pool.loop.call_later(self._read_s, self._wake, False)
            try:
                news = await fut
            finally:
                timer.cancel()
                self._waiter = None
            if not news:
                raise TimeoutError

    def _wake(self, news: bool) -> None:
        w = self._waiter
        if w is not None:
            if not w.done():
                w.set_result(news)
        elif self.listener is not None:
            self.listener()


def head_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of a head llhttp has parsed (its CRLF lines past the status line), their
    values less the whitespace around them (RFC 9112 5.1)."""
    fields = []
    for line in head.split(b"\r\n")[1:-2]:
        name, _, value = line.partition(b":")
        fields.append((name, value.strip(b" \t")))
    return fields


def _persists(http10: bool, named: frozenset[bytes]) -> bool:
    """RFC 9112 9.3: 1.1 persists unless "close"; 1.0 only with "keep-alive". (llhttp's
    should_keep_alive also asks for body framing, which a HEAD answer need not have.)"""
    return b"keep-alive" in named if http10 else b"close" not in named


__all__ = ["MAX_HEAD_BYTES", "Conn", "H1Response", "Pool", "head_fields"]
