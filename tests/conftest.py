"""Shared harness: simulated instances and the router on real loopback sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from wa_router.app import ROUTER, Router, RouterRunner, build_app
from wa_router.config import Config, config_from_dict
from wa_router.sim import SimInstance, sign_webhook

API_KEY = "test-key"


@pytest.fixture(autouse=True)
def _own_cwd(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test in a directory of its own: a router configured without a state dir keeps
    its directory snapshot in ./state, which must not be another test's (or the repo's)."""
    monkeypatch.chdir(tmp_path)


async def wait_until(
    cond: Callable[[], Awaitable[bool]], timeout_s: float = 5.0, what: str = ""
) -> None:
    """`wait_for` of a condition that has to ask a server (awaitable)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.005)


async def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0, what: str = "") -> None:
    """Wait until `cond()` holds; fail after the deadline (never a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.005)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# CI runs the request-path tests once more with the other upstream client. (Not WA_ROUTER_*:
# a router started as a subprocess would read that as a config override.)
UPSTREAM_CLIENT = os.environ.get("WA_TEST_UPSTREAM_CLIENT")
# CI runs the request-path tests once more with every request through aiohttp.
FRONT = os.environ.get("WA_TEST_FRONT")


def pool_config(sims: list[SimInstance], **sections: Any) -> Config:
    raw: dict[str, Any] = {"instances": [{"name": s.name, "url": s.url} for s in sims]}
    raw.update(sections)
    if UPSTREAM_CLIENT:
        raw["upstream"] = {**raw.get("upstream", {}), "client": UPSTREAM_CLIENT}
    if FRONT:
        raw["server"] = {**raw.get("server", {}), "front": FRONT}
    return config_from_dict(raw)


def with_rule_timeout(cfg: Config, rule_name: str, read_timeout_s: float) -> Config:
    from wa_router.profiles import BLAZZ_RULES

    rules = tuple(
        dataclasses.replace(r, read_timeout_s=read_timeout_s) if r.name == rule_name else r
        for r in BLAZZ_RULES
    )
    return dataclasses.replace(cfg, rules=rules)


@pytest.fixture
async def sims() -> AsyncIterator[list[SimInstance]]:
    nodes = [
        SimInstance(name=f"node-{i}", api_key=API_KEY, connect_delay_s=0.05, ready_delay_s=0.05)
        for i in range(4)
    ]
    for n in nodes:
        await n.start()
    yield nodes
    for n in nodes:
        await n.stop()


StartRouter = Callable[[Config], Awaitable[tuple[TestClient[web.Request, web.Application], Router]]]


class RouterTestServer(TestServer):
    """The router as `wa-router serve` runs it: the lean server in front of aiohttp."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        # aiohttp's TestServer asks for handler cancellation; `serve` does not (a webhook's
        # handler runs to its end when Node gives up waiting): the tests run it as served.
        kwargs.pop("handler_cancellation", None)
        return RouterRunner(self.app, **kwargs)


@pytest.fixture
def start_router(aiohttp_client: Any) -> StartRouter:
    async def start(cfg: Config) -> tuple[TestClient[web.Request, web.Application], Router]:
        app = build_app(cfg)
        client = await aiohttp_client(RouterTestServer(app, host="127.0.0.1"))
        return client, app[ROUTER]

    return start


def send_body(session: str, message: str = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "session_id": session,
        "workspace_id": 1,
        "recipient_phone": "628123456789",
        "message": message,
        "type": "text",
        "api_key": API_KEY,
        **extra,
    }


def sends(sim: SimInstance) -> int:
    return sim.count("POST", "/api/messages/send")


def probes(sim: SimInstance, session: str) -> int:
    return sim.count("GET", f"/api/sessions/{session}/status")


def caller_traffic(sim: SimInstance) -> int:
    """Requests that came from callers (not the router's own health checks and syncs)."""
    return sum(
        1
        for r in sim.received
        if r.path != "/health" and not (r.method == "GET" and r.path == "/api/sessions")
    )


def signed_webhook(
    secret: str, event: str, data: dict[str, Any], instance_port: int, ts: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """A webhook as Node sends it: compact JSON, signed over X-Timestamp + raw body (now,
    or at `ts`)."""
    body = json.dumps({"event": event, "data": data}, separators=(",", ":")).encode()
    ts = str(int(time.time()) if ts is None else ts)
    return body, {
        "Content-Type": "application/json",
        "X-Timestamp": ts,
        "X-HMAC-Signature": sign_webhook(secret, ts, body),
        "X-Instance-Url": f"http://localhost:{instance_port}",
    }
