"""The operator's side: /healthz, /readyz, the admin API, its OpenAPI document, and the
`wa-router status` / `wa-router sync` commands against a real router on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from wa_router import cli
from wa_router.admin import ADMIN_FALLBACK, decode_cursor, encode_cursor, readiness
from wa_router.app import Router
from wa_router.pool import State
from wa_router.sim import SimInstance
from wa_router.statuscli import base_url, render_status
from wa_router.statuspage import PAGE_FILES
from wa_router.stores import Source

from .conftest import (
    API_KEY,
    StartRouter,
    free_port,
    pool_config,
    send_body,
    sends,
    signed_webhook,
    wait_for,
)

TOKEN = "a-token-of-16-chars-or-more"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

Client = TestClient[web.Request, web.Application]


async def started(
    sims: list[SimInstance], start_router: StartRouter, **sections: Any
) -> tuple[Client, Router]:
    sections.setdefault("admin", {"token": TOKEN})
    sections.setdefault("sync", {"interval_s": 3600})
    cfg = pool_config(sims, upstream={"api_key": API_KEY}, **sections)
    client, router = await start_router(cfg)
    await wait_for(lambda: router.warm, what="the warm sync")
    return client, router


async def admin(client: Client, method: str, path: str, status: int = 200) -> Any:
    resp = await client.request(method, path, headers=AUTH)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


async def run_cli(*argv: str) -> int:
    # The CLI runs its own event loop (asyncio.run): a worker thread keeps ours serving.
    return await asyncio.to_thread(cli.main, list(argv))


def url_of(client: Client) -> str:
    return str(client.make_url("/"))


# -- auth and probes -----------------------------------------------------------------------


async def test_admin_needs_the_token(sims: list[SimInstance], start_router: StartRouter) -> None:
    client, _ = await started(sims, start_router)
    for headers in (
        {},
        {"Authorization": "Bearer a-wrong-token-of-16-chars"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
    ):
        for method, path in (
            ("GET", "/admin/status"),
            ("POST", "/admin/sync"),
            ("GET", "/admin/x"),
        ):
            resp = await client.request(method, path, headers=headers)
            assert resp.status == 401, (headers, path)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
            assert (await resp.json())["error"] == "unauthorized"
    resp = await client.get("/admin/status", headers={"Authorization": "Bearer wrong-token-xx"})
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    # The scheme is case-insensitive (RFC 7235 2.1).
    resp = await client.get("/admin/status", headers={"Authorization": f"bearer {TOKEN}"})
    assert resp.status == 200
    # Unknown admin paths never reach the proxy; a known path with another method is a 405.
    assert (await admin(client, "GET", "/admin/nope", 404))["error"] == "not_found"
    resp = await client.get("/admin/sync", headers=AUTH)
    assert resp.status == 405 and resp.headers["Allow"] == "POST"
    resp = await client.put("/admin/sessions/abc", headers=AUTH)
    assert resp.status == 405 and resp.headers["Allow"] == "DELETE, GET"
    assert all(
        s.count() == s.count("GET", "/health") + s.count("GET", "/api/sessions") for s in sims
    )  # nothing of the above was forwarded


async def test_admin_off_without_a_token(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, _ = await started(sims, start_router, admin={})
    for method, path in (("GET", "/admin/status"), ("POST", "/admin/sync"), ("GET", "/admin/")):
        resp = await client.request(method, path, headers=AUTH)
        assert resp.status == 404
        assert await resp.json() == {
            "error": "admin_off",
            "message": "the admin API is off: set admin.token",
        }
    assert (await client.get("/healthz")).status == 200


async def test_a_control_path_asked_with_another_method_is_a_405(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, router = await started(sims, start_router)
    webhooks = router.config.webhooks.path
    for method, path, allow in (
        ("DELETE", "/metrics", "GET, HEAD"),
        ("POST", "/healthz", "GET, HEAD"),
        ("PUT", "/readyz", "GET, HEAD"),
        ("GET", webhooks, "POST"),
        ("GET", webhooks + "/", "POST"),  # another spelling of it, as Laravel routes it
    ):
        resp = await client.request(method, path)
        assert resp.status == 405, (method, path)
        assert resp.headers["Allow"] == allow
        body = await resp.json()
        assert body["error"] == "method_not_allowed" and body["allowed"] == allow.split(", ")
    assert (await client.get("/metrics")).status == 200
    assert all(
        s.count() == s.count("GET", "/health") + s.count("GET", "/api/sessions") for s in sims
    )  # none of them was forwarded


async def test_healthz_and_readyz(sims: list[SimInstance], start_router: StartRouter) -> None:
    client, router = await started(sims, start_router)
    resp = await client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "alive"}
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["status"] == "ready"
    assert (await client.head("/readyz")).status == 200
    router.warm = False
    resp = await client.get("/readyz")
    assert resp.status == 503 and (await resp.json())["reason"] == "warming up"
    router.warm = True
    for sim in sims:
        await sim.stop()
    await router.health.check_all()
    await router.health.check_all()
    resp = await client.get("/readyz")
    assert resp.status == 503 and (await resp.json())["reason"] == "no healthy instance"
    assert (await client.get("/healthz")).status == 200  # alive all the same


def test_readiness_policy() -> None:
    assert readiness(False, [State.HEALTHY]) == "warming up"
    assert readiness(True, [State.DOWN, State.SUSPECT]) == "no healthy instance"
    assert readiness(True, []) == "no healthy instance"
    assert readiness(True, [State.DOWN, State.HEALTHY]) is None


# -- status and sessions -------------------------------------------------------------------


async def test_status(sims: list[SimInstance], start_router: StartRouter) -> None:
    sims[0].add_session("a")
    client, router = await started(sims, start_router)
    await wait_for(
        lambda: all(i.last_check_at is not None for i in router.pool.instances),
        what="a health check of every instance",
    )
    assert (await client.post("/api/messages/send", json=send_body("a"))).status == 200
    doc = await admin(client, "GET", "/admin/status")
    assert [i["name"] for i in doc["instances"]] == ["node-0", "node-1", "node-2", "node-3"]
    first = doc["instances"][0]
    assert first["state"] == "healthy" and first["draining"] is False
    assert first["sessions"] == 1 and first["url"] == sims[0].url
    assert isinstance(first["latency_ms"], float) and isinstance(first["last_check_at"], float)
    assert [i["sessions"] for i in doc["instances"][1:]] == [0, 0, 0]
    assert doc["directory"]["size"] == 1
    assert doc["directory"]["cache_hits"] >= 1 and doc["directory"]["cache_hit_ratio"] > 0
    assert set(doc["discovery"]) == {"scans", "probes", "found", "not_found", "negative_hits"}
    assert doc["sync"]["summary"].startswith("Summary: 1 updated")
    assert doc["webhooks"]["backlog"] is None
    assert doc["ready"] is True

    text = render_status(doc, now=first["last_check_at"] + 3)
    lines = text.splitlines()
    assert lines[0].split() == [
        "instance", "state", "draining", "sessions", "latency", "ms", "last", "check", "age",
        "s", "last", "error",
    ]  # fmt: skip
    assert lines[1].split()[:4] == ["node-0", "healthy", "no", "1"]
    assert "directory: 1 sessions" in text and "ready: yes" in text

    assert await run_cli("status", "--url", url_of(client), "--token", TOKEN) == 0


async def test_status_cli_finds_the_router_from_the_config(
    sims: list[SimInstance],
    start_router: StartRouter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client, _ = await started(sims, start_router)
    assert client.server.port is not None
    conf = tmp_path / "router.yaml"
    conf.write_text(
        f"server: {{host: 0.0.0.0, port: {client.server.port}}}\n"
        f"admin: {{token: {TOKEN}}}\n"
        f"instances: [{{name: node-0, url: '{sims[0].url}'}}]\n"
    )
    assert await run_cli("status", "-c", str(conf)) == 0
    out = capsys.readouterr().out
    assert "node-3" in out and "ready: yes" in out
    # A wrong token: the router's JSON message on stderr, exit 3.
    assert await run_cli("status", "-c", str(conf), "--token", "x" * 16) == 3
    assert "401 unauthorized" in capsys.readouterr().err
    # Nobody there: exit 3. No config: exit 2.
    assert (
        await run_cli("status", "--url", f"http://127.0.0.1:{free_port()}", "--token", TOKEN) == 3
    )
    assert "cannot reach" in capsys.readouterr().err
    assert await run_cli("status", "-c", str(tmp_path / "missing.yaml")) == 2
    assert base_url("0.0.0.0", 8080) == "http://127.0.0.1:8080"
    assert base_url("::", 8080) == "http://[::1]:8080"


async def test_sessions_paging_and_filter(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    names = [f"s{i:02d}" for i in range(25)]
    for i, name in enumerate(names):
        sims[i % 4].add_session(name)
    client, _ = await started(sims, start_router)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = "/admin/sessions?limit=10" + (f"&cursor={cursor}" if cursor else "")
        doc = await admin(client, "GET", query)
        pages += 1
        seen += [s["session"] for s in doc["sessions"]]
        cursor = doc["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == names  # id order, no duplicates, nothing missing
    entry = (await admin(client, "GET", "/admin/sessions?limit=1"))["sessions"][0]
    assert entry == {
        "session": "s00",
        "instance": "node-0",
        "source": "sync",
        "observed_at": entry["observed_at"],
        "status": "connected",
    }
    doc = await admin(client, "GET", "/admin/sessions?instance=node-1&limit=4")
    assert [s["session"] for s in doc["sessions"]] == ["s01", "s05", "s09", "s13"]
    doc = await admin(client, "GET", f"/admin/sessions?instance=node-1&cursor={doc['next_cursor']}")
    assert [s["session"] for s in doc["sessions"]] == ["s17", "s21"]
    assert doc["next_cursor"] is None
    for bad in (
        "limit=0",
        "limit=1001",
        "limit=ten",
        "limit=%C2%B2",
        "instance=node-9",
        "cursor=%FF%FE",
    ):
        err = await admin(client, "GET", f"/admin/sessions?{bad}", 400)
        assert err["error"] == "bad_request", bad
    assert decode_cursor(encode_cursor("s-ü/1")) == "s-ü/1"


async def test_one_session_get_and_delete(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[2].add_session("one")
    client, router = await started(sims, start_router)
    doc = await admin(client, "GET", "/admin/sessions/one")
    assert doc["instance"] == "node-2" and doc["session"] == "one"
    assert (await admin(client, "GET", "/admin/sessions/nope", 404))["error"] == "session_not_found"
    assert (await admin(client, "GET", "/admin/sessions/bad..id", 400))["error"] == "bad_request"
    assert await admin(client, "DELETE", "/admin/sessions/one") == {
        "session": "one",
        "forgotten": True,
        "instance": "node-2",
    }
    assert await router.directory.lookup("one") is None
    await admin(client, "GET", "/admin/sessions/one", 404)
    assert (await admin(client, "DELETE", "/admin/sessions/one"))["forgotten"] is False


async def test_rediscover(sims: list[SimInstance], start_router: StartRouter) -> None:
    sims[0].add_session("m")
    client, router = await started(sims, start_router)
    assert (await router.directory.lookup("m")).instance == "node-0"  # type: ignore[union-attr]
    await sims[0].move_session("m", sims[1])
    doc = await admin(client, "POST", "/admin/sessions/m/rediscover")
    assert doc["instance"] == "node-1" and doc["previous"] == "node-0"
    assert doc["status"] == "connected" and "node-1" in doc["asked"]
    entry = await router.directory.store.get("m")
    assert entry is not None and entry.instance == "node-1"
    err = await admin(client, "POST", "/admin/sessions/nowhere/rediscover", 404)
    assert err["error"] == "session_not_found"
    assert sorted(err["asked"]) == ["node-0", "node-1", "node-2", "node-3"]
    # Asked again at once: a new scan, not the negative cache's answer.
    scans = router.discovery.stats.scans
    await admin(client, "POST", "/admin/sessions/nowhere/rediscover", 404)
    assert router.discovery.stats.scans == scans + 1


# -- drain ---------------------------------------------------------------------------------


async def test_drained_instance_gets_no_new_sessions_but_serves_its_own(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("old")
    client, router = await started(sims, start_router)
    assert await admin(client, "POST", "/admin/instances/node-0/drain") == {
        "instance": "node-0",
        "draining": True,
        "shared": True,
    }
    status = await admin(client, "GET", "/admin/status")
    assert status["instances"][0]["draining"] is True
    for i in range(3):
        body = {"session_id": f"new{i}", "workspace_id": 1, "api_key": API_KEY}
        assert (await client.post("/api/sessions", json=body)).status == 200
    assert not any(s.startswith("new") for s in sims[0].sessions)
    assert {s for sim in sims[1:] for s in sim.sessions} == {"new0", "new1", "new2"}
    assert (await client.post("/api/messages/send", json=send_body("old"))).status == 200
    assert sends(sims[0]) == 1
    undrained = await admin(client, "POST", "/admin/instances/node-0/undrain")
    assert undrained["draining"] is False
    body = {"session_id": "new3", "workspace_id": 1, "api_key": API_KEY}
    assert (await client.post("/api/sessions", json=body)).status == 200
    assert "new3" in sims[0].sessions  # 1 session each: the tie goes to node-0 again
    err = await admin(client, "POST", "/admin/instances/node-9/drain", 404)
    assert err["error"] == "instance_not_found"


async def test_an_instance_drained_in_the_file_starts_drained(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """`drain: true` in the config: drained from the start (in the store, so for every
    router sharing it); the admin API can still undrain it."""
    sims[0].add_session("old")
    cfg = pool_config(sims, upstream={"api_key": API_KEY}, admin={"token": TOKEN})
    first = dataclasses.replace(cfg.instances[0], drain=True)
    cfg = dataclasses.replace(cfg, instances=(first, *cfg.instances[1:]))
    client, router = await start_router(cfg)
    await wait_for(lambda: router.warm, what="the warm sync")
    status = await admin(client, "GET", "/admin/status")
    assert [i["draining"] for i in status["instances"]] == [True, False, False, False]
    assert await router.store.drained() == {"node-0"}
    body = {"session_id": "fresh", "workspace_id": 1, "api_key": API_KEY}
    assert (await client.post("/api/sessions", json=body)).status == 200
    assert "fresh" not in sims[0].sessions
    assert (await client.post("/api/messages/send", json=send_body("old"))).status == 200
    assert (await admin(client, "POST", "/admin/instances/node-0/undrain"))["draining"] is False


# -- sync ----------------------------------------------------------------------------------


async def test_sync_dry_run_changes_nothing_and_a_real_sync_fixes(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("m")
    client, router = await started(sims, start_router)
    await sims[0].move_session("m", sims[1])
    sims[2].add_session("fresh")
    last = router.syncer.last
    doc = await admin(client, "POST", "/admin/sync?dry_run=1")
    assert doc["dry_run"] is True and doc["ok"] is True
    assert doc["lines"] == [
        "Fixed: m (node-0 -> node-1)",
        "Learned: fresh (node-2)",
        "Summary: 2 updated, 0 verified, 0 lost, 0 duplicated (dry run)",
    ]
    assert (await router.directory.store.get("m")).instance == "node-0"  # type: ignore[union-attr]
    assert await router.directory.store.get("fresh") is None
    assert router.syncer.last is last
    await admin(client, "POST", "/admin/sync?dry_run=maybe", 400)
    doc = await admin(client, "POST", "/admin/sync")
    assert doc["lines"][-1] == "Summary: 2 updated, 0 verified, 0 lost, 0 duplicated"
    assert (await router.directory.store.get("m")).instance == "node-1"  # type: ignore[union-attr]
    assert (await router.directory.store.get("fresh")).instance == "node-2"  # type: ignore[union-attr]


async def test_sync_cli_reports_lost_and_duplicated_with_exit_1(
    sims: list[SimInstance], start_router: StartRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    sims[0].add_session("fine")
    sims[1].add_session("dup")
    sims[3].add_session("dup")
    client, router = await started(sims, start_router)
    await router.directory.observe("ghost", "node-0", Source.ADMIN)
    target = ["--url", url_of(client), "--token", TOKEN]

    assert await run_cli("sync", "--dry-run", *target) == 1
    out = capsys.readouterr().out.splitlines()
    assert "Lost: ghost (was node-0; on no instance: rescan the QR code)" in out
    assert any(
        re.fullmatch(r"Duplicated: dup \(kept node-[13]; also on node-[13]\)", x) for x in out
    )
    assert out[-1] == "Summary: 0 updated, 2 verified, 1 lost, 1 duplicated (dry run)"

    assert await run_cli("sync", *target) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        "Summary: 0 updated, 2 verified, 1 lost, 1 duplicated"
    )

    # Settled by hand: the duplicate logged out of one instance, the ghost forgotten.
    sims[3].remove_session("dup")
    await admin(client, "DELETE", "/admin/sessions/ghost")
    assert await run_cli("sync", *target) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("Summary: ") and out[-1].endswith(" 0 lost, 0 duplicated")


# -- the document --------------------------------------------------------------------------


def registered(app: web.Application) -> dict[str, set[str]]:
    """Path template -> methods of the operator routes the app really has."""
    out: dict[str, set[str]] = {}
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path == ADMIN_FALLBACK.replace(":.*", ""):
            continue  # the 404/405 fallback, not an endpoint
        if path in PAGE_FILES:
            # The status page's static files (HTML, script, style): not API endpoints (no
            # JSON, no token, nothing a client calls), so not in the document; they are
            # tested in test_statuspage.py.
            continue
        if route.method == "*":
            continue  # a path's other methods: its 405 (`admin.only`), not an endpoint
        if path.startswith("/admin/") or path in ("/healthz", "/readyz"):
            out.setdefault(path, set()).add(route.method)
    return out


def resolve(doc: dict[str, Any], node: Any) -> None:
    """Every $ref of the document points at something."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            target: Any = doc
            for part in ref.removeprefix("#/").split("/"):
                target = target[part]
        for value in node.values():
            resolve(doc, value)
    elif isinstance(node, list):
        for value in node:
            resolve(doc, value)


async def test_openapi_document_matches_the_routes(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, _ = await started(sims, start_router)
    assert (await client.get("/admin/openapi.json")).status == 401
    doc = await admin(client, "GET", "/admin/openapi.json")
    assert doc["openapi"] == "3.0.3"
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    documented = {
        path: {m.upper() for m in ops if m != "parameters"} for path, ops in doc["paths"].items()
    }
    assert documented == registered(client.app)
    assert "/admin/sessions/{session}" in documented  # aiohttp's placeholders are OpenAPI's
    resolve(doc, doc)
    params = doc["components"]["parameters"]
    for path, ops in doc["paths"].items():
        placeholders = set(re.findall(r"\{(\w+)\}", path))
        for method, op in ops.items():
            declared = [params[p["$ref"].rsplit("/", 1)[1]] for p in op.get("parameters", [])]
            in_path = {p["name"] for p in declared if p["in"] == "path"}
            assert in_path == placeholders, (path, method)
            assert "200" in op["responses"]
            public = op.get("security") == []
            assert public == (path in ("/healthz", "/readyz")), (path, method)
            assert ("401" in op["responses"]) != public
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(doc)


async def test_status_after_webhooks_shows_them_by_event(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, _ = await started(sims, start_router, webhooks={"secrets": ["whs"]})
    body, headers = signed_webhook("whs", "session_ready", {"session_id": "h1"}, sims[2].port)
    for _ in range(2):
        resp = await client.post("/api/whatsapp/webhooks/webjs", data=body, headers=headers)
        assert resp.status == 200
    doc = await admin(client, "GET", "/admin/status")
    assert doc["webhooks"]["events"] == {"session_ready": {"accepted": 1, "duplicate": 1}}
    assert doc["webhooks"]["learned"] == 1


async def test_sync_cli_exits_4_when_an_instance_could_not_be_listed(
    sims: list[SimInstance], start_router: StartRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    sims[0].add_session("fine")
    client, router = await started(sims, start_router)
    target = ["--url", url_of(client), "--token", TOKEN]
    assert await run_cli("sync", *target) == 0
    capsys.readouterr()
    await sims[2].stop()  # one instance refuses its listing: what it holds went unchecked
    assert await run_cli("sync", *target) == 4
    captured = capsys.readouterr()
    assert any(line.startswith("Error: node-2: ") for line in captured.out.splitlines())
    assert "sync incomplete: could not list node-2" in captured.err


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"wa-router {importlib.metadata.version('wa-router')}"
