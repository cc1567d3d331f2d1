"""Forwarding fidelity: headers, bytes, encodings, streaming, truncation."""

from __future__ import annotations

import gzip
import hashlib
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from wa_router.config import config_from_dict

from .conftest import StartRouter

BIG = bytes(range(256)) * 8192  # 2 MiB
GZ = gzip.compress(json.dumps({"compressed": True}).encode())


def upstream_app() -> web.Application:
    """A stand-in instance that shows what it received and answers in awkward ways."""

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"session_id": request.match_info["s"], "status": "connected"})

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "sha256": hashlib.sha256(body).hexdigest(),
                "length": len(body),
            }
        )

    async def gz(request: web.Request) -> web.Response:
        return web.Response(
            body=GZ,
            headers={
                "Content-Encoding": "gzip",
                "Content-Type": "application/json",
                "X-Upstream": "yes",
            },
        )

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        for i in range(0, len(BIG), 65536):
            await resp.write(BIG[i : i + 65536])
        await resp.write_eof()
        return resp

    async def broken(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        await resp.write(b"x" * 300_000)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def nothing(request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"X-Empty": "1"})

    app = web.Application(client_max_size=64 * 1024 * 1024, handler_args={"auto_decompress": False})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    async def listing(_: web.Request) -> web.Response:
        return web.json_response({"sessions": []})

    app.router.add_get("/health", health)
    app.router.add_get("/api/sessions", listing)
    app.router.add_get("/api/sessions/{s}/status", status)
    app.router.add_route("*", "/api/sessions/{s}/echo", echo)
    app.router.add_get("/api/sessions/{s}/gzip", gz)
    app.router.add_get("/api/sessions/{s}/big", big)
    app.router.add_get("/api/sessions/{s}/broken", broken)
    app.router.add_get("/api/sessions/{s}/nothing", nothing)
    return app


@pytest.fixture(params=["lean", "aiohttp"])
async def routed(start_router: StartRouter, request: pytest.FixtureRequest) -> Any:
    server = TestServer(upstream_app(), host="127.0.0.1")
    await server.start_server()
    cfg = config_from_dict(
        {
            "instances": [{"name": "up", "url": str(server.make_url("/"))}],
            "limits": {"max_body_bytes": 8 * 1024 * 1024},
            "upstream": {"client": request.param},
        }
    )
    client, _ = await start_router(cfg)
    yield client
    await server.close()


async def test_hop_by_hop_removed_forwarded_added(routed: Any) -> None:
    url = URL(
        str(routed.make_url("/")).rstrip("/") + "/api/sessions/s1/echo?b=2&a=%41", encoded=True
    )
    resp = await routed.session.get(
        url,
        headers={
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "secret-hop",
            "Keep-Alive": "5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
            "X-Trace": "t1",
            "X-Forwarded-For": "203.0.113.9",
            "Host": "router.example:8080",
        },
    )
    assert resp.status == 200
    seen = await resp.json()
    names = {k.lower(): v for k, v in seen["headers"]}
    for hop in ("x-hop", "keep-alive", "te", "proxy-authorization"):
        assert hop not in names, hop
    assert names["x-trace"] == "t1"
    assert names["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert names["x-forwarded-proto"] == "http"
    assert names["x-forwarded-host"] == "router.example:8080"
    assert seen["path_qs"] == "/api/sessions/s1/echo?b=2&a=%41"  # byte for byte


async def test_request_bytes_and_encoding_unchanged(routed: Any) -> None:
    payload = gzip.compress(b'{"hello": "world"}' * 1000)
    resp = await routed.post(
        "/api/sessions/s1/echo",
        data=payload,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    seen = await resp.json()
    names = {k.lower(): v for k, v in seen["headers"]}
    assert seen["sha256"] == hashlib.sha256(payload).hexdigest()
    assert names["content-encoding"] == "gzip"
    assert names["content-type"] == "application/json"
    assert "user-agent" not in names or names["user-agent"].startswith("Python")


async def test_response_bytes_and_encoding_unchanged(routed: Any) -> None:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as raw,
        raw.get(routed.make_url("/api/sessions/s1/gzip")) as resp,
    ):
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["X-Upstream"] == "yes"
        assert await resp.read() == GZ


async def test_large_answer_streamed_whole(routed: Any) -> None:
    resp = await routed.get("/api/sessions/s1/big")
    assert resp.status == 200
    assert await resp.read() == BIG


async def test_truncated_upstream_body_cuts_the_callers_connection(routed: Any) -> None:
    resp = await routed.get("/api/sessions/s1/broken")
    assert resp.status == 200  # the head was already relayed
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def test_bodyless_answers(routed: Any) -> None:
    resp = await routed.get("/api/sessions/s1/nothing")
    assert resp.status == 204 and resp.headers["X-Empty"] == "1"
    assert await resp.read() == b""
    resp = await routed.head("/api/sessions/s1/echo")
    assert resp.status == 200
