"""Laravel's webhook limiter (1,000 a minute per client IP, re-armed by every hit:
node-pool-api.md, "Laravel's own limits"), kept clear of: behind the router every webhook
comes from one IP, and a router that kept retrying into a 429 would keep Laravel closed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from wa_router.breaker import Breaker
from wa_router.laravel_budget import LaravelBudget, retry_after
from wa_router.shared_budget import SharedBudget
from wa_router.sim import SimInstance, SimLaravel

from .conftest import StartRouter, pool_config, signed_webhook, wait_for, wait_until
from .redis_server import RedisServer, redis_server_fixture, unique_prefix

redis_server = redis_server_fixture()

SECRET = "limit-secret"
HOOK = "/api/whatsapp/webhooks/webjs"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# Each step: (seconds later, action, the wait_s() expected after it).
@pytest.mark.parametrize(
    ("per_window", "steps"),
    [
        # Three sends fit; the fourth waits for a minute of quiet after the third.
        (3, [(0, "send", 0), (1, "send", 0), (1, "send", 60), (30, "check", 30)]),
        # ...then the count starts afresh.
        (3, [(0, "send", 0), (0, "send", 0), (0, "send", 60), (60, "check", 0)]),
        # Sends a little under a minute apart never let Laravel's count go.
        (2, [(0, "send", 0), (59, "send", 60), (59, "check", 1)]),
        # A send that never reached Laravel (unreachable, a gateway's 503) is given back.
        (2, [(0, "send", 0), (0, "send", 60), (0, "refund", 0), (0, "send", 60)]),
        (1, [(0, "refund", 0), (0, "send", 60)]),  # nothing to give back: no credit
        # A 429 closes it for a whole window, whatever the count.
        (None, [(0, "send", 0), (0, "429", 60), (59, "check", 1), (1, "check", 0)]),
        (100, [(0, "send", 0), (0, "429", 60), (60, "check", 0)]),
        # A longer Retry-After is taken, up to ten minutes.
        (None, [(0, "429:120", 120)]),
        (None, [(0, "429:999999", 600)]),
        (None, [(0, "429:5", 60)]),
    ],
)
def test_the_budget(per_window: int | None, steps: list[tuple[float, str, float]]) -> None:
    clock = Clock()
    budget = LaravelBudget(per_window, window_s=60.0, clock=clock)
    for later, action, wait in steps:
        clock.now += later
        if action == "send":
            assert budget.wait_s() == 0
            budget.sent()
        elif action == "refund":
            budget.refund()
        elif action.startswith("429"):
            _, _, after = action.partition(":")
            budget.throttled(float(after) if after else None)
        assert budget.wait_s() == pytest.approx(wait), (action, later)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("120", 120.0), (" 7 ", 7.0), ("Wed, 21 Oct 2026 07:28:00 GMT", None), ("-1", None),
     ("1.5", None), ("", None), (None, None)],
)  # fmt: skip
def test_retry_after(value: str | None, seconds: float | None) -> None:
    assert retry_after(value) == seconds


EVENTS = 24


def relaying(sims: list[SimInstance], laravel: SimLaravel, tmp_path: Path, **wh: Any) -> Any:
    """A router relaying to `laravel`, with `wh` over its webhooks section."""
    return pool_config(
        sims,
        webhooks={"secrets": [SECRET], "laravel_url": laravel.url, **wh},
        state={"dir": str(tmp_path / "state")},
        sync={"interval_s": 3600},
    )


async def post_all(client: object, port: int) -> list[int]:
    statuses = []
    for seq in range(EVENTS):
        body, headers = signed_webhook(
            SECRET, "message_received", {"session_id": f"s{seq % 3}", "seq": seq}, port
        )
        resp = await client.post(HOOK, data=body, headers=headers)  # type: ignore[attr-defined]
        statuses.append(resp.status)
    return statuses


@pytest.mark.parametrize("counted", [True, False])
async def test_a_limited_laravel_gets_every_webhook_once_and_is_never_kept_closed(
    counted: bool, sims: list[SimInstance], start_router: StartRouter, tmp_path: Path
) -> None:
    """Laravel allows 8 per 0.5 s window. Counted, the router stays under it: no 429 at
    all. Not counted (null), the first 429 pauses it for a whole window of quiet, so the
    limiter lets go: a few 429s, not one per retry. Either way every webhook arrives
    once, each session's in order, and Node heard success for each (none is lost)."""
    window_s = 0.5
    async with SimLaravel(secret=SECRET) as laravel:
        laravel.rate_limit, laravel.rate_window_s = 8, window_s
        cfg = relaying(
            sims,
            laravel,
            tmp_path,
            retry_base_s=0.05,
            laravel_max_per_minute=8 if counted else None,
            laravel_limit_window_s=window_s,
        )
        client, router = await start_router(cfg)
        statuses = await post_all(client, sims[0].port)
        assert set(statuses) <= {200, 202}, statuses  # relayed, or queued (kept)
        await wait_for(lambda: len(laravel.events) >= EVENTS, 15, "every webhook delivered")
        await asyncio.sleep(0)  # nothing more is on its way: the backlog is empty
        seqs = [e.data["seq"] for e in laravel.events]
        assert sorted(seqs) == list(range(EVENTS))  # each once
        for s in range(3):
            mine = [q for q in seqs if q % 3 == s]
            assert mine == sorted(mine)  # a session's own order
        if counted:
            assert laravel.throttled == 0
        else:
            # Each 429 is followed by a window of quiet: 24 events at 8 a window need at
            # most two more windows, so at most a few refusals.
            assert 1 <= laravel.throttled <= 3, laravel.throttled
        assert router.webhooks.budget.throttles == laravel.throttled


async def test_after_a_429_a_signed_call_waits_too_and_a_restore_still_gets_its_list(
    sims: list[SimInstance], start_router: StartRouter, tmp_path: Path
) -> None:
    async with SimLaravel(secret=SECRET) as laravel:
        laravel.rate_limit = 1  # its minute: 60 s, as the router's
        cfg = relaying(sims, laravel, tmp_path)
        client, router = await start_router(cfg)
        statuses = []
        for seq in range(2):
            body, headers = signed_webhook(
                SECRET, "message_received", {"session_id": "s1", "seq": seq}, sims[0].port
            )
            statuses.append((await client.post(HOOK, data=body, headers=headers)).status)
        assert statuses == [200, 202]  # the second refused by Laravel: kept, sent later
        assert laravel.throttled == 1
        body, headers = signed_webhook(SECRET, "ignored", {"session_id": "s1"}, sims[0].port)
        resp = await client.post("/api/whatsapp/chats/sync", data=body, headers=headers)
        assert resp.status == 429  # signed as webhooks are: Laravel's limiter would count it
        assert (await resp.json())["error"] == "laravel_throttled"
        assert 55 <= int(resp.headers["Retry-After"]) <= 61
        assert not any(c.path == "/api/whatsapp/chats/sync" for c in laravel.calls)
        # A restarting instance's list goes on: without it, it would restore nothing.
        assert (await client.get("/api/whatsapp/accounts/active")).status == 200
        assert laravel.accounts_calls == 1
        assert router.webhooks.backlog is not None
        assert await router.webhooks.backlog.pending("s1") == 1  # waiting, not lost


@pytest.mark.parametrize(("workers", "share"), [(1, 950), (2, 475), (4, 237)])
def test_the_workers_of_one_router_count_in_redis_and_each_has_a_share_for_an_outage(
    workers: int, share: int, sims: list[SimInstance], tmp_path: Path
) -> None:
    from wa_router.app import build_router

    cfg = pool_config(
        sims,
        webhooks={"secrets": [SECRET], "laravel_url": "http://127.0.0.1:9"},
        state={"dir": str(tmp_path)},
        store={"kind": "redis", "redis_url": "redis://127.0.0.1:9"},  # not connected here
    )
    budget = build_router(cfg, worker=0, workers=workers).webhooks.budget
    assert isinstance(budget, SharedBudget)
    assert (budget.per_window, budget.fallback.per_window) == (950, share)


async def test_one_count_and_one_pause_for_every_worker(redis_server: RedisServer) -> None:
    """Two workers (or routers behind one IP): what one sends counts for the other, a 429
    one of them hears pauses both, and a whole window of quiet lets the count go."""
    client = aioredis.from_url(redis_server.url)
    prefix = unique_prefix()
    try:
        a, b = (
            SharedBudget(
                client,
                key_prefix=prefix,
                per_window=3,
                window_s=1.0,
                breaker=Breaker(),
                fallback=LaravelBudget(1, window_s=1.0),
            )
            for _ in range(2)
        )
        assert [await a.take(), await b.take(), await a.take()] == [0, 0, 0]
        assert 0 < await b.take() <= 1.0  # the third was the allowance's last
        assert b.deferred == 1
        await wait_until(lambda: _zero(b.take()), 5, "a quiet window: the count lapsed")
        assert await a.pause(None) == pytest.approx(1.0, abs=0.1)
        assert 0 < await b.take() <= 1.0  # b heard no 429, and holds off all the same
        await wait_until(lambda: _zero(b.take()), 5, "the pause over")
        while await a.take() == 0:
            pass  # what is left of the allowance (each send re-arms its window)
        await b.give_back()  # one of them never reached Laravel
        assert await a.take() == 0  # so exactly one more goes
        assert await a.take() > 0
    finally:
        await client.aclose()


async def _zero(wait: Any) -> bool:
    return bool(await wait == 0)


async def test_without_redis_a_worker_keeps_to_its_share() -> None:
    client = aioredis.from_url("redis://127.0.0.1:9", socket_connect_timeout=0.2)
    try:
        own = LaravelBudget(2, window_s=60.0)
        budget = SharedBudget(
            client,
            key_prefix="p:",
            per_window=950,
            window_s=60.0,
            breaker=Breaker(deadline_s=0.5),
            fallback=own,
        )
        assert [await budget.take(), await budget.take()] == [0, 0]
        assert await budget.take() > 0  # its share, not the whole allowance
        assert budget.store_errors >= 1
        assert await budget.pause(None) == pytest.approx(60.0, abs=1)
        assert own.wait_s() == pytest.approx(60.0, abs=1)  # kept where it will be read
    finally:
        await client.aclose()


async def test_strangers_calls_to_laravel_do_not_spend_the_webhooks_allowance(
    sims: list[SimInstance], start_router: StartRouter, tmp_path: Path
) -> None:
    """Anyone who reaches the router may call accounts/active; had those calls counted, a
    few of them a minute would hold every verified webhook back for good."""
    async with SimLaravel(secret=SECRET) as laravel:
        cfg = relaying(sims, laravel, tmp_path, laravel_max_per_minute=3)
        client, router = await start_router(cfg)
        for _ in range(10):
            assert (await client.get("/api/whatsapp/accounts/active")).status == 200
        unsigned = await client.post("/api/whatsapp/chats/sync", json={"session_id": "s1"})
        assert unsigned.status == 401  # Node signs it: a stranger's goes nowhere
        body, headers = signed_webhook(
            SECRET, "message_received", {"session_id": "s1", "seq": 0}, sims[0].port
        )
        resp = await client.post(HOOK, data=body, headers=headers)
        assert resp.status == 200  # relayed at once, not held back
        assert len(laravel.events) == 1 and laravel.accounts_calls == 10
        assert router.webhooks.budget.deferred == 0


async def test_a_429_nobody_verified_pauses_nothing_and_a_signed_call_keeps_to_the_count(
    sims: list[SimInstance], start_router: StartRouter, tmp_path: Path
) -> None:
    async with SimLaravel(secret=SECRET) as laravel:
        laravel.accounts_status = 429  # another limiter of Laravel's, or a stranger's doing
        client, router = await start_router(
            relaying(sims, laravel, tmp_path, laravel_max_per_minute=1)
        )
        assert (await client.get("/api/whatsapp/accounts/active")).status == 429
        body, headers = signed_webhook(SECRET, "message_received", {"session_id": "s1"}, 1)
        assert (await client.post(HOOK, data=body, headers=headers)).status == 200
        assert router.webhooks.budget.throttles == 0 and len(laravel.events) == 1
        # The allowance (1) is spent: a signed chats/sync would be Laravel's 1,001st hit.
        body, headers = signed_webhook(SECRET, "chats", {"session_id": "s1"}, 1)
        resp = await client.post("/api/whatsapp/chats/sync", data=body, headers=headers)
        assert resp.status == 429 and (await resp.json())["error"] == "laravel_throttled"
        assert 0 < int(resp.headers["Retry-After"]) <= 60
        assert not any(c.path == "/api/whatsapp/chats/sync" for c in laravel.calls)
