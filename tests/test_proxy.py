"""The request path end to end: router on loopback, simulated Blazz instances behind it."""

from __future__ import annotations

import asyncio
from typing import Any

from multidict import CIMultiDict

from wa_router.sim import SimInstance

from .conftest import (
    API_KEY,
    StartRouter,
    caller_traffic,
    pool_config,
    probes,
    send_body,
    sends,
    wait_for,
)


async def test_200_requests_reach_the_owner(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    owner = {}
    for i in range(40):
        sim = sims[i % 4]
        sim.add_session(f"s{i}")
        owner[f"s{i}"] = sim
    client, router = await start_router(pool_config(sims))
    for n in range(200):
        session = f"s{n % 40}"
        resp = await client.post("/api/messages/send", json=send_body(session))
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["message_id"]
    for sim in sims:
        assert sends(sim) == 50  # 10 sessions x 5 sends each, none misdirected
    # Each session was looked for once (cold directory), then served from the cache.
    assert router.discovery.stats.scans == 40
    assert router.directory.stats.cache_hits == 160


async def test_stopped_instance_sessions_found_again_with_one_rediscovery_each(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    moved = [f"m{i}" for i in range(6)]
    for s in moved:
        sims[0].add_session(s)
    client, router = await start_router(pool_config(sims))
    for s in moved:
        assert (await client.post("/api/messages/send", json=send_body(s))).status == 200
    scans_before = router.discovery.stats.scans
    await sims[0].stop()  # crash
    for i, s in enumerate(moved):  # the sessions come back up on the other instances
        sims[1 + i % 3].add_session(s)
    for sim in sims[1:]:
        sim.reset_counters()
    for s in moved:
        resp = await client.post("/api/messages/send", json=send_body(s))
        assert resp.status == 200, await resp.text()
    assert router.discovery.stats.scans - scans_before == len(moved)
    # The dead instance is suspect: later scans do not wait on it; and the next requests
    # go straight to the new owners.
    for s in moved:
        assert (await client.post("/api/messages/send", json=send_body(s))).status == 200
    assert router.discovery.stats.scans - scans_before == len(moved)
    assert sum(sends(sim) for sim in sims[1:]) == 2 * len(moved)
    for i, s in enumerate(moved):
        assert sum(probes(sim, s) for sim in sims[1:]) == 3  # one probe per live instance
        assert (await router.directory.lookup(s)).instance == sims[1 + i % 3].name  # type: ignore[union-attr]


async def test_herd_of_100_requests_for_a_moved_session_makes_one_scan(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("herd")
    client, router = await start_router(pool_config(sims))
    assert (await client.post("/api/messages/send", json=send_body("herd"))).status == 200
    await sims[0].move_session("herd", sims[2])  # sims[0] still up: answers Session not found
    for sim in sims:
        sim.reset_counters()
    scans = router.discovery.stats.scans
    resps = await asyncio.gather(
        *(client.post("/api/messages/send", json=send_body("herd")) for _ in range(100))
    )
    assert [r.status for r in resps] == [200] * 100
    assert router.discovery.stats.scans - scans == 1
    assert [probes(sim, "herd") for sim in sims] == [1, 1, 1, 1]
    assert sends(sims[2]) == 100


async def test_post_that_timed_out_after_sending_is_not_resent(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    from .conftest import with_rule_timeout

    sims[0].add_session("slow")
    sims[0].route_delay_s = {"/api/messages/send": 2.0}
    client, _ = await start_router(with_rule_timeout(pool_config(sims), "messages_send", 0.3))
    resp = await client.post("/api/messages/send", json=send_body("slow"))
    assert resp.status == 504
    body = await resp.json()
    assert body["error"] == "upstream_timeout" and body["retried"] is False
    assert body["session"] == "slow" and body["instance"] == "node-0"
    assert [sends(s) for s in sims] == [1, 0, 0, 0]
    # With an Idempotency-Key the caller says a second delivery is harmless: sent once more.
    resp = await client.post(
        "/api/messages/send", json=send_body("slow"), headers={"Idempotency-Key": "k-1"}
    )
    assert resp.status == 504 and (await resp.json())["retried"] is True
    assert [sends(s) for s in sims] == [3, 0, 0, 0]


async def test_post_cut_off_mid_request_is_not_resent_but_get_is(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("cut")
    client, _ = await start_router(pool_config(sims))
    assert (await client.post("/api/messages/send", json=send_body("cut"))).status == 200
    sims[1].add_session("cut")  # also up elsewhere: a retry would succeed there
    sims[0].hang = True
    task = asyncio.ensure_future(client.post("/api/messages/send", json=send_body("cut")))
    await wait_for(lambda: sends(sims[0]) == 2, what="the send reached node-0")
    await sims[0].stop()
    resp = await task
    assert resp.status == 502
    body = await resp.json()
    assert (body["error"], body["retried"]) == ("upstream_unreachable", False)
    assert "may have been processed" in body["message"]
    assert sends(sims[1]) == 0
    # A GET may be asked again: it is, on the instance that has the session now.
    sims[2].add_session("cut2")
    assert (await client.get(f"/api/sessions/cut2/status?api_key={API_KEY}")).status == 200
    sims[3].add_session("cut2")
    sims[2].hang = True
    task2 = asyncio.ensure_future(client.get(f"/api/sessions/cut2/status?api_key={API_KEY}"))
    await wait_for(lambda: probes(sims[2], "cut2") >= 2, what="the GET reached node-2")
    await sims[2].stop()
    resp = await task2
    assert resp.status == 200 and (await resp.json())["session_id"] == "cut2"
    assert probes(sims[3], "cut2") >= 1


async def test_refused_connect_is_retried_on_the_new_owner_whatever_the_method(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[3].add_session("r1")
    client, router = await start_router(pool_config(sims))
    assert (await client.post("/api/messages/send", json=send_body("r1"))).status == 200
    await sims[3].stop()
    sims[0].add_session("r1")
    resp = await client.post("/api/messages/send", json=send_body("r1"))
    assert resp.status == 200
    assert sends(sims[0]) == 1
    assert router.pool.get("node-3").state.value == "suspect"  # type: ignore[union-attr]


async def test_session_nowhere_is_404_naming_the_instances_asked(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, router = await start_router(pool_config(sims))
    resp = await client.get(f"/api/sessions/ghost/status?api_key={API_KEY}")
    assert resp.status == 404
    body = await resp.json()
    assert body["error"] == "session_not_found" and body["session"] == "ghost"
    assert sorted(body["asked"]) == ["node-0", "node-1", "node-2", "node-3"]
    # The negative cache answers the next ones without asking anybody.
    resp = await client.post("/api/messages/send", json=send_body("ghost"))
    assert resp.status == 404
    assert sum(probes(s, "ghost") for s in sims) == 4
    assert router.discovery.stats.negative_hits == 1


async def test_all_instances_down_is_503(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, _ = await start_router(pool_config(sims))
    for sim in sims:
        await sim.stop()
    for _ in range(2):  # first with every connect refused, then with all suspect
        resp = await client.post("/api/messages/send", json=send_body("s1"))
        assert resp.status == 503
        assert (await resp.json())["error"] == "no_healthy_instance"


async def test_bad_requests_get_json_errors_and_are_never_forwarded(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, _ = await start_router(pool_config(sims, limits={"max_body_bytes": 1024}))
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("GET", "/api/sessions/..%2Fhealth/status", {}, 400, "bad_request"),
        ("GET", "/api/sessions/a%2Fb/status", {}, 400, "bad_request"),
        ("GET", "/api/sessions/" + "x" * 200 + "/status", {}, 400, "bad_request"),
        ("POST", "/api/messages/send", {"data": b"not json"}, 400, "bad_request"),
        ("POST", "/api/messages/send", {"json": {"message": "no session"}}, 400, "bad_request"),
        ("POST", "/api/messages/send", {"json": ["list"]}, 400, "bad_request"),
        ("GET", "/not/a/route", {}, 400, "bad_request"),
        ("PATCH", "/health", {}, 400, "bad_request"),
        (
            "POST",
            "/api/messages/send",
            {"json": send_body("s1", "x" * 2000)},
            413,
            "payload_too_large",
        ),
    ]
    for method, path, kw, status, code in cases:
        resp = await client.request(method, path, **kw)
        assert resp.status == status, (path, await resp.text())
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert body["error"] == code and body["message"], body
    # A chunked body (no Content-Length) over the limit is cut off just as well.

    async def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 200

    resp = await client.post("/api/messages/send", data=chunks())
    assert resp.status == 413
    assert sum(caller_traffic(s) for s in sims) == 0


async def test_create_places_on_least_loaded_or_goes_to_the_live_owner(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, router = await start_router(pool_config(sims))
    # Known load: 2, 1, 0, 1 sessions.
    for name, sim in (("a", 0), ("b", 0), ("c", 1), ("d", 3)):
        sims[sim].add_session(name)
        assert (await client.post("/api/messages/send", json=send_body(name))).status == 200
    resp = await client.post(
        "/api/sessions", json={"session_id": "new1", "workspace_id": 1, "api_key": API_KEY}
    )
    assert resp.status == 200 and (await resp.json())["status"] == "qr_scanning"
    assert "new1" in sims[2].sessions
    # Already live on node-1 but unknown to the router: the create goes there, not to a
    # second instance.
    sims[1].add_session("old1")
    resp = await client.post(
        "/api/sessions", json={"session_id": "old1", "workspace_id": 1, "api_key": API_KEY}
    )
    assert resp.status == 200
    assert [s.count("POST", "/api/sessions") for s in sims] == [0, 1, 1, 0]
    # Known to the router: the create goes to the owner without asking anyone.
    scans = router.discovery.stats.scans
    resp = await client.post(
        "/api/sessions", json={"session_id": "a", "workspace_id": 1, "api_key": API_KEY}
    )
    assert resp.status == 200 and sims[0].count("POST", "/api/sessions") == 1
    assert router.discovery.stats.scans == scans
    await wait_for(lambda: sims[2].sessions["new1"].status == "connected")
    assert (await client.post("/api/messages/send", json=send_body("new1"))).status == 200


async def test_failed_create_does_not_keep_its_placement(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, router = await start_router(pool_config(sims))
    resp = await client.post("/api/sessions", json={"session_id": "n", "api_key": "wrong"})
    assert resp.status == 401
    assert await router.directory.lookup("n") is None


async def test_pool_health_and_merged_session_list(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("x1")
    sims[2].add_session("x2", status="qr_scanning")
    client, _ = await start_router(pool_config(sims))
    resp = await client.get("/health")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "healthy"
    assert body["healthy_instances"] == 4 and body["sessions"]["total"] == 2
    resp = await client.get(f"/api/sessions?api_key={API_KEY}")
    body = await resp.json()
    assert resp.status == 200 and body["total"] == 2
    assert {(s["session_id"], s["instance"]) for s in body["sessions"]} == {
        ("x1", "node-0"),
        ("x2", "node-2"),
    }
    resp = await client.get("/api/sessions?api_key=wrong")
    assert resp.status == 401 and (await resp.json())["error"] == "Invalid API key"
    resp = await client.get("/health/ready")
    assert resp.status == 200
    await sims[1].stop()
    body = await (await client.get("/health")).json()
    assert body["status"] == "degraded" and body["instances"]["node-1"]["healthy"] is False
    for sim in sims:
        sim.unhealthy = True
    resp = await client.get("/health")
    assert resp.status == 503 and (await resp.json())["status"] == "unhealthy"


async def test_upstream_key_is_injected_only_for_client_keys(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[1].add_session("k1")
    client, _ = await start_router(
        pool_config(sims, upstream={"api_key": API_KEY, "client_keys": ["laravel-key"]})
    )
    body = send_body("k1")
    del body["api_key"]
    resp = await client.post("/api/messages/send", json=body, headers={"X-Api-Key": "laravel-key"})
    assert resp.status == 200, await resp.text()
    seen = [r for r in sims[1].received if r.path == "/api/messages/send"][-1]
    assert seen.json["api_key"] == API_KEY and "X-Api-Key" not in seen.headers
    resp = await client.get("/api/sessions/k1/status", headers={"X-Api-Key": "laravel-key"})
    assert resp.status == 200
    # Not a client key: nothing is added; the router's key is not used to look for it either.
    resp = await client.post("/api/messages/send", json=body, headers={"X-Api-Key": "guess"})
    assert resp.status == 401
    resp = await client.get("/api/sessions/k1/status")
    assert resp.status == 401
    resp = await client.get("/api/sessions/other/status")  # unknown session, no key
    assert resp.status == 401
    assert (await resp.json())["error"] == "unauthorized"


async def test_connected_outranks_qr_scanning_and_slow_instances_are_not_waited_for(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, router = await start_router(pool_config(sims, discovery={"probe_timeout_s": 0.3}))
    # Two instances restoring one session at once: the connected one is the owner.
    sims[0].add_session("dup", status="qr_scanning")
    sims[3].add_session("dup", status="connected")
    sims[1].hang = True  # a stuck instance must not hold the scan up
    resp = await client.post("/api/messages/send", json=send_body("dup"))
    assert resp.status == 200
    assert sends(sims[3]) == 1 and sends(sims[0]) == 0
    assert (await router.directory.lookup("dup")).instance == "node-3"  # type: ignore[union-attr]
    # Only a weaker owner answers: it wins once the others have answered or timed out.
    sims[2].add_session("login", status="qr_scanning")
    resp = await client.get(f"/api/sessions/login/status?api_key={API_KEY}")
    assert resp.status == 200 and (await resp.json())["status"] == "qr_scanning"
    assert (await router.directory.lookup("login")).instance == "node-2"  # type: ignore[union-attr]


async def test_logs_carry_no_message_text_phone_or_key(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    import io

    import structlog

    from wa_router.config import LogConfig
    from wa_router.logging import setup_logging

    buf = io.StringIO()
    setup_logging(LogConfig(level="debug", format="json"), stream=buf)
    try:
        sims[0].add_session("quiet")
        client, _ = await start_router(pool_config(sims))
        secret_text = "the-secret-message-text"
        body = send_body("quiet", secret_text)
        assert (await client.post("/api/messages/send", json=body)).status == 200
        await sims[0].stop()
        # Its owner is down: it would wait for it; the log is what is looked at here.
        resp = await client.post("/api/messages/send", json=body, headers={"Prefer": "wait=0"})
        assert resp.status == 503
        await client.get(f"/api/sessions/nope/status?api_key={API_KEY}")
        out = buf.getvalue()
        assert "session_rediscovered" in out and "upstream_failed" in out
        for secret in (secret_text, API_KEY, "628123456789"):
            assert secret not in out
    finally:
        structlog.reset_defaults()


async def test_a_wait_preference_on_a_second_prefer_line_is_heard(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """`Prefer: handling=strict` then `Prefer: wait=0`: one field in two lines (RFC 9110
    5.3). The caller that said not to wait gets its 503 at once (once, only the first line
    was read, and it waited the whole parking time)."""
    sims[0].add_session("quiet")
    client, _ = await start_router(pool_config(sims))
    body = send_body("quiet")
    assert (await client.post("/api/messages/send", json=body)).status == 200
    await sims[0].stop()  # its owner is down: it would wait for it
    prefer = CIMultiDict([("Prefer", "handling=strict"), ("Prefer", "wait=0")])
    resp = await client.post("/api/messages/send", json=body, headers=prefer)
    doc = await resp.json()
    assert resp.status == 503 and "Prefer: wait=0" in doc["message"], doc


async def test_log_lines_carry_the_request_id(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    import io
    import json as jsonlib

    import structlog

    from wa_router.config import LogConfig
    from wa_router.logging import setup_logging

    buf = io.StringIO()
    setup_logging(LogConfig(level="info", format="json"), stream=buf)
    try:
        sims[1].add_session("rid")
        client, _ = await start_router(pool_config(sims, sync={"interval_s": 3600}))
        await client.post(
            "/api/messages/send", json=send_body("rid"), headers={"X-Request-Id": "req-42"}
        )
        await client.post("/api/messages/send", json=send_body("nobody"))
        lines = [jsonlib.loads(line) for line in buf.getvalue().splitlines()]
        found = [x for x in lines if x["event"] == "session_rediscovered"]
        assert found and found[0]["request_id"] == "req-42"
        missing = [x for x in lines if x["event"] == "session_not_found"]
        assert missing and missing[0]["request_id"] not in ("req-42", "")
        assert not [x for x in lines if x["event"] == "sync_done" and "request_id" in x]
    finally:
        structlog.reset_defaults()


async def test_a_live_session_on_a_suspect_instance_is_still_served(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("sus")
    client, router = await start_router(pool_config(sims, sync={"interval_s": 3600}))
    assert (await client.post("/api/messages/send", json=send_body("sus"))).status == 200
    inst = router.pool.get("node-0")
    assert inst is not None
    router.pool.mark_suspect(inst, "one dropped connect")  # a blip, not a crash
    resp = await client.post("/api/messages/send", json=send_body("sus"))
    assert resp.status == 200, await resp.text()
    assert sends(sims[0]) == 2 and inst.state.value == "healthy"
    # And a session nowhere while an instance is suspect is not remembered as nowhere:
    # the suspect instance may have it.
    router.pool.mark_suspect(inst, "another blip")
    resp = await client.get(f"/api/sessions/gone/status?api_key={API_KEY}")
    body = await resp.json()
    assert resp.status == 404 and body["unreachable"] == ["node-0"]
    sims[0].add_session("gone")
    router.pool.mark_healthy(inst)
    assert (await client.get(f"/api/sessions/gone/status?api_key={API_KEY}")).status == 200
