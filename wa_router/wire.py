"""The bytes the lean server writes itself: answer heads, chunk framing, the text codec,
and a lingering close. No state: `lean.py` decides what to write, this says how.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from multidict import CIMultiDict

from .h1response import UNRELAYED

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


def relay_head(
    status: int,
    kept: bytes,
    named: frozenset[bytes],
    length: int,
    close: bool,
    *,
    http10_keep_alive: bool = False,
) -> bytes:
    """The head of an instance's answer read whole, as bytes from its bytes (`kept`: its
    head as llhttp parsed it less the hop-by-hop and framing fields and the blank line,
    `H1Response.kept_head`): those fields, less the ones its Connection names (`named`),
    and our own framing. The same answer as `answer_head` writes for `exchange.buffered`,
    without decoding anything (but for the whitespace around a value, which goes as it
    came)."""
    line_end = kept.index(b"\r\n")
    if line_end <= 13 or not kept.startswith(b"HTTP/1.1 "):
        # HTTP/1.0, or no reason: our status line ("HTTP/1.1 200 OK" has the reason from
        # its 14th byte).
        reason = kept[13:line_end] or reason_phrase(status).encode()
        kept = b"HTTP/1.1 %d %s%s" % (status, reason, kept[line_end:])
    if named and not named <= UNRELAYED:  # Connection names fields of its own: rare
        lines = kept.split(b"\r\n")  # the status line, the fields, "" (kept ends in CRLF)
        fields = [ln for ln in lines[1:-1] if ln.partition(b":")[0].lower() not in named]
        kept = b"\r\n".join([lines[0], *fields, b""])
    if close:
        framing = b"Content-Length: %d\r\nConnection: close\r\n\r\n" % length
    elif http10_keep_alive:
        framing = b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n" % length
    else:
        framing = b"Content-Length: %d\r\n\r\n" % length
    return kept + framing
