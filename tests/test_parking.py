"""Parking on its own: arrival order, caps, deadlines, shutdown, the per-session watcher."""

from __future__ import annotations

import asyncio

import pytest

from wa_router.parking import FULL, SHUTDOWN, TIMEOUT, WOKEN, Parking, Unparked

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


async def test_one_watcher_per_session_rechecks_and_wakes() -> None:
    p = Parking(max_per_session=10, max_total=10, recheck_first_s=0.01, recheck_max_s=0.02)
    asked: list[tuple[str, str | None]] = []
    answer: dict[str, str | None] = {"s": None}

    async def recheck(session: str, api_key: str | None) -> str | None:
        asked.append((session, api_key))
        return answer[session]

    p.recheck = recheck
    waiting = [asyncio.create_task(p.wait("s", timeout_s=5, api_key="k")) for _ in range(3)]
    await wait_for(lambda: len(asked) >= 3, what="a few rechecks")
    assert all(a == ("s", "k") for a in asked)  # one session asked, however many wait
    answer["s"] = "node-c"
    assert await asyncio.gather(*waiting) == ["node-c"] * 3
    assert not p.waiting("s")  # the watcher went with its last waiter


async def test_kick_and_recheck_all_ask_at_once() -> None:
    # A watcher whose next turn is far off still asks at once when kicked.
    p = Parking(max_per_session=10, max_total=10, recheck_first_s=30, recheck_max_s=30)
    asked: list[str] = []

    async def recheck(session: str, api_key: str | None) -> str | None:
        asked.append(session)
        return None

    p.recheck = recheck
    tasks = [asyncio.create_task(p.wait(s, timeout_s=5, api_key=None)) for s in ("s", "t")]
    await wait_for(lambda: p.parked == 2)
    p.kick("s")
    await wait_for(lambda: asked == ["s"])
    p.recheck_all()
    await wait_for(lambda: sorted(asked) == ["s", "s", "t"])
    p.wake("s", "a")
    p.wake("t", "b")
    assert await asyncio.gather(*tasks) == ["a", "b"]
