"""Pure policy: retry decisions, api key injection, pool state, single flight."""

from __future__ import annotations

import asyncio
import json

import pytest
from multidict import CIMultiDict

from wa_router import errors
from wa_router.apikeys import KeyPolicy
from wa_router.config import InstanceConfig, ProfileConfig
from wa_router.errors import (
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    ReadTimeout,
    RequestRejected,
    UpstreamError,
)
from wa_router.pool import Pool, State
from wa_router.profiles import build_profile
from wa_router.retry import failure_answer, look_again, may_resend, outcome_of
from wa_router.singleflight import SingleFlight
from wa_router.stores import MemoryStore


@pytest.mark.parametrize(
    ("exc", "method", "headers", "retry"),
    [
        (ConnectFailed("a", "refused"), "POST", {}, True),
        (ConnectTimeout("a", "t"), "POST", {}, True),
        (ReadTimeout("a", "t"), "POST", {}, False),
        (Disconnected("a", "x"), "POST", {}, False),
        (ReadTimeout("a", "t"), "POST", {"Idempotency-Key": "k1"}, True),
        (Disconnected("a", "x"), "GET", {}, True),
        (Disconnected("a", "x"), "DELETE", {}, True),
        (Disconnected("a", "x"), "PATCH", {}, False),
    ],
)
def test_retry_policy(
    exc: UpstreamError, method: str, headers: dict[str, str], retry: bool
) -> None:
    # Whether the router looks for the owner again to send once more after `exc`.
    again = look_again(outcome_of(exc), may_resend=may_resend(method, headers), sends_left=1)
    assert again is retry


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (ReadTimeout("a", "t"), 504, "upstream_timeout"),
        (Disconnected("a", "x"), 502, "upstream_unreachable"),
        (ConnectFailed("a", "x"), 502, "upstream_unreachable"),
    ],
)
def test_failure_answers(exc: UpstreamError, status: int, code: str) -> None:
    ans = failure_answer(exc, "s1", retried=False)
    assert (ans.status, ans.code) == (status, code)
    assert ans.body()["retried"] is False and ans.body()["session"] == "s1"


BLAZZ = build_profile(ProfileConfig(), None)
SIMPLE = build_profile(ProfileConfig(name="simple"), None)


def test_only_client_keys_get_the_upstream_key() -> None:
    keys = KeyPolicy(BLAZZ, "node-secret", ("laravel-1", "laravel-2"))
    assert keys.is_client("laravel-2")
    assert not keys.is_client("node-secret")
    assert not keys.is_client(None)
    assert not KeyPolicy(BLAZZ, None, ()).is_client("anything")


def test_inject_get_query_and_post_body() -> None:
    keys = KeyPolicy(BLAZZ, "node-secret", ("c",))
    headers: CIMultiDict[str] = CIMultiDict({"X-Api-Key": "c"})
    path, body = keys.inject("GET", "/api/sessions/s1/status?x=1", headers, b"", None)
    assert path == "/api/sessions/s1/status?x=1&api_key=node-secret"
    assert "X-Api-Key" not in headers
    doc = {"session_id": "s1", "api_key": "c", "message": "hi"}
    path, body = keys.inject(
        "POST", "/api/messages/send", CIMultiDict(), json.dumps(doc).encode(), doc
    )
    assert json.loads(body) == {**doc, "api_key": "node-secret"}
    _, body = keys.inject("POST", "/api/sessions/s1/reconnect", CIMultiDict(), b"", None)
    assert json.loads(body) == {"api_key": "node-secret"}
    # The client key sent in the query string goes no further than the router.
    for sent, kept in [
        ("/api/messages/send?api_key=c", "/api/messages/send"),
        ("/api/messages/send?x=1&api_key=c&y=2", "/api/messages/send?x=1&y=2"),
        ("/api/messages/send?x=1", "/api/messages/send?x=1"),
    ]:
        path, body = keys.inject("POST", sent, CIMultiDict(), b"{}", {})
        assert (path, json.loads(body)) == (kept, {"api_key": "node-secret"})
    with pytest.raises(RequestRejected):
        keys.inject("POST", "/x", CIMultiDict(), b"not json", None)


def test_inject_header_profile() -> None:
    keys = KeyPolicy(SIMPLE, "node-secret", ("c",))
    headers: CIMultiDict[str] = CIMultiDict({"X-Api-Key": "c"})
    assert keys.presented("GET", {}, headers, None) == "c"
    path, _ = keys.inject("GET", "/session/s1/status", headers, b"", None)
    assert path == "/session/s1/status" and headers["X-Api-Key"] == "node-secret"


def test_presented_key_where_blazz_callers_put_it() -> None:
    keys = KeyPolicy(BLAZZ, None, ())
    assert keys.presented("GET", {"api_key": "q"}, {}, None) == "q"
    assert keys.presented("POST", {}, {}, {"api_key": "b"}) == "b"
    assert keys.presented("POST", {}, {"X-Api-Key": "h"}, {"api_key": "b"}) == "h"
    assert keys.presented("POST", {"api_key": "q"}, {}, {"message": "hi"}) == "q"
    assert keys.presented("POST", {"api_key": "q"}, {}, {"api_key": "b"}) == "b"


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_pool_suspect_cooldown_and_placement() -> None:
    clock = Clock()
    pool = Pool(
        [
            InstanceConfig("a", "http://127.0.0.1:3001"),
            InstanceConfig("b", "http://127.0.0.1:3002", aliases=("http://node-b:80",)),
            InstanceConfig("c", "http://10.0.0.3:3000"),
        ],
        suspect_cooldown_s=5,
        clock=clock,
    )
    a, b, c = pool.instances
    assert pool.by_url("http://localhost:3001") is a
    assert pool.by_url("http://[::1]:3002") is b
    assert pool.by_url("http://node-b") is b
    assert pool.by_url("http://localhost:3000") is c  # the one member on that port
    assert pool.by_url("http://localhost:9999") is None
    assert pool.by_url("garbage") is None
    pool.mark_suspect(a, "refused")
    assert a.state is State.SUSPECT and pool.discoverable() == [b, c]
    assert pool.for_placement({"b": 5, "c": 2}) is c
    b.draining = True
    assert pool.for_placement({"c": 9}) is c
    clock.t = 5.0
    assert pool.routable(a)
    assert pool.for_placement({"c": 9}) is a
    pool.mark_healthy(a)
    assert a.state is State.HEALTHY


async def test_single_flight_runs_once_for_a_herd() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    gate = asyncio.Event()
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return 42

    waiters = [asyncio.ensure_future(flight.run("k", work)) for _ in range(100)]
    await asyncio.sleep(0)
    waiters[0].cancel()  # one caller going away does not cancel the others' result
    gate.set()
    results = await asyncio.gather(*waiters[1:])
    assert results == [42] * 99 and runs == 1 and flight.started == 1
    assert len(flight) == 0


def test_a_reloaded_pool_keeps_its_members_state_and_names_what_changed() -> None:
    from wa_router.config import InstanceConfig
    from wa_router.pool import Pool

    pool = Pool(
        [InstanceConfig("a", "http://127.0.0.1:3001"), InstanceConfig("b", "http://127.0.0.1:3002")]
    )
    kept = pool.get("a")
    assert kept is not None
    kept.draining = True
    added, removed = pool.set_instances(
        [
            InstanceConfig("a", "http://127.0.0.1:3001"),
            InstanceConfig("c", "http://127.0.0.1:3003", aliases=("http://localhost:3003",)),
        ]
    )
    assert (added, removed) == (["c"], ["b"])
    assert pool.get("a") is kept and kept.draining  # same member: its state stays
    assert pool.get("b") is None and [i.name for i in pool.instances] == ["a", "c"]
    assert pool.by_url("http://localhost:3003") is pool.get("c")
    # A member whose URL changed is a new member (nothing known of it yet).
    added, removed = pool.set_instances([InstanceConfig("a", "http://127.0.0.1:4001")])
    assert (added, removed) == (["a"], ["a", "c"]) and pool.get("a") is not kept


@pytest.mark.parametrize(
    ("exc", "down"),
    [
        (errors.ConnectFailed("n", "refused"), True),
        (errors.Disconnected("n", "reset"), True),
        (errors.PoolTimeout("n", "all 256 busy"), False),  # busy is alive
        (errors.ReadTimeout("n", "slow"), False),
    ],
)
def test_which_failures_make_an_instance_suspect(exc: errors.UpstreamError, down: bool) -> None:
    assert errors.says_down(exc) is down


@pytest.mark.parametrize(
    ("qs", "parsed"),
    [
        ("", {}),
        ("api_key=k", {"api_key": "k"}),
        ("a=1&a=2&b", {"a": "1", "b": ""}),  # the first value, as aiohttp's .get gives
        ("x=a+b&y=%2Fz&%61=c", {"x": "a b", "y": "/z", "a": "c"}),
        ("&&k=v&", {"k": "v"}),
    ],
)
def test_query_strings_parse_as_aiohttp_reads_them(qs: str, parsed: dict[str, str]) -> None:
    from wa_router.exchange import parse_query

    assert parse_query(qs) == parsed


class ForgetfulStore(MemoryStore):
    """A store that lost its drained set (down when it was told, or its key expired)."""

    async def set_draining(self, instance: str, draining: bool) -> None:
        raise ConnectionError("the store is down")


async def test_a_drain_from_the_file_survives_a_store_that_lost_it() -> None:
    from wa_router.draining import SharedDrain

    pool = Pool([InstanceConfig("a", "http://127.0.0.1:3001")])
    drain = SharedDrain(pool, ForgetfulStore())
    drain.pinned = frozenset({"a"})
    assert await drain.set("a", True) is False  # the store was not told
    await drain.load()  # and says nothing is drained
    assert pool.get("a").draining  # type: ignore[union-attr]
    assert await drain.set("a", False) is False  # an operator's undrain wins
    await drain.load()
    assert not pool.get("a").draining  # type: ignore[union-attr]
