"""/metrics: parses with prometheus-client's own parser, and counts what was sent."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from wa_router.sim import SimInstance

from .conftest import API_KEY, StartRouter, pool_config, send_body, signed_webhook, wait_for


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(
    m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_the_traffic_sent(
    sims: list[SimInstance], start_router: StartRouter, tmp_path: object
) -> None:
    sims[0].add_session("m1")
    sims[1].add_session("m2")
    client, router = await start_router(
        pool_config(
            sims,
            sync={"interval_s": 3600},
            webhooks={"secrets": ["s3cret"]},
            upstream={"api_key": API_KEY},
        )
    )
    await wait_for(lambda: router.warm)
    for _ in range(7):
        assert (await client.post("/api/messages/send", json=send_body("m1"))).status == 200
    for _ in range(3):
        assert (await client.get(f"/api/sessions/m2/status?api_key={API_KEY}")).status == 200
    assert (await client.get(f"/api/sessions/none/status?api_key={API_KEY}")).status == 404
    assert (await client.get("/nope")).status == 400
    await sims[0].move_session("m1", sims[2])
    assert (await client.post("/api/messages/send", json=send_body("m1"))).status == 200
    body, hook = signed_webhook("s3cret", "session_ready", {"session_id": "m9"}, sims[3].port)
    assert (
        await client.post("/api/whatsapp/webhooks/webjs", data=body, headers=hook)
    ).status == 200
    assert (
        await client.post("/api/whatsapp/webhooks/webjs", data=body, headers=hook)
    ).status == 200

    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type.startswith("text/plain")
    m = samples(await resp.text())
    req = "wa_router_requests_total"
    assert value(m, req, route_kind="session", upstream="node-0", status_class="2xx") == 7
    assert value(m, req, route_kind="session", upstream="node-1", status_class="2xx") == 3
    assert value(m, req, route_kind="session", upstream="node-2", status_class="2xx") == 1
    assert value(m, req, route_kind="session", upstream="none", status_class="4xx") == 1
    assert value(m, req, route_kind="rejected", upstream="none", status_class="4xx") == 1
    assert value(m, "wa_router_retries_total", outcome="answered") == 1
    assert value(m, "wa_router_rediscoveries_total", outcome="found") == 1  # m1 after its move
    assert value(m, "wa_router_rediscoveries_total", outcome="not_found") == 1
    # m1, m2 learned by the warm sync; 7 + 3 + 1 lookups, one of them after the cache was
    # invalidated by the move.
    assert value(m, "wa_router_directory_lookups_total", tier="cache", result="hit") >= 9
    lat = value(m, "wa_router_upstream_latency_seconds_count", upstream="node-0")
    assert lat == 8  # 7 sends + the one that said "not here" after the move
    assert value(m, "wa_router_instance_up", upstream="node-3") == 1
    assert value(m, "wa_router_instance_sessions", upstream="node-2") == 1
    assert value(m, "wa_router_webhooks_total", event="session_ready", result="accepted") == 1
    assert value(m, "wa_router_webhooks_total", event="session_ready", result="duplicate") == 1
    assert value(m, "wa_router_instance_sessions", upstream="node-3") == 1  # m9, learned
    # The caller's side, by route kind: every request, rejected ones included.
    dur = "wa_router_request_duration_seconds_count"
    assert value(m, dur, route_kind="session") == 12 and value(m, dur, route_kind="rejected") == 1
    assert value(m, "wa_router_requests_in_flight") == 0
    (build,) = [k for k in m if k[0] == "wa_router_build_info"]
    assert dict(build[1])["version"] and m[build] == 1
    # No label a scrape would rename: Prometheus adds `instance` to every series itself.
    assert not any(dict(labels).get("instance") for _, labels in m)
    # A request held at Node is in flight.
    sims[2].route_delay_s = {"/api/messages/send": 1.0}
    slow = asyncio.ensure_future(client.post("/api/messages/send", json=send_body("m1")))
    await wait_for(lambda: sims[2].count("POST", "/api/messages/send") == 2, 5, "the slow send")
    m = samples(await (await client.get("/metrics")).text())
    assert value(m, "wa_router_requests_in_flight") == 1
    assert (await slow).status == 200


async def test_metrics_can_ask_for_a_token(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, _ = await start_router(pool_config(sims, metrics={"token": "a-scrape-token-16+"}))
    assert (await client.get("/metrics")).status == 401
    resp = await client.get("/metrics", headers={"Authorization": "Bearer wrong-token-16-chars"})
    assert resp.status == 401 and (await resp.json())["error"] == "unauthorized"
    resp = await client.get("/metrics", headers={"Authorization": "Bearer a-scrape-token-16+"})
    assert resp.status == 200 and "wa_router_build_info" in await resp.text()


async def test_metrics_show_an_instance_down_and_the_backlog(
    sims: list[SimInstance], start_router: StartRouter, tmp_path: object
) -> None:
    client, router = await start_router(
        pool_config(
            sims,
            health={"interval_s": 0.05},
            state={"dir": str(tmp_path)},
            webhooks={"secrets": ["s"], "laravel_url": "http://127.0.0.1:9"},
        )
    )
    await sims[1].stop()
    inst = router.pool.get("node-1")
    await wait_for(lambda: inst is not None and inst.state.value == "down")
    m = samples(await (await client.get("/metrics")).text())
    assert value(m, "wa_router_instance_up", upstream="node-1") == 0
    assert value(m, "wa_router_instance_state", upstream="node-1", state="down") == 1
    assert value(m, "wa_router_webhook_backlog") == 0
