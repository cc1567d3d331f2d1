"""One upstream attempt, behind a one-method seam: `Forwarder.send(instance, request)`.

This is the only module that knows aiohttp's client. It maps aiohttp's exceptions to ours
(`errors.py`) by what they tell about the request's fate: `NotReached` (nothing was sent,
safe to re-send anywhere) or `SentNoAnswer` (the instance may have acted on it). A leaner
pooled HTTP/1.1 client can replace this class for speed without touching `proxy.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import ConnectFailed, ConnectTimeout, Disconnected, ReadTimeout, UpstreamError
from .pool import Instance

# RFC 9110 7.6.1: connection-specific fields are not forwarded; nor is any field the
# Connection header names. Proxy-Connection is the pre-standard spelling some clients send.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# aiohttp would add its own values for these; the caller's (or none) must go through as sent.
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


@dataclass(slots=True)
class UpstreamRequest:
    method: str
    path_qs: str  # raw (percent-encoded) path and query, sent byte for byte
    headers: CIMultiDict[str]
    body: bytes
    read_timeout_s: float


class UpstreamResponse(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    def release(self) -> None: ...


class PendingResponse(UpstreamResponse, Protocol):
    """An answer to a request already written, its head perhaps not read yet."""

    async def head(self) -> None: ...


class Forwarder(Protocol):
    """One attempt per `send`; `start` before the first (in the running loop), `close`
    after the last (connections closed, requests waiting for one fail as not reached)."""

    async def start(self) -> None: ...

    async def send(self, instance: Instance, request: UpstreamRequest) -> UpstreamResponse: ...

    async def close(self) -> None: ...


def strip_hop_by_hop(
    headers: Iterable[tuple[str, str]], connection: str | None
) -> CIMultiDict[str]:
    named = {t.strip().lower() for t in connection.split(",")} if connection else set()
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers:
        lk = k.lower()
        if lk not in HOP_BY_HOP and lk not in named:
            out.add(k, v)
    return out


@dataclass(frozen=True, slots=True)
class Fetched:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


async def fetch(
    forwarder: Forwarder, instance: Instance, request: UpstreamRequest, timeout_s: float
) -> Fetched:
    """One whole small exchange (probes, health checks, listings, webhook relays), bounded by
    `timeout_s` in all; raises UpstreamError (ReadTimeout when the bound runs out)."""
    try:
        async with asyncio.timeout(timeout_s):
            resp = await forwarder.send(instance, request)
            try:
                body = await resp.read()
            finally:
                resp.release()
    except TimeoutError:
        raise ReadTimeout(instance.name, f"no whole answer within {timeout_s:g} s") from None
    return Fetched(resp.status, resp.headers, body)


class _AiohttpResponse:
    __slots__ = ("_instance", "_resp", "headers", "reason", "status")

    def __init__(self, instance: str, resp: aiohttp.ClientResponse) -> None:
        self._instance = instance
        self._resp = resp
        self.status = resp.status
        self.reason = resp.reason or ""
        self.headers = resp.headers

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except BaseException as exc:
            self._resp.close()
            raise _map_body_error(self._instance, exc) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._resp.content.iter_any():
                yield data
        except BaseException as exc:
            self._resp.close()
            raise _map_body_error(self._instance, exc) from exc

    def release(self) -> None:
        self._resp.release()


def _map_body_error(instance: str, exc: BaseException) -> BaseException:
    if isinstance(exc, TimeoutError):
        return ReadTimeout(instance, "no data within the read timeout")
    if isinstance(exc, aiohttp.ClientError):
        return Disconnected(instance, f"response body broken off: {type(exc).__name__}")
    return exc


class AiohttpForwarder:
    """One `ClientSession` for every instance: keep-alive pools per host, no cookies, no
    decompression (bytes and `Content-Encoding` pass through unchanged)."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        keepalive_s: float,
        limit_per_host: int,
        pool_wait_s: float,
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._pool_wait_s = pool_wait_s
        self._keepalive_s = keepalive_s
        self._limit_per_host = limit_per_host
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=self._limit_per_host,
            keepalive_timeout=self._keepalive_s,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _timeout(self, read_s: float) -> aiohttp.ClientTimeout:
        t = self._timeouts.get(read_s)
        if t is None:
            # sock_read bounds the wait for each read, the response head included; there is
            # no total so a long streamed answer is not cut while data keeps coming. aiohttp's
            # `connect` covers the wait for a free pooled connection and the connect after it.
            t = aiohttp.ClientTimeout(
                total=None,
                connect=self._pool_wait_s + self._connect_timeout_s,
                sock_connect=self._connect_timeout_s,
                sock_read=read_s,
            )
            self._timeouts[read_s] = t
        return t

    async def send(self, instance: Instance, request: UpstreamRequest) -> UpstreamResponse:
        session = self._session
        if session is None:
            raise RuntimeError("forwarder not started")
        url = URL(instance.base + request.path_qs, encoded=True)
        try:
            resp = await session.request(
                request.method,
                url,
                headers=request.headers,
                data=request.body
                if request.body or request.method not in ("GET", "HEAD")
                else None,
                timeout=self._timeout(request.read_timeout_s),
                allow_redirects=False,
                skip_auto_headers=_SKIP_AUTO,
            )
        except aiohttp.ConnectionTimeoutError:
            raise ConnectTimeout(instance.name, "connect timed out") from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectFailed(instance.name, f"connect failed: {exc.os_error}") from None
        except TimeoutError:
            # Covers aiohttp's SocketTimeoutError: the request was written, no answer came.
            raise ReadTimeout(instance.name, "no answer within the read timeout") from None
        except aiohttp.ClientError as exc:
            # Server closed or reset the connection after we started sending: it may have
            # processed the request (RFC 9110 9.2.2 is why only idempotent ones are retried).
            raise Disconnected(instance.name, f"connection lost: {type(exc).__name__}") from None
        if resp.status == 101:
            # Never asked for (the router sends no Upgrade): what follows is not HTTP.
            resp.close()
            raise Disconnected(instance.name, "malformed response: 101 Switching Protocols")
        return _AiohttpResponse(instance.name, resp)


__all__ = [
    "HOP_BY_HOP",
    "AiohttpForwarder",
    "Fetched",
    "Forwarder",
    "PendingResponse",
    "UpstreamError",
    "UpstreamRequest",
    "UpstreamResponse",
    "fetch",
    "strip_hop_by_hop",
]
