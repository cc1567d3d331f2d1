"""A caller's request and the router's answer to it, as the proxy sees them: plain values,
so the same routing runs behind the lean server (`lean.py`, httptools on a Protocol) and
behind aiohttp (`httpio.py`), and can be tested without either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import RequestRejected
from .forward import HOP_BY_HOP, UpstreamResponse, strip_hop_by_hop
from .wire import CODEC

# Request headers the router sets itself.
DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
}
DROP_REQUEST_BYTES = frozenset(name.encode() for name in DROP_REQUEST)


class Inbound:
    """One caller request, read whole (a request may have to be sent twice)."""

    __slots__ = (
        "_headers",
        "_query",
        "body",
        "caller_gone",
        "may_wait",
        "method",
        "path",
        "peer",
        "query_string",
        "raw",
        "scheme",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query_string: str,
        headers: CIMultiDictProxy[str] | CIMultiDict[str] | None,
        body: bytes,
        peer: str,
        scheme: str = "http",
        *,
        raw: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.method = method
        self.path = path  # raw (percent-encoded), no query
        self.query_string = query_string  # raw, without the "?"
        self._headers = headers
        # The fields as they came (the lean front): `headers` decodes them on first use, and
        # the express lane never asks.
        self.raw = raw
        self.body = body
        self.peer = peer  # the caller's address ("" when unknown)
        self.scheme = scheme
        self._query: dict[str, str] | None = None
        # What the front knows of the caller (the lean one tells; aiohttp's does not):
        # its connection closed, so nothing more is sent for it; or it half-closed, so it
        # is not kept waiting for its session (it could leave unseen meanwhile).
        self.caller_gone = False
        self.may_wait = True

    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]:
        if self._headers is None:
            md: CIMultiDict[str] = CIMultiDict()
            for name, value in self.raw or ():
                md.add(name.decode(*CODEC), value.decode(*CODEC))
            self._headers = md
        return self._headers

    @property
    def path_qs(self) -> str:
        return f"{self.path}?{self.query_string}" if self.query_string else self.path

    @property
    def host(self) -> str:
        return self.headers.get("Host", "")

    @property
    def query(self) -> Mapping[str, str]:
        """Parsed on first use (most routes never read it): each name's first value, `+`
        and %-escapes decoded (as aiohttp's `request.query.get` reads)."""
        if self._query is None:
            self._query = parse_query(self.query_string)
        return self._query


def parse_query(qs: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if not qs:
        return out
    for part in qs.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name)
        if "%" in value or "+" in value:
            value = unquote_plus(value)
        out.setdefault(name, value)
    return out


@dataclass(slots=True)
class Reply:
    """An answer with its whole body: the router's own, or an instance's read whole."""

    status: int
    headers: CIMultiDict[str]
    body: bytes
    reason: str = ""


@dataclass(slots=True)
class Streamed:
    """An instance's answer relayed as it comes (large or of unknown length). Whoever
    writes it releases `upstream`."""

    upstream: UpstreamResponse
    session: str | None


Answer = Reply | Streamed


def connection_of(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> str | None:
    """Every Connection field's tokens, as one list (RFC 9110 7.6.1: each names fields that
    are not forwarded)."""
    values = headers.getall("Connection", ())
    return ",".join(values) if values else None


def error_reply(exc: RequestRejected) -> Reply:
    headers: CIMultiDict[str] = CIMultiDict(exc.headers)
    headers["Content-Type"] = "application/json"
    return Reply(exc.status, headers, orjson.dumps(exc.body()))


def answer_headers(up: UpstreamResponse) -> CIMultiDict[str]:
    """An instance's answer headers less hop-by-hop ones (and those Connection names), and
    less the Content-Length of a 204 (RFC 9110 8.6: it has none; a caller that trusted
    one would wait for bytes that never come, or take the next answer's for them)."""
    headers = strip_hop_by_hop(up.headers.items(), connection_of(up.headers))
    if up.status == 204:
        headers.popall("Content-Length", None)
    return headers


def buffered(up: UpstreamResponse, body: bytes) -> Reply:
    headers = answer_headers(up)
    headers.popall("Content-Length", None)
    return Reply(up.status, headers, body, up.reason)


def upstream_headers(inbound: Inbound) -> CIMultiDict[str]:
    """The caller's headers less hop-by-hop ones and those the router sets, plus
    X-Forwarded-*. One pass."""
    src = inbound.headers
    headers: CIMultiDict[str] = CIMultiDict()
    for k, v in src.items():
        if k.lower() not in DROP_REQUEST:
            headers.add(k, v)
    return finish_forward(headers, inbound)


def finish_forward(headers: CIMultiDict[str], inbound: Inbound) -> CIMultiDict[str]:
    """`headers` (the caller's less `DROP_REQUEST`) less what Connection names, plus
    X-Forwarded-*."""
    src = inbound.headers
    connection = connection_of(src)
    if connection is not None:
        for token in connection.split(","):
            headers.popall(token.strip(), None)
    prior = src.get("X-Forwarded-For")
    peer = inbound.peer
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = inbound.scheme
    headers["X-Forwarded-Host"] = inbound.host
    return headers


@dataclass(slots=True)
class Fields:
    """A caller's header fields read once, as bytes (`read_fields`): the lines that go
    upstream as they came, and what the front and X-Forwarded-* need of the others."""

    forward: list[bytes]  # "Name: value\r\n", the fields not in DROP_REQUEST
    host: bytes | None = None  # the first Host
    forwarded_for: bytes | None = None  # the first X-Forwarded-For
    connection: bytes = b""  # every Connection field's tokens
    proxy_connection: bool = False  # a Proxy-Connection came (llhttp reads it as Connection)
    content_length: bytes | None = None
    chunked: bool = False  # a Transfer-Encoding came
    codings: bytes = b""  # ...every Transfer-Encoding field's codings, as one list
    hosts: int = 0  # how many Host fields came
    expect_continue: bool = False
    upgrade: bool = False
    # Any of the fields above but Content-Length and one Host came (a Transfer-Encoding,
    # Connection, Expect, Upgrade, Proxy-Connection, or no Host or two): the front has
    # something to check. Most requests have none, and are checked once, by this.
    unusual: bool = False


def read_fields(raw: list[tuple[bytes, bytes]]) -> Fields:
    forward: list[bytes] = []
    fields = Fields(forward)
    unusual = False
    for name, value in raw:
        lower = name.lower()
        if lower not in DROP_REQUEST_BYTES:
            forward.append(b"%s: %s\r\n" % (name, value))
        elif lower == b"content-length":
            fields.content_length = value
        elif lower == b"host":
            fields.hosts += 1
            if fields.host is None:
                fields.host = value
        elif lower == b"x-forwarded-for":
            if fields.forwarded_for is None:
                fields.forwarded_for = value
        else:
            unusual = True
            if lower == b"transfer-encoding":
                fields.chunked = True
                fields.codings = value if not fields.codings else fields.codings + b"," + value
            elif lower == b"connection":
                fields.connection = (
                    value if not fields.connection else fields.connection + b"," + value
                )
            elif lower == b"expect":
                fields.expect_continue |= value.lower() == b"100-continue"
            elif lower == b"upgrade":
                fields.upgrade = True
            elif lower == b"proxy-connection":
                fields.proxy_connection = True
    fields.unusual = unusual or fields.hosts != 1
    return fields


def forward_fields(fields: Fields, peer: bytes) -> bytes:
    """The header lines that go upstream, as bytes: the caller's (`fields.forward`) less
    what Connection names, plus X-Forwarded-* (`peer`: the caller's address, encoded). The
    same fields as `upstream_headers` makes, in the same order, for the express lane (whose
    callers come over plain http)."""
    lines = fields.forward
    if fields.connection:
        named = {t.strip().lower() for t in fields.connection.split(b",")}
        lines = [ln for ln in lines if ln.partition(b":")[0].lower() not in named]
    prior = fields.forwarded_for
    xff = prior + b", " + peer if prior else peer
    lines.append(
        b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: %s\r\n"
        % (xff, fields.host or b"")
    )
    return b"".join(lines)
