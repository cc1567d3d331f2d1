"""Requests that wait for their session, and the true owner during restore races: the
router on loopback in front of simulated instances (parking, status-aware ownership,
"not connected" is not processed, errors that say what is true)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from wa_router.app import Router
from wa_router.config import Config
from wa_router.sim import SimInstance

from .conftest import (
    API_KEY,
    UPSTREAM_CLIENT,
    StartRouter,
    free_port,
    pool_config,
    send_body,
    sends,
    signed_webhook,
    wait_for,
)

SECRET = "wait-secret"
HOOK = "/api/whatsapp/webhooks/webjs"
Client = TestClient[web.Request, web.Application]


def cfg(sims: list[SimInstance], **sections: Any) -> Config:
    sections.setdefault("webhooks", {"secrets": [SECRET]})
    sections.setdefault("upstream", {"api_key": API_KEY})  # the warm sync lists sessions
    sections.setdefault("sync", {"interval_s": 3600})
    sections.setdefault("health", {"interval_s": 0.1, "down_interval_s": 0.05, "timeout_s": 0.3})
    return pool_config(sims, **sections)


async def warm(start_router: StartRouter, config: Config) -> tuple[Client, Router]:
    client, router = await start_router(config)
    await wait_for(lambda: router.warm, what="the warm sync")
    return client, router


async def hook(client: Client, sim: SimInstance, event: str, session: str, **data: Any) -> None:
    body, headers = signed_webhook(
        SECRET, event, {"session_id": session, "workspace_id": 1, **data}, sim.port
    )
    resp = await client.post(HOOK, data=body, headers=headers)
    assert resp.status == 200, await resp.text()


async def send(client: Client, session: str, **headers: str) -> tuple[int, dict[str, Any], Any]:
    resp = await client.post("/api/messages/send", json=send_body(session), headers=headers)
    return resp.status, await resp.json(), resp.headers


async def test_not_connected_is_not_processed_and_goes_to_the_connected_owner(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("s1")
    client, router = await warm(start_router, cfg(sims))
    # node-0 restarts its login of s1 (restoring); s1 is connected on node-1 meanwhile.
    sims[0].sessions["s1"].status = "authenticated"
    sims[1].add_session("s1")
    status, doc, _ = await send(client, "s1")
    assert status == 200, doc
    assert [sends(s) for s in sims] == [1, 1, 0, 0]  # refused unsent at node-0, sent once
    entry = await router.directory.lookup("s1")
    assert entry is not None and entry.instance == "node-1" and entry.connected


async def test_a_restorer_claim_does_not_take_a_connected_session(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("s1")
    client, router = await warm(start_router, cfg(sims))
    # node-1 restarted and restores every active account: it logs s1 in too.
    sims[1].add_session("s1", status="authenticated")
    await hook(client, sims[1], "session_authenticated", "s1")
    report = await router.syncer.run(only=router.pool.get("node-1"))
    assert report.restoring == [("s1", "node-1")] and report.fixed == []
    for _ in range(5):
        assert (await send(client, "s1"))[0] == 200
    assert [sends(s) for s in sims] == [5, 0, 0, 0]  # never to the one logging in
    assert router.directory.candidate("s1") is not None
    # It finishes logging in: the most recent session_ready wins, as in the real pool.
    sims[1].sessions["s1"].status = "connected"
    await hook(client, sims[1], "session_ready", "s1", status="connected")
    assert (await send(client, "s1"))[0] == 200
    assert [sends(s) for s in sims] == [5, 1, 0, 0]


async def test_requests_for_a_down_owner_wait_and_go_when_its_session_is_ready(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[2].add_session("s1")
    client, router = await warm(start_router, cfg(sims))
    await sims[2].stop()  # crash
    inst = router.pool.get("node-2")
    assert inst is not None
    waiting = [asyncio.create_task(send(client, "s1")) for _ in range(5)]
    await wait_for(lambda: router.parking.parked == 5, what="5 parked requests")
    assert not any(t.done() for t in waiting)
    await sims[2].start()  # it restores s1: logging in first, then connected
    sims[2].add_session("s1", status="authenticated")
    await hook(client, sims[2], "session_authenticated", "s1")
    assert router.parking.parked == 5  # authenticated cannot send: still waiting
    sims[2].sessions["s1"].status = "connected"
    woken_at = time.monotonic()
    await hook(client, sims[2], "session_ready", "s1", status="connected")
    results = await asyncio.gather(*waiting)
    assert [r[0] for r in results] == [200] * 5, results
    assert sends(sims[2]) == 5
    assert router.parking.stats.outcomes["woken"] == 5
    assert time.monotonic() - woken_at < 5  # woken by the webhook, not by their deadline


async def test_without_webhooks_the_watcher_finds_the_session_back(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[1].add_session("s1")
    client, router = await warm(start_router, cfg(sims, webhooks={}))
    await sims[1].stop()
    waiting = asyncio.create_task(send(client, "s1"))
    await wait_for(lambda: router.parking.parked == 1, what="parked")
    sims[3].add_session("s1")  # back on another instance, silently
    status, doc, _ = await waiting
    assert status == 200, doc
    assert sends(sims[3]) == 1


async def test_a_stopped_or_slow_owner_is_503_naming_it_never_404(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("stopped")
    sims[1].add_session("slow")
    client, router = await warm(start_router, cfg(sims, parking={"max_wait_s": 0.3}))
    sims[0].hang = True  # SIGSTOP: accepts, never answers
    sims[1].delay_s = 2.0  # alive but slower than every timeout
    for name in ("node-0", "node-1"):
        inst = router.pool.get(name)
        assert inst is not None
        await wait_for(lambda i=inst: i.state.value == "down", what=f"{name} down")  # type: ignore[misc]
    for session, owner in (("stopped", "node-0"), ("slow", "node-1")):
        status, doc, headers = await send(client, session)
        assert status == 503, doc
        assert doc["error"] == "session_unavailable" and doc["reason"] == "timeout"
        assert doc["owner"] == owner and doc["owner_state"] == "down"
        assert doc["session"] == session and doc["waited_s"] >= 0.25
        assert headers["Retry-After"] == str(doc["retry_after_s"])
    assert [sends(s) for s in sims] == [0, 0, 0, 0]


async def test_a_session_nobody_knows_is_a_404_at_once(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    client, router = await warm(start_router, cfg(sims))
    status, doc, _ = await send(client, "nobody")
    assert status == 404 and doc["error"] == "session_not_found"
    assert sorted(doc["asked"]) == [s.name for s in sims]
    assert router.parking.stats.outcomes.total() == 0  # never parked


async def test_prefer_wait_0_answers_at_once_and_wait_n_bounds_the_wait(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("s1")
    client, router = await warm(start_router, cfg(sims))
    await sims[0].stop()
    status, doc, headers = await send(client, "s1", Prefer="wait=0")
    assert status == 503 and doc["reason"] == "no_wait" and "Retry-After" in headers
    assert router.parking.stats.outcomes.total() == 0
    status, doc, _ = await send(client, "s1", Prefer="wait=1")
    assert status == 503 and doc["reason"] == "timeout"
    assert 0.9 <= doc["waited_s"] < 20.0  # its own wait (from arrival), not the 20 s
    assert doc["owner"] == "node-0"


async def test_caps_answer_503_with_retry_after(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("s1")
    config = cfg(sims, parking={"max_per_session": 2, "max_total": 3, "retry_after_s": 7})
    client, router = await warm(start_router, config)
    await sims[0].stop()
    waiting = [asyncio.create_task(send(client, "s1")) for _ in range(2)]
    await wait_for(lambda: router.parking.parked == 2)
    status, doc, headers = await send(client, "s1")
    assert (status, doc["reason"], headers["Retry-After"]) == (503, "full", "7")
    await sims[0].start()
    sims[0].add_session("s1")
    await hook(client, sims[0], "session_ready", "s1", status="connected")
    assert [r[0] for r in await asyncio.gather(*waiting)] == [200, 200]


async def test_a_post_that_may_have_been_processed_is_never_parked_or_resent(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    from .conftest import with_rule_timeout

    sims[0].add_session("s1")
    sims[1].add_session("s2")
    client, router = await warm(start_router, with_rule_timeout(cfg(sims), "messages_send", 0.3))
    # Timed out after sending: 504, not re-sent.
    sims[0].route_delay_s = {"/api/messages/send": 1.0}
    status, doc, _ = await send(client, "s1")
    assert (status, doc["error"], doc["retried"]) == (504, "upstream_timeout", False)
    # Cut off after sending by a crash: the owner is now down, which would make an unsent
    # request wait for it; this one may have been processed, so it is answered.
    sims[1].route_delay_s = {"/api/messages/send": 5.0}
    in_flight = asyncio.create_task(send(client, "s2"))
    await wait_for(lambda: sends(sims[1]) == 1, what="the send at node-1")
    await sims[1].stop()
    status, doc, _ = await in_flight
    assert (status, doc["error"], doc["retried"]) == (502, "upstream_unreachable", False)
    assert [sends(s) for s in sims] == [1, 1, 0, 0]
    assert router.parking.stats.outcomes.total() == 0


async def test_pool_listing_names_every_instance_it_could_not_list(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    for n, sim in enumerate(sims):
        sim.add_session(f"s{n}")
    client, router = await warm(start_router, cfg(sims, discovery={"probe_timeout_s": 0.3}))
    await sims[0].stop()
    inst = router.pool.get("node-0")
    assert inst is not None
    await wait_for(lambda: inst.state.value == "down")
    sims[1].hang = True  # stopped, not yet seen down
    resp = await client.get("/api/sessions", params={"api_key": "test-key"})
    assert resp.status == 200
    doc = await resp.json()
    assert sorted(s["session_id"] for s in doc["sessions"]) == ["s2", "s3"]
    assert sorted(doc["errors"]) == ["node-0", "node-1"]
    assert "down" in doc["errors"]["node-0"]


async def test_sigterm_answers_every_parked_request_with_a_503(
    tmp_path: Path, sims: list[SimInstance]
) -> None:
    from .test_lifecycle import router_process, wait_exit, wait_healthy

    sims[0].add_session("s1")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    raw = {
        "instances": [{"name": s.name, "url": s.url} for s in sims],
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_s": 10},
        "upstream": {
            "api_key": API_KEY,
            **({"client": UPSTREAM_CLIENT} if UPSTREAM_CLIENT else {}),
        },
    }
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(raw))
    logs = tmp_path / "router"
    async with router_process(path, logs) as proc:
        await wait_healthy(proc, base, logs)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:

            async def parked() -> float:
                async with http.get(f"{base}/metrics") as r:
                    text = await r.text()
                line = next(
                    x for x in text.splitlines() if x.startswith("wa_router_parked_requests ")
                )
                return float(line.split()[1])

            async def one() -> tuple[int, dict[str, Any]]:
                async with http.post(f"{base}/api/messages/send", json=send_body("s1")) as r:
                    return r.status, await r.json()

            # Known to the router (its warm sync), then its owner crashes.
            async with http.get(f"{base}/api/sessions/s1/status?api_key={API_KEY}") as r:
                assert r.status == 200
            await sims[0].stop()
            waiting = [asyncio.create_task(one()) for _ in range(3)]
            deadline = asyncio.get_running_loop().time() + 10
            while await parked() < 3:
                assert asyncio.get_running_loop().time() < deadline, "3 requests never parked"
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            results = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        assert [(st, d["error"], d["reason"]) for st, d in results] == [
            (503, "session_unavailable", "shutdown")
        ] * 3
        assert await wait_exit(proc, 10) == 0


async def test_a_wrong_key_is_told_so_and_never_holds_up_the_others(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("s1")
    client, router = await warm(start_router, cfg(sims, upstream={}))  # keys pass through
    assert (await send(client, "s1"))[0] == 200  # found with the caller's key: known now
    sims[0].pause()  # stopped: no answers, health included
    inst = router.pool.get("node-0")
    assert inst is not None
    await wait_for(lambda: inst.state.value == "down", what="node-0 down")
    resp = await client.post("/api/messages/send", json=send_body("s1", api_key="wrong"))
    assert resp.status == 401, await resp.text()  # the instances refused the key: no wait
    good = asyncio.create_task(send(client, "s1"))
    await wait_for(lambda: router.parking.parked == 1, what="the good request waiting")
    sims[0].resume()
    status, doc, _ = await good
    assert status == 200, doc


async def test_a_status_read_is_not_held_up_by_sends_waiting_for_a_login(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("s1", status="authenticated")  # logging in there
    client, router = await warm(start_router, cfg(sims))
    waiting = asyncio.create_task(send(client, "s1"))
    await wait_for(lambda: router.parking.parked == 1, what="the send waiting")
    assert sends(sims[0]) == 0  # not sent where it could only answer 400
    resp = await client.get("/api/sessions/s1/status", params={"api_key": API_KEY})
    assert resp.status == 200 and (await resp.json())["status"] == "authenticated"
    assert router.parking.parked == 1
    sims[0].sessions["s1"].status = "connected"
    await hook(client, sims[0], "session_ready", "s1", status="connected")
    assert (await waiting)[0] == 200


async def test_status_reads_wait_no_longer_than_laravel_waits_for_them(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[0].add_session("s1")
    client, router = await warm(start_router, cfg(sims))
    await sims[0].stop()
    resp = await client.get("/api/sessions/s1/status", params={"api_key": API_KEY})
    doc = await resp.json()
    assert resp.status == 503 and doc["reason"] == "timeout"
    assert 1.5 <= doc["waited_s"] <= 2.5  # the route's 2 s, under Laravel's 3 s


async def test_a_delete_goes_only_to_an_instance_that_holds_the_session(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    from wa_router.sim import SessionFolder

    folder = SessionFolder()
    for sim in sims:
        sim.folder = folder
    sims[0].add_session("s1")
    client, router = await warm(start_router, cfg(sims))
    # node-0 restarted between two health checks: it no longer holds s1 (it is on node-2
    # now), and the router has not heard yet.
    sims[0].remove_session("s1")
    sims[2].add_session("s1")
    resp = await client.request(
        "DELETE", "/api/sessions/s1", json={"workspace_id": 1, "api_key": API_KEY}
    )
    assert resp.status == 200, await resp.text()
    assert folder.deleted_by == []  # never to node-0, which would have erased the login
    assert sims[0].count("DELETE", "/api/sessions/s1") == 0
    assert sims[2].count("DELETE", "/api/sessions/s1") == 1
    assert "s1" not in sims[2].sessions


async def test_a_create_for_a_session_connected_on_a_down_owner_waits_for_it(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    sims[1].add_session("s1")
    client, router = await warm(start_router, cfg(sims))
    await sims[1].stop()
    body = {"session_id": "s1", "workspace_id": 1, "api_key": API_KEY}
    creating = asyncio.create_task(client.post("/api/sessions", json=body))
    await wait_for(lambda: router.parking.parked == 1, what="the create waiting")
    # Not placed elsewhere: a second login would fight the first.
    assert sum(s.count("POST", "/api/sessions") for s in sims) == 0
    await sims[1].start()
    sims[1].add_session("s1")
    await hook(client, sims[1], "session_ready", "s1", status="connected")
    resp = await creating
    assert resp.status == 200, await resp.text()
    assert sims[1].count("POST", "/api/sessions") == 1


async def test_aiohttp_front_a_waiting_send_whose_caller_left_is_never_sent(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    """On the aiohttp front, which is not told that a caller left (no handler cancellation,
    as `serve` runs it), a send waiting for its session waits on; when the session is back
    it is not made (nobody would read its answer; a caller that retries would have the
    message twice). The lean front ends such a wait at once (test_lean.py)."""
    sims[2].add_session("s1")
    client, router = await warm(start_router, cfg(sims, server={"front": "aiohttp"}))
    await sims[2].stop()
    left = asyncio.create_task(send(client, "s1"))
    await wait_for(lambda: router.parking.parked == 1, what="the send parked")
    left.cancel()  # the caller gives up: its connection closes
    await asyncio.gather(left, return_exceptions=True)
    await sims[2].start()
    sims[2].add_session("s1")
    await hook(client, sims[2], "session_ready", "s1", status="connected")
    await wait_for(
        lambda: router.proxy.stats.dropped["caller_gone"] == 1, what="the woken send not made"
    )
    assert router.parking.stats.outcomes == {"woken": 1}
    assert sends(sims[2]) == 0
    assert (await send(client, "s1"))[0] == 200  # the next caller's send goes, alone
    assert sends(sims[2]) == 1
