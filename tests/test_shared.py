"""Several routers, one Redis directory: what one learns, the others route by at once."""

from __future__ import annotations

import asyncio

from wa_router.sim import SimInstance

from .conftest import StartRouter, pool_config, send_body, sends, signed_webhook, wait_until
from .redis_server import RedisServer, redis_server_fixture, unique_prefix

redis_server = redis_server_fixture()
SECRET = "shared-secret"


def shared_config(sims: list[SimInstance], url: str, prefix: str) -> object:
    return pool_config(
        sims,
        store={"kind": "redis", "redis_url": url, "key_prefix": prefix},
        webhooks={"secrets": [SECRET]},
        sync={"interval_s": 3600},
    )


async def test_a_move_learned_by_one_router_is_routed_by_the_other_without_a_scan(
    sims: list[SimInstance], start_router: StartRouter, redis_server: RedisServer
) -> None:
    cfg = shared_config(sims, redis_server.url, unique_prefix())
    a, ra = await start_router(cfg)  # type: ignore[arg-type]
    b, rb = await start_router(cfg)  # type: ignore[arg-type]
    sims[0].add_session("sh")
    assert (await a.post("/api/messages/send", json=send_body("sh"))).status == 200
    # B never saw the session: it reads A's discovery from the store, no scan of its own.
    assert (await b.post("/api/messages/send", json=send_body("sh"))).status == 200
    assert rb.discovery.stats.scans == 0 and rb.directory.stats.store_hits == 1
    # The session moves; only A hears the webhook. B's cached entry follows within ms.
    await sims[0].move_session("sh", sims[3])
    body, headers = signed_webhook(SECRET, "session_ready", {"session_id": "sh"}, sims[3].port)
    assert (await a.post("/api/whatsapp/webhooks/webjs", data=body, headers=headers)).status == 200

    async def b_knows() -> bool:
        entry = await rb.directory.lookup("sh")
        return entry is not None and entry.instance == "node-3"

    await wait_until(b_knows, what="B hearing of the move")
    assert (await b.post("/api/messages/send", json=send_body("sh"))).status == 200
    assert sends(sims[0]) == 2 and sends(sims[3]) == 1  # B went straight to node-3
    assert rb.discovery.stats.scans == 0


async def test_routing_goes_on_while_redis_is_down(
    sims: list[SimInstance], start_router: StartRouter, redis_server: RedisServer
) -> None:
    client, router = await start_router(shared_config(sims, redis_server.url, unique_prefix()))  # type: ignore[arg-type]
    sims[1].add_session("r1")
    sims[2].add_session("r2")
    assert (await client.post("/api/messages/send", json=send_body("r1"))).status == 200
    redis_server.stop()
    try:
        router.directory.invalidate("r1")  # force the store path
        assert (await client.post("/api/messages/send", json=send_body("r1"))).status == 200
        assert (await client.post("/api/messages/send", json=send_body("r2"))).status == 200
        assert router.directory.stats.store_errors >= 2
        # Served from the cache (and discovery) until Redis is back.
        assert (await client.post("/api/messages/send", json=send_body("r2"))).status == 200
    finally:
        redis_server.start()
    # Back (empty: no persistence): new facts are written to it again, those learned while
    # its breaker was still open included.
    sims[0].add_session("r3")
    assert (await client.post("/api/messages/send", json=send_body("r3"))).status == 200

    async def in_redis() -> bool:
        entry = await router.directory.store.get("r3")
        return entry is not None and entry.instance == "node-0"

    await wait_until(in_redis, what="r3 in Redis")


async def test_a_request_waiting_on_one_router_is_woken_by_a_webhook_at_the_other(
    sims: list[SimInstance], start_router: StartRouter, redis_server: RedisServer
) -> None:
    cfg = shared_config(sims, redis_server.url, unique_prefix())
    a, ra = await start_router(cfg)  # type: ignore[arg-type]
    b, rb = await start_router(cfg)  # type: ignore[arg-type]
    sims[0].add_session("pk")
    assert (await a.post("/api/messages/send", json=send_body("pk"))).status == 200
    await sims[0].stop()  # its owner crashes: A's next request for it waits
    waiting = asyncio.create_task(a.post("/api/messages/send", json=send_body("pk")))
    deadline = asyncio.get_running_loop().time() + 5
    while ra.parking.parked != 1:
        assert asyncio.get_running_loop().time() < deadline, "the request never waited"
        assert not waiting.done(), await (await waiting).text()
        await asyncio.sleep(0.005)
    # It is back on node-2; only B hears its session_ready. Redis tells A, A's request goes.
    sims[2].add_session("pk")
    body, headers = signed_webhook(
        SECRET, "session_ready", {"session_id": "pk", "status": "connected"}, sims[2].port
    )
    assert (await b.post("/api/whatsapp/webhooks/webjs", data=body, headers=headers)).status == 200
    resp = await asyncio.wait_for(waiting, 5)
    assert resp.status == 200, await resp.text()
    assert sends(sims[2]) == 1
    assert ra.parking.stats.outcomes["woken"] == 1


async def test_a_hung_redis_holds_no_request_and_no_webhook(
    sims: list[SimInstance], start_router: StartRouter, redis_server: RedisServer
) -> None:
    import aiohttp

    from .conftest import signed_webhook as hook

    client, router = await start_router(shared_config(sims, redis_server.url, unique_prefix()))  # type: ignore[arg-type]
    sims[1].add_session("h1")
    sims[2].add_session("h2")
    for s in ("h1", "h2"):
        assert (await client.post("/api/messages/send", json=send_body(s))).status == 200
    redis_server.pause()
    try:
        router.directory.invalidate("h2")  # h2 must come from the store: it hangs
        # Laravel's send timeout is 30 s and Node's webhook one 5 s; here a second each is
        # plenty: the store gets 0.25 s, then the cache and discovery answer.
        quick = aiohttp.ClientTimeout(total=1.0)
        for s in ("h1", "h2"):
            resp = await client.post("/api/messages/send", json=send_body(s), timeout=quick)
            assert resp.status == 200, await resp.text()
        sims[3].add_session("h3")
        body, headers = hook(SECRET, "session_ready", {"session_id": "h3"}, sims[3].port)
        resp = await client.post(
            "/api/whatsapp/webhooks/webjs", data=body, headers=headers, timeout=quick
        )
        assert resp.status == 200, await resp.text()
        resp = await client.post("/api/messages/send", json=send_body("h3"), timeout=quick)
        assert resp.status == 200 and sends(sims[3]) == 1  # learned, though Redis is away
        assert router.directory.stats.store_errors >= 1
    finally:
        redis_server.resume()

    # Once Redis answers again, what it missed is written back.
    async def in_redis() -> bool:
        entry = await router.directory.store.get("h3")
        return entry is not None and entry.instance == "node-3"

    await wait_until(in_redis, what="h3 in Redis")
