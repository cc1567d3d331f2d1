"""The durable webhook backlog: order per session, bound, durability, byte-exact round trip."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest

from wa_router.backlog import Backlog, Pending, SqliteBacklog

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def backlog(tmp_path: Path) -> AsyncIterator[SqliteBacklog]:
    b = SqliteBacklog(tmp_path / "backlog.db")
    await b.open()
    yield b
    await b.close()


async def put(b: Backlog, session: str, body: bytes = b"{}", *, timestamp: int = 1) -> int:
    item_id = await b.append(
        session=session, path="/webhook", body=body, headers=[], timestamp=timestamp
    )
    assert item_id is not None
    return item_id


def ids(items: list[Pending]) -> list[int]:
    return [p.id for p in items]


async def test_heads_one_per_session_ordered_by_id(backlog: SqliteBacklog) -> None:
    a1 = await put(backlog, "a")
    b1 = await put(backlog, "b")
    await put(backlog, "a")
    c1 = await put(backlog, "c")
    await put(backlog, "b")

    assert ids(await backlog.heads()) == [a1, b1, c1]
    assert [p.session for p in await backlog.heads()] == ["a", "b", "c"]
    assert ids(await backlog.heads(limit=2)) == [a1, b1]


async def test_ack_makes_the_next_item_of_the_session_its_head(backlog: SqliteBacklog) -> None:
    a1 = await put(backlog, "a")
    b1 = await put(backlog, "b")
    a2 = await put(backlog, "a")
    c1 = await put(backlog, "c")

    await backlog.ack(a1)
    # a's head is now a2, which arrived after b1: the order follows the heads' own ids.
    assert ids(await backlog.heads()) == [b1, a2, c1]
    await backlog.ack(a2)
    assert ids(await backlog.heads()) == [b1, c1]
    await backlog.ack(12345)  # unknown id: no-op
    assert await backlog.size() == 2


async def test_draining_by_heads_delivers_each_session_in_arrival_order(
    backlog: SqliteBacklog,
) -> None:
    appended: dict[str, list[int]] = {}
    for i in range(30):
        session = "abc"[i % 3] if i % 7 else ""
        appended.setdefault(session, []).append(await put(backlog, session))

    delivered: dict[str, list[int]] = {}
    while heads := await backlog.heads(limit=2):
        for item in heads:
            delivered.setdefault(item.session, []).append(item.id)
            await backlog.ack(item.id)

    assert delivered == appended
    assert await backlog.size() == 0


async def test_heads_match_a_model_under_random_appends_and_acks(backlog: SqliteBacklog) -> None:
    rng = random.Random(7)
    model: dict[int, str] = {}
    for _ in range(400):
        if model and rng.random() < 0.4:
            # Ack a session's head, as the relay does.
            session = rng.choice(sorted(set(model.values())))
            item_id = min(i for i, s in model.items() if s == session)
            await backlog.ack(item_id)
            del model[item_id]
        else:
            session = rng.choice(["", "s1", "s2", "s10", "z", "Ä"])
            model[await put(backlog, session)] = session
        first: dict[str, int] = {}
        for item_id in sorted(model):
            first.setdefault(model[item_id], item_id)
        assert ids(await backlog.heads(limit=4)) == sorted(first.values())[:4]
    assert await backlog.size() == len(model)


async def test_attempted_increments(backlog: SqliteBacklog) -> None:
    item_id = await put(backlog, "a")
    other = await put(backlog, "b")
    await backlog.attempted(item_id)
    await backlog.attempted(item_id)
    await backlog.attempted(999)  # unknown id: no-op

    attempts = {p.id: p.attempts for p in await backlog.heads()}
    assert attempts == {item_id: 2, other: 0}


async def test_pending_and_size(backlog: SqliteBacklog) -> None:
    assert await backlog.size() == 0
    assert await backlog.heads() == []
    for session in ["a", "a", "b", "", "a"]:
        await put(backlog, session)

    assert await backlog.size() == 5
    assert await backlog.pending("a") == 3
    assert await backlog.pending("b") == 1
    assert await backlog.pending("") == 1
    assert await backlog.pending("nobody") == 0

    await backlog.ack((await backlog.heads())[0].id)
    assert await backlog.pending("a") == 2
    assert await backlog.size() == 4


async def test_bounded_full_appends_store_nothing(tmp_path: Path) -> None:
    b = SqliteBacklog(tmp_path / "b.db", max_items=3)
    await b.open()
    try:
        first = await put(b, "a")
        await put(b, "a")
        await put(b, "b")
        full = await b.append(session="c", path="/w", body=b"x", headers=[], timestamp=1)
        assert full is None
        assert await b.size() == 3
        assert await b.pending("c") == 0

        await b.ack(first)
        assert await put(b, "c") > first
        assert await b.size() == 3
    finally:
        await b.close()


async def test_ids_keep_increasing_after_the_backlog_empties(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    b = SqliteBacklog(path)
    await b.open()
    first = await put(b, "a")
    await b.ack(first)
    second = await put(b, "a")
    await b.ack(second)
    await b.close()

    b = SqliteBacklog(path)
    await b.open()
    try:
        assert first < second < await put(b, "a")
    finally:
        await b.close()


async def test_survives_a_new_instance_without_close(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    crashed = SqliteBacklog(path)
    await crashed.open()
    try:
        appended = [await put(crashed, s, s.encode()) for s in ["a", "b", "a"]]

        # Never closed: no checkpoint ran, the items are only in the WAL.
        fresh = SqliteBacklog(path)
        await fresh.open()
        try:
            assert await fresh.size() == 3
            assert ids(await fresh.heads()) == appended[:2]
            assert await fresh.pending("a") == 2
        finally:
            await fresh.close()
    finally:
        await crashed.close()


async def test_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    b = SqliteBacklog(path)
    await b.open()
    item_id = await put(b, "a", b"kept")
    await b.attempted(item_id)
    await b.close()
    await b.close()  # idempotent

    await b.open()
    try:
        [head] = await b.heads()
        assert (head.id, head.body, head.attempts) == (item_id, b"kept", 1)
    finally:
        await b.close()


CRASHING_WRITER = """
import asyncio, os, sys
from wa_router.backlog import SqliteBacklog

async def main() -> None:
    b = SqliteBacklog(sys.argv[1])
    await b.open()
    for i in range(5):
        await b.append(session=f"s{i % 2}", path="/webhook", body=b"\\xff%d" % i,
                       headers=[("X-Signature", str(i))], timestamp=1700000000 + i)
    os._exit(0)  # no close(), no atexit, no checkpoint: as a killed process

asyncio.run(main())
"""


async def test_survives_a_process_that_exits_without_cleanup(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "b.db"  # parent directories created on open
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_WRITER, str(path), env=env
    )
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert path.with_name("b.db-wal").exists()  # the exit left the WAL un-checkpointed

    b = SqliteBacklog(path)
    await b.open()
    try:
        assert await b.size() == 5
        assert await b.pending("s0") == 3
        heads = await b.heads()
        assert [(p.session, p.body, p.headers, p.timestamp) for p in heads] == [
            ("s0", b"\xff0", (("X-Signature", "0"),), 1700000000),
            ("s1", b"\xff1", (("X-Signature", "1"),), 1700000001),
        ]
    finally:
        await b.close()


async def test_bytes_and_headers_round_trip_exactly(tmp_path: Path) -> None:
    bodies = [b"", b"\xff\xfe\x00\x80not utf-8\xc3", bytes(range(256)), b'{"a": 1,  "b":2}\n']
    headers = [
        ("X-Webhook-Signature", "sha256=abc"),
        ("Content-Type", "application/json; charset=utf-8"),
        ("X-Custom", "second"),
        ("X-Custom", "first"),  # repeated names keep their order
        ("X-Empty", ""),
        ("X-Note", 'caf\u00e9 "quoted" \\ back'),
    ]
    path = tmp_path / "b.db"
    b = SqliteBacklog(path, clock=lambda: 1234.5)
    await b.open()
    for i, body in enumerate(bodies):
        await b.append(
            session=f"s{i}",
            path="/api/webhook?x=1",
            body=body,
            headers=headers,
            timestamp=1_700_000_000 + i,
        )
    await b.close()

    b = SqliteBacklog(path)
    await b.open()
    try:
        heads = await b.heads()
    finally:
        await b.close()
    assert [p.body for p in heads] == bodies
    assert all(type(p.body) is bytes for p in heads)
    assert {p.headers for p in heads} == {tuple(headers)}
    assert [p.timestamp for p in heads] == [1_700_000_000 + i for i in range(len(bodies))]
    assert {(p.path, p.attempts, p.enqueued_at) for p in heads} == {("/api/webhook?x=1", 0, 1234.5)}


async def test_concurrent_appends_all_land_with_unique_increasing_ids(
    backlog: SqliteBacklog,
) -> None:
    results = await asyncio.gather(
        *(
            backlog.append(session=f"s{i % 5}", path="/w", body=b"%d" % i, headers=[], timestamp=i)
            for i in range(50)
        )
    )

    got = [r for r in results if r is not None]
    assert len(got) == 50
    assert len(set(got)) == 50
    # Calls run in submission order, so ids follow the order the appends were made.
    assert got == sorted(got)
    assert await backlog.size() == 50
    assert all([await backlog.pending(f"s{i}") == 10 for i in range(5)])


async def test_wal_mode_is_set_on_the_file(backlog: SqliteBacklog) -> None:
    with closing(sqlite3.connect(backlog.path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_corrupt_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    path.write_bytes(b"this is not a database" * 100)
    b = SqliteBacklog(path)
    with pytest.raises(sqlite3.DatabaseError):
        await b.open()
    with pytest.raises(RuntimeError, match="not open"):
        await b.size()


async def test_calls_before_open_raise(tmp_path: Path) -> None:
    b = SqliteBacklog(tmp_path / "b.db")
    with pytest.raises(RuntimeError, match="not open"):
        await put(b, "a")
    await b.close()  # closing a never-opened backlog is a no-op


def test_max_items_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_items"):
        SqliteBacklog(tmp_path / "b.db", max_items=0)
