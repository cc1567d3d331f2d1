"""Request and response plumbing shared by the proxy, the webhook intake and the admin API:
reading a bounded body, the headers a forwarded request carries, relaying an upstream answer
byte for byte, and the router's own JSON errors.
"""

from __future__ import annotations

import json
from contextvars import ContextVar

import structlog
from aiohttp import web
from multidict import CIMultiDict

from . import retry
from .errors import RequestRejected, UpstreamError
from .exchange import (
    Answer,
    Inbound,
    Reply,
    Streamed,
    answer_headers,
    buffered,
    upstream_headers,
)
from .forward import UpstreamResponse

log = structlog.get_logger("wa_router.httpio")

# Answers up to this size are read whole and sent with a Content-Length in one write;
# larger ones are streamed chunk by chunk.
SMALL_BODY_BYTES = 256 * 1024
# True once the request being handled has its answer's head on the wire: after that, a
# shutdown can only cut the connection (runtime.answering answers the others; it sets this
# to False for each request).
HEAD_SENT: ContextVar[bool] = ContextVar("wa_router_head_sent", default=False)
_BODYLESS_STATUSES = frozenset({204, 304})


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, or 413 as soon as it is known to exceed `limit`. The body is
    buffered because a request may have to be sent twice (to the rediscovered owner)."""
    length = request.content_length
    if length is not None and length > limit:
        raise payload_too_large(limit)
    if not request.body_exists:
        return b""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise payload_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def forward_headers(request: web.Request) -> CIMultiDict[str]:
    """The caller's headers less hop-by-hop ones and those the router sets, plus
    X-Forwarded-* (`exchange.upstream_headers`, from an aiohttp request)."""
    inbound = Inbound(
        request.method, "", "", request.headers, b"", request.remote or "", request.scheme
    )
    return upstream_headers(inbound)


async def send_answer(request: web.Request, answer: Answer) -> web.StreamResponse:
    """The proxy's answer, written by aiohttp."""
    if isinstance(answer, Reply):
        return web.Response(
            status=answer.status,
            reason=answer.reason or None,
            headers=answer.headers,
            body=answer.body,
        )
    return await _stream(request, answer.upstream, answer.session)


async def settle(up: UpstreamResponse, session: str | None, method: str) -> Answer:
    """An instance's answer, as it goes back: read whole when it is small and its length
    is known (one write, and a body broken mid-way is a clean 502), else streamed (and
    HEAD / 204 / 304 answers, which have no body, as they are)."""
    length = up.headers.get("Content-Length")
    if (
        method == "HEAD"
        or up.status in _BODYLESS_STATUSES
        or length is None
        or not length.isdigit()
        or int(length) > SMALL_BODY_BYTES
    ):
        return Streamed(up, session)
    try:
        body = await up.read()
    except UpstreamError as exc:
        raise retry.failure_answer(exc, session, retried=False) from None
    finally:
        up.release()
    return buffered(up, body)


async def relay(
    request: web.Request, up: UpstreamResponse, session: str | None
) -> web.StreamResponse:
    """Send the upstream answer back: status, headers (less hop-by-hop), bytes unchanged."""
    return await send_answer(request, await settle(up, session, request.method))


async def _stream(
    request: web.Request, up: UpstreamResponse, session: str | None
) -> web.StreamResponse:
    try:
        bodyless = request.method == "HEAD" or up.status in _BODYLESS_STATUSES
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=answer_headers(up))
        HEAD_SENT.set(True)
        await resp.prepare(request)
        if not bodyless:
            try:
                async for chunk in up.chunks():
                    await resp.write(chunk)
            except UpstreamError as exc:
                # The head is sent already: all that is left is to cut the caller's
                # connection, so a truncated body cannot pass for a whole one.
                log.warning("upstream_body_broken", instance=exc.instance, error=type(exc).__name__)
                if request.transport is not None:
                    request.transport.abort()
                return resp
        await resp.write_eof()
        return resp
    finally:
        up.release()


def json_error(exc: RequestRejected) -> web.Response:
    return web.Response(
        status=exc.status,
        body=json.dumps(exc.body(), separators=(",", ":")).encode(),
        content_type="application/json",
        headers=exc.headers or None,
    )


def method_not_allowed(request: web.Request, allowed: list[str]) -> RequestRejected:
    """405 for a path the router serves, asked with another method: `allowed` in the JSON
    and in `Allow` (RFC 9110 15.5.6)."""
    refused = RequestRejected(
        405,
        "method_not_allowed",
        f"{request.method} is not allowed on {request.path}",
        allowed=allowed,
    )
    refused.headers["Allow"] = ", ".join(allowed)
    return refused


def payload_too_large(limit: int) -> RequestRejected:
    return RequestRejected(
        413, "payload_too_large", f"the request body is over {limit} bytes", limit_bytes=limit
    )
