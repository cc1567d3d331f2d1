"""The durable backlog of webhooks waiting to be relayed to Laravel.

When Laravel is down, a webhook is persisted here before Node gets its 202 ("we have it"),
and delivered later in order per session. `Backlog` is what the intake uses (append and
counts); `Queue` adds what `delivery.Deliverer` takes items out with. `SqliteBacklog` is the
embedded default, one local SQLite file; with Redis as the store, `stream_backlog.py` keeps
them in Redis Streams that every router delivers from.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Pending:
    """One webhook waiting to be relayed."""

    # Increasing in arrival order, across all sessions; never reused. An int in SQLite, the
    # entry id ("1733050000000-0") in a Redis Stream.
    id: int | str
    session: str  # "" when the event names no session
    path: str  # the path Node posted to
    body: bytes  # raw bytes exactly as received: the HMAC signs them, never re-serialise
    headers: tuple[tuple[str, str], ...]  # headers to relay, order kept
    timestamp: int  # the original X-Timestamp (Unix seconds)
    attempts: int  # delivery attempts made so far
    enqueued_at: float  # Unix seconds


class Backlog(Protocol):
    # True: the intake relays an event at once when nothing of its session waits here
    # (one router: its own lock keeps the order). False: every event goes through the
    # backlog (several routers: only the backlog's order is shared).
    direct: bool

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def append(
        self,
        *,
        session: str,
        path: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        timestamp: int,
        enqueued_at: float | None = None,
    ) -> int | str | None:
        """Persist (durably committed before returning) and return its id; None when the
        backlog holds max_items already (then nothing is stored)."""
        ...

    async def pending(self, session: str) -> int:
        """Items pending for `session`."""
        ...

    async def size(self) -> int:
        """Items pending in all sessions."""
        ...


class Queue(Backlog, Protocol):
    """A backlog one process delivers from."""

    async def heads(self, limit: int = 100) -> list[Pending]:
        """The oldest pending item of each session that has any, ordered by that item's id
        (oldest first), at most `limit`."""
        ...

    async def ack(self, item_id: int | str) -> None:
        """Delivered: remove it. An unknown id is a no-op."""
        ...

    async def attempted(self, item_id: int | str) -> None:
        """One more failed delivery attempt: attempts += 1. An unknown id is a no-op."""
        ...


# Bumped when the table changes; a file written by a newer router is refused rather than
# misread.
# 3: the `seen` table (webhook intake memory: ephemeral, rebuilt on an older file)
_SCHEMA_VERSION = 3

# AUTOINCREMENT: without it SQLite reuses max(rowid)+1, so after the newest item is acked
# the next append would get an id already handed out, and ids would stop following arrival
# order across an emptied backlog.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS backlog (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    session     TEXT    NOT NULL,
    path        TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    headers     TEXT    NOT NULL,
    timestamp   INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS backlog_session_id ON backlog (session, id);
CREATE TABLE IF NOT EXISTS seen (
    key     BLOB PRIMARY KEY,
    value   BLOB NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_expires ON seen (expires);
"""

# The oldest item of each session. A loose-index ("skip") scan: the recursive CTE walks the
# distinct sessions with one (session, id) index seek each, then one seek per session finds
# its MIN(id). The plain `WHERE id IN (SELECT MIN(id) ... GROUP BY session)` reads the whole
# index instead: ~13 ms against ~0.7 ms at 100 k items in 200 sessions, paid on every
# delivery round while Laravel catches up.
_HEADS = """
WITH RECURSIVE s(session) AS (
    SELECT MIN(session) FROM backlog
    UNION ALL
    SELECT (SELECT MIN(session) FROM backlog WHERE session > s.session)
    FROM s WHERE s.session IS NOT NULL
)
SELECT b.id, b.session, b.path, b.body, b.headers, b.timestamp, b.attempts, b.enqueued_at
FROM s JOIN backlog AS b ON b.id = (SELECT MIN(id) FROM backlog WHERE session = s.session)
ORDER BY b.id
LIMIT ?
"""


class SqliteBacklog:
    """`Backlog` in a local SQLite file.

    One connection, used by one worker thread: calls run off the event loop in submission
    order, each in its own transaction. A single-worker executor rather than an
    asyncio.Lock around `to_thread`: a caller cancelled mid-call releases a lock while its
    thread still runs, letting the next call interleave on the same connection; the
    executor's queue cannot be skipped that way (a call cancelled before it starts is simply
    not run).
    """

    direct = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_items: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self._path = Path(path)
        self._max_items = max_items
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def path(self) -> Path:
        return self._path

    async def open(self) -> None:
        if self._executor is not None:
            raise RuntimeError(f"backlog {self._path} is already open")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wa-backlog")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, self._connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._conn, self._executor = conn, executor

    def _connect(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; every write below is either one
        # statement (its own transaction) or an explicit BEGIN IMMEDIATE ... COMMIT.
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            # WAL: appends do not block reads and cost one fsync each. synchronous=FULL
            # (per connection, so set on every open): the WAL is synced at each commit, so
            # an append that returned survives a power cut, not only a process crash.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > _SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"backlog {self._path} has schema version {version}; "
                    f"this wa-router knows up to {_SCHEMA_VERSION}"
                )
            if version < 3:
                conn.execute("DROP TABLE IF EXISTS seen")  # only memory of the last minutes
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        conn, executor = self._conn, self._executor
        if conn is None or executor is None:
            return
        self._conn = self._executor = None
        try:
            # Queued behind any call still running, so it never closes under one.
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        finally:
            executor.shutdown(wait=False)

    async def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        conn, executor = self._conn, self._executor
        if conn is None or executor is None:
            raise RuntimeError(f"backlog {self._path} is not open")
        return await asyncio.get_running_loop().run_in_executor(executor, fn, conn)

    async def append(
        self,
        *,
        session: str,
        path: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        timestamp: int,
        enqueued_at: float | None = None,
    ) -> int | None:
        row = (
            session,
            path,
            bytes(body),
            json.dumps([[name, value] for name, value in headers]),
            timestamp,
            self._clock() if enqueued_at is None else enqueued_at,
        )
        max_items = self._max_items

        def insert(conn: sqlite3.Connection) -> int | None:
            # Count and insert in one write transaction, so the bound holds even if a second
            # process has the file open. COUNT(*) walks b-tree pages, not rows: ~0.06 ms at
            # 100 k items, well below the fsync each append pays anyway.
            conn.execute("BEGIN IMMEDIATE")
            try:
                (count,) = conn.execute("SELECT COUNT(*) FROM backlog").fetchone()
                if count >= max_items:
                    conn.execute("ROLLBACK")
                    return None
                cur = conn.execute(
                    "INSERT INTO backlog (session, path, body, headers, timestamp, enqueued_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    row,
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            assert cur.lastrowid is not None
            return cur.lastrowid

        return await self._call(insert)

    async def heads(self, limit: int = 100) -> list[Pending]:
        def select(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(_HEADS, (limit,)).fetchall()

        return [_pending(row) for row in await self._call(select)]

    async def oldest(self, limit: int = 100) -> list[Pending]:
        """The oldest items of all sessions, in arrival order (the spool's move to Redis)."""

        def select(conn: sqlite3.Connection) -> list[Any]:
            query = (
                "SELECT id, session, path, body, headers, timestamp, attempts, enqueued_at"
                " FROM backlog ORDER BY id LIMIT ?"
            )
            return conn.execute(query, (limit,)).fetchall()

        return [_pending(row) for row in await self._call(select)]

    async def ack(self, item_id: int | str) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM backlog WHERE id = ?", (item_id,))

        await self._call(delete)

    async def attempted(self, item_id: int | str) -> None:
        def increment(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE backlog SET attempts = attempts + 1 WHERE id = ?", (item_id,))

        await self._call(increment)

    async def pending(self, session: str) -> int:
        def count(conn: sqlite3.Connection) -> int:
            query = "SELECT COUNT(*) FROM backlog WHERE session = ?"
            return int(conn.execute(query, (session,)).fetchone()[0])

        return await self._call(count)

    async def size(self) -> int:
        def count(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM backlog").fetchone()[0])

        return await self._call(count)

    async def kv_get(self, key: bytes) -> bytes | None:
        """Webhook intake memory that survives a restart (replay.SharedKV)."""
        now = self._clock()

        def get(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT value FROM seen WHERE key = ? AND expires > ?", (key, now)
            ).fetchone()
            return bytes(row[0]) if row is not None else None

        return await self._call(get)

    async def kv_put(self, key: bytes, value: bytes, ttl_s: float) -> None:
        now = self._clock()

        def put(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM seen WHERE expires <= ?", (now,))
                conn.execute(
                    "INSERT OR REPLACE INTO seen (key, value, expires) VALUES (?, ?, ?)",
                    (key, value, now + ttl_s),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        await self._call(put)


def _pending(row: Sequence[Any]) -> Pending:
    item_id, session, path, body, headers, timestamp, attempts, enqueued_at = row
    return Pending(
        id=int(item_id),
        session=str(session),
        path=str(path),
        body=bytes(body),
        headers=tuple((str(name), str(value)) for name, value in json.loads(headers)),
        timestamp=int(timestamp),
        attempts=int(attempts),
        enqueued_at=float(enqueued_at),
    )
