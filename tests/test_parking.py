"""Parking on its own: arrival order, caps, deadlines, shutdown, the per-session watcher."""

from __future__ import annotations

import asyncio

import pytest

from wa_router.parking import FULL, KEY_REFUSED, SHUTDOWN, TIMEOUT, WOKEN, Parking, Unparked

from .conftest import wait_for


def parking(**kw: int) -> Parking:
    return Parking(max_per_session=kw.get("per_session", 10), max_total=kw.get("total", 100))


async def test_woken_in_arrival_order_with_the_instance() -> None:
    p = parking()
    order: list[tuple[int, str]] = []

    async def one(n: int) -> None:
        order.append((n, await p.wait("s", timeout_s=5, api_key=None)))

    tasks = [asyncio.create_task(one(n)) for n in range(5)]
    await wait_for(lambda: p.parked == 5)
    assert p.waiting("s") and not p.waiting("other")
    p.wake("other", "node-x")  # another session's news wakes nobody here
    p.wake("s", "node-b")
    await asyncio.gather(*tasks)
    assert order == [(n, "node-b") for n in range(5)]
    assert p.parked == 0 and not p.waiting("s")
    assert p.stats.outcomes[WOKEN] == 5


async def test_deadline_and_caps_answer_instead_of_waiting() -> None:
    p = parking(per_session=2, total=3)
    with pytest.raises(Unparked) as timed_out:
        await p.wait("s", timeout_s=0.05, api_key=None)
    assert timed_out.value.reason == TIMEOUT and timed_out.value.waited_s >= 0.05
    waiting = [asyncio.create_task(p.wait("s", timeout_s=5, api_key=None)) for _ in range(2)]
    await wait_for(lambda: p.parked == 2)
    with pytest.raises(Unparked) as per_session:
        await p.wait("s", timeout_s=5, api_key=None)
    assert per_session.value.reason == FULL
    waiting.append(asyncio.create_task(p.wait("t", timeout_s=5, api_key=None)))
    await wait_for(lambda: p.parked == 3)
    with pytest.raises(Unparked) as total:
        await p.wait("u", timeout_s=5, api_key=None)
    assert total.value.reason == FULL
    p.wake("s", "a")
    p.wake("t", "b")
    assert await asyncio.gather(*waiting) == ["a", "a", "b"]


async def test_shutdown_answers_every_waiter_and_refuses_new_ones() -> None:
    p = parking()
    waiting = [
        asyncio.create_task(p.wait(f"s{n % 2}", timeout_s=30, api_key=None)) for n in range(4)
    ]
    await wait_for(lambda: p.parked == 4)
    await p.close()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert [r.reason for r in results if isinstance(r, Unparked)] == [SHUTDOWN] * 4
    with pytest.raises(Unparked) as late:
        await p.wait("s0", timeout_s=30, api_key=None)
    assert late.value.reason == SHUTDOWN
    assert p.parked == 0


async def test_one_watcher_asks_about_every_parked_session_in_one_round() -> None:
    p = Parking(max_per_session=10, max_total=10, recheck_first_s=0.01, recheck_max_s=0.02)
    rounds: list[dict[str, str | None]] = []
    answer: dict[str, str] = {}

    async def recheck(asks: dict[str, str | None]) -> dict[str, str]:
        rounds.append(dict(asks))
        return dict(answer)

    p.recheck = recheck
    waiting = [asyncio.create_task(p.wait(s, timeout_s=5, api_key=f"k-{s}")) for s in "sst"]
    await wait_for(lambda: len(rounds) >= 3, what="a few rounds")
    # One call per round for all sessions (not one per request, nor per session).
    assert all(r == {"s": "k-s", "t": "k-t"} for r in rounds)
    answer["s"] = "node-c"
    await wait_for(lambda: waiting[0].done() and waiting[1].done())
    assert not waiting[2].done() and not p.waiting("s")
    answer["t"] = "node-d"
    assert await asyncio.gather(*waiting) == ["node-c", "node-c", "node-d"]
    assert not p.waiting("t")


async def test_a_refused_key_gives_way_to_the_next_callers() -> None:
    p = Parking(max_per_session=10, max_total=10, recheck_first_s=0.01, recheck_max_s=0.02)
    keys_tried: list[str | None] = []

    async def recheck(asks: dict[str, str | None]) -> dict[str, str]:
        keys_tried.append(asks["s"])
        return {"s": KEY_REFUSED} if asks["s"] == "wrong" else {"s": "node-a"}

    p.recheck = recheck
    bad = asyncio.create_task(p.wait("s", timeout_s=5, api_key="wrong"))
    good = asyncio.create_task(p.wait("s", timeout_s=5, api_key="right"))
    assert await asyncio.gather(bad, good) == ["node-a", "node-a"]
    assert keys_tried[0] == "wrong" and keys_tried[-1] == "right"


async def test_a_request_arriving_after_a_wake_is_not_queued_behind_it() -> None:
    p = parking()
    first = asyncio.create_task(p.wait("s", timeout_s=5, api_key=None))
    await wait_for(lambda: p.waiting("s"))
    p.wake("s", "node-a")
    assert not p.waiting("s")  # gone with its waiters: a newcomer looks for itself
    assert await first == "node-a"


async def test_kick_and_recheck_all_ask_at_once() -> None:
    # The watcher's next turn is far off, yet it asks at once when kicked.
    p = Parking(max_per_session=10, max_total=10, recheck_first_s=30, recheck_max_s=30)
    rounds: list[set[str]] = []

    async def recheck(asks: dict[str, str | None]) -> dict[str, str]:
        rounds.append(set(asks))
        return {}

    p.recheck = recheck
    tasks = [asyncio.create_task(p.wait(s, timeout_s=5, api_key=None)) for s in ("s", "t")]
    await wait_for(lambda: p.parked == 2)
    p.kick("nobody-waits-for-this")
    p.kick("s")
    await wait_for(lambda: rounds == [{"s", "t"}])
    p.recheck_all()
    await wait_for(lambda: len(rounds) == 2)
    p.wake("s", "a")
    p.wake("t", "b")
    assert await asyncio.gather(*tasks) == ["a", "b"]
