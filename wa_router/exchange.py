"""A caller's request and the router's answer to it, as the proxy sees them: plain values,
so the same routing runs behind the lean server (`lean.py`, httptools on a Protocol) and
behind aiohttp (`httpio.py`), and can be tested without either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import RequestRejected
from .forward import HOP_BY_HOP, UpstreamResponse, strip_hop_by_hop

# Request headers the router sets itself.
DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
}


@dataclass(slots=True)
class Inbound:
    """One caller request, read whole (a request may have to be sent twice)."""

    method: str
    path: str  # raw (percent-encoded), no query
    query_string: str  # raw, without the "?"
    headers: CIMultiDictProxy[str] | CIMultiDict[str]
    body: bytes
    peer: str  # the caller's address ("" when unknown)
    scheme: str = "http"
    # The headers as they go upstream, when the front made them while reading (one pass
    # over the caller's headers instead of two); else `upstream_headers` makes them.
    forward: CIMultiDict[str] | None = None
    _query: dict[str, str] | None = field(default=None, repr=False)

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


def error_reply(exc: RequestRejected) -> Reply:
    headers: CIMultiDict[str] = CIMultiDict(exc.headers)
    headers["Content-Type"] = "application/json"
    return Reply(exc.status, headers, orjson.dumps(exc.body()))


def answer_headers(up: UpstreamResponse) -> CIMultiDict[str]:
    """An instance's answer headers less hop-by-hop ones (and those Connection names)."""
    return strip_hop_by_hop(up.headers.items(), up.headers.get("Connection"))


def buffered(up: UpstreamResponse, body: bytes) -> Reply:
    headers = answer_headers(up)
    headers.popall("Content-Length", None)
    return Reply(up.status, headers, body, up.reason)


def upstream_headers(inbound: Inbound) -> CIMultiDict[str]:
    """The caller's headers less hop-by-hop ones and those the router sets, plus
    X-Forwarded-*. One pass: this runs for every request."""
    if inbound.forward is not None:
        return inbound.forward
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
    connection = src.get("Connection")
    if connection is not None:
        for token in connection.split(","):
            headers.popall(token.strip(), None)
    prior = src.get("X-Forwarded-For")
    peer = inbound.peer
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = inbound.scheme
    headers["X-Forwarded-Host"] = inbound.host
    return headers
