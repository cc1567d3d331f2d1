"""Which front serves which path: every route aiohttp has (webhooks, admin, status page,
metrics, probes) is handed to it by the lean server; proxied routes stay lean."""

from __future__ import annotations

from aiohttp import web

from wa_router.app import ROUTER, build_app
from wa_router.lean import LeanServer
from wa_router.sim import SimInstance

from .conftest import pool_config


async def test_every_aiohttp_route_is_handed_to_aiohttp(sims: list[SimInstance]) -> None:
    cfg = pool_config(sims, admin={"token": "t" * 32}, webhooks={"secrets": ["s"]})
    app = build_app(cfg)
    lean = LeanServer(web.Server(lambda r: web.Response()), app[ROUTER], cfg)
    seen = 0
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter", "")
        if path == "/{tail}":
            continue  # the proxy's catch-all: what the lean server answers itself
        concrete = path.replace("{tail}", "x").replace("{session}", "s1").replace("{name}", "n")
        for route in resource:
            method = "GET" if route.method in ("*", "HEAD") else route.method
            assert lean.whose(method, concrete) is None, (route.method, path)
            seen += 1
    assert seen >= 10
    # The pool-wide routes are aiohttp's too; a session's route is the lean server's.
    assert lean.whose("GET", "/health") is None
    assert lean.whose("GET", "/api/sessions") is None
    match = lean.whose("POST", "/api/messages/send")
    assert match is not None and match.rule.kind == "session"
