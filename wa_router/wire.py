"""The bytes the lean server writes itself: answer heads, chunk framing, the text codec,
and a lingering close. No state: `lean.py` decides what to write, this says how.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from multidict import CIMultiDict

from .forward import HOP_BY_HOP

BODYLESS_STATUSES = frozenset({204, 304})
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED_END = b"0\r\n\r\n"
# Header and target text: utf-8 with surrogateescape both ways, as the upstream clients
# (h1response.py, aiohttp) decode and encode it, so any byte goes through unchanged.
CODEC = ("utf-8", "surrogateescape")


_PHRASES = {int(s): s.phrase for s in HTTPStatus}


def reason_phrase(status: int) -> str:
    return _PHRASES.get(status, "Unknown")


LINGER_S = 2.0


def linger(transport: asyncio.Transport) -> None:
    """Close after an answer the caller may still be sending to: our side shut first
    (FIN), what still arrives read and dropped for a moment, then closed. Closing with
    unread bytes would send a reset, which can make the caller lose the answer (RFC 9112
    9.6)."""
    if transport.is_closing():
        return
    if transport.can_write_eof():
        transport.write_eof()
    transport.resume_reading()
    asyncio.get_event_loop().call_later(LINGER_S, transport.close)


def answer_head(
    status: int,
    reason: str,
    headers: CIMultiDict[str],
    length: int | None,
    close: bool,
    *,
    chunked: bool = False,
    http10_keep_alive: bool = False,
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason or reason_phrase(status)}"]
    for k, v in headers.items():
        lines.append(f"{k}: {v}")
    if length is not None and status not in BODYLESS_STATUSES:
        lines.append(f"Content-Length: {length}")
    elif chunked:
        lines.append("Transfer-Encoding: chunked")
    if close:
        lines.append("Connection: close")
    elif http10_keep_alive:
        lines.append("Connection: keep-alive")
    lines.append("\r\n")
    return "\r\n".join(lines).encode(*CODEC)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# RFC 9110 7.6.1: not relayed (forward.HOP_BY_HOP, as the bytes llhttp gives).
HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)
_NOT_RELAYED = HOP_BY_HOP_BYTES | {b"content-length"}


def relay_head(
    status: int,
    reason: bytes,
    fields: list[tuple[bytes, bytes]],
    lowers: list[bytes],
    named: frozenset[bytes],
    length: int,
    close: bool,
    *,
    http10_keep_alive: bool = False,
) -> bytes:
    """The head of an instance's answer read whole, as bytes from its bytes: its fields
    (`lowers`: their names in lower case) less hop-by-hop ones and those its Connection
    names (`named`), and our own framing. The same answer as `answer_head` writes for
    `exchange.buffered`, without decoding anything."""
    dropped = _NOT_RELAYED | named if named else _NOT_RELAYED
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason or reason_phrase(status).encode())]
    for (name, value), low in zip(fields, lowers, strict=True):
        if low not in dropped:
            parts.append(b"%s: %s\r\n" % (name, value))
    parts.append(b"Content-Length: %d\r\n" % length)
    if close:
        parts.append(b"Connection: close\r\n")
    elif http10_keep_alive:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
