"""The webhook backlog in Redis Streams, for several routers (or `--workers N`) on one Redis.

Keys (under the store's `key_prefix`):

    {prefix}wh:{n}           stream of shard n: one entry per waiting webhook; a session's
                             events all go to one shard (crc32), so its order is the
                             stream's; consumer group `relay`
    {prefix}wh:{n}:lease     the router that delivers shard n now (SET NX PX, renewed)
    {prefix}wh:pending       hash: session -> entries waiting
    {prefix}wh:size          entries waiting in all shards (the max_items bound)
    {prefix}wh:consumers     sorted set: routers delivering, scored by when they lapse
    {prefix}wh:id:{webhook}  an event appended in the last 10 minutes (no second copy)
    {prefix}wh:hold:{id}     an entry whose delivery timed out: not sent again before it
                             expires (webhooks.inflight_s), by whichever router holds it next

Every router takes intake into the streams; each shard is delivered by one router at a time
(its lease), so a session's events reach Laravel in the order they were accepted, whichever
router accepted them. A router that dies stops renewing its leases; after `claim_after_s`
another takes the shard and claims (XAUTOCLAIM) the entries the dead one had read but not
acknowledged. An entry leaves the stream (XACK + XDEL, counts) in one script, right after
Laravel's answer.

When Redis cannot be reached within the store deadline, a webhook is accepted into a local
SQLite spool instead (Node gets its answer within a second whatever Redis does), and moved
to its stream, oldest first, once Redis answers again. While the spool holds anything, new
webhooks join it behind, so this router's order per session is kept across the outage.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, cast

import redis.asyncio as aioredis
import structlog

from .backlog import Pending, SqliteBacklog
from .breaker import Breaker
from .stores.redis import connect

log = structlog.get_logger("wa_router.stream_backlog")

GROUP = "relay"

# KEYS: 1 stream, 2 pending hash, 3 size, 4 the event's id key.
# ARGV: 1 max items, 2 session, 3 id key TTL (ms), 4.. field/value.
# The id key makes a second append of one event (an XADD that timed out at the client but
# ran once Redis answered, then the same event moved from the spool) a no-op.
_APPEND_LUA = """
if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[3]) then return 'duplicate' end
local size = tonumber(redis.call('GET', KEYS[3]) or '0')
if size >= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[4])
  return false
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('INCR', KEYS[3])
return id
"""

# KEYS: 1 stream, 2 pending hash, 3 size. ARGV: 1 group, 2 entry id, 3 session.
# XACK says whether it was still pending: a second ack (the entry was claimed and
# delivered elsewhere meanwhile) changes no count.
_ACK_LUA = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('HINCRBY', KEYS[2], ARGV[3], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[3]) end
if redis.call('DECR', KEYS[3]) < 0 then redis.call('SET', KEYS[3], '0') end
return 1
"""

# KEYS: 1 lease. ARGV: 1 holder, 2 ttl ms. Renewed only by its holder.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: 1 lease. ARGV: 1 holder.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: 1 consumers. ARGV: 1 me, 2 ttl ms. On Redis' clock, the one all routers share.
_HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# How long an appended event's id is remembered: well past a spool's move after Redis
# answers again (seconds), small enough to cost little (one short key per event).
_ID_TTL_MS = 600_000

# Consumers of the group that left nothing pending and were idle this long are removed
# (each router process is a new consumer; without this the group's list only grows).
_FORGET_CONSUMER_MS = 3_600_000


def _lock(spool: Path) -> IO[bytes] | None:
    """This process's claim on a spool file (released when the process ends, however);
    None when another process holds it."""
    spool.parent.mkdir(parents=True, exist_ok=True)
    handle = open(spool.with_suffix(".lock"), "ab")  # noqa: SIM115 - kept open: the lock
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def shard_of(session: str, shards: int) -> int:
    return zlib.crc32(session.encode()) % shards


def encode_fields(
    session: str,
    path: str,
    body: bytes,
    headers: Sequence[tuple[str, str]],
    timestamp: int,
    enqueued_at: float,
) -> list[Any]:
    return [
        b"session",
        session.encode(),
        b"path",
        path.encode(),
        b"body",
        bytes(body),
        b"headers",
        json.dumps([list(h) for h in headers]).encode(),
        b"ts",
        str(timestamp).encode(),
        b"at",
        repr(float(enqueued_at)).encode(),
    ]


def decode_entry(entry_id: bytes, fields: dict[bytes, bytes], attempts: int = 0) -> Pending:
    return Pending(
        id=entry_id.decode(),
        session=fields[b"session"].decode(),
        path=fields[b"path"].decode(),
        body=fields[b"body"],
        headers=tuple((str(k), str(v)) for k, v in json.loads(fields[b"headers"])),
        timestamp=int(fields[b"ts"]),
        attempts=attempts,
        enqueued_at=float(fields[b"at"]),
    )


class StreamBacklog:
    """`backlog.Backlog` in Redis Streams (with a local spool), plus the stream operations
    `stream_relay.StreamRelay` delivers with."""

    direct = False  # order across routers lives in the stream: every event goes through it

    def __init__(
        self,
        url: str,
        spool: SqliteBacklog,
        *,
        key_prefix: str = "wa-router:",
        shards: int = 16,
        max_items: int = 100_000,
        sentinels: tuple[tuple[str, int], ...] = (),
        sentinel_master: str = "mymaster",
        deadline_s: float = 0.25,
        breaker_s: float = 1.0,
        breaker: Breaker | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.shards = shards
        self.spool = spool
        self._prefix = f"{key_prefix}wh:"
        self._pending_key = f"{self._prefix}pending"
        self._size_key = f"{self._prefix}size"
        self.consumers_key = f"{self._prefix}consumers"
        self._max_items = max_items
        self._breaker = breaker or Breaker(deadline_s, breaker_s, monotonic)
        self._deadline_s = self._breaker.deadline_s
        self._clock = clock
        self._monotonic = monotonic
        self.redis, self._unused = connect(url, sentinels, sentinel_master, decode=False)
        # Blocking reads (one per held shard) get their own pool: they never take the
        # connections an append or an ack needs.
        self._reader, self._unused_too = connect(url, sentinels, sentinel_master, decode=False)
        self._append = self.redis.register_script(_APPEND_LUA)
        self._ack = self.redis.register_script(_ACK_LUA)
        self._renew = self.redis.register_script(_RENEW_LUA)
        self._release = self.redis.register_script(_RELEASE_LUA)
        self._heartbeat = self.redis.register_script(_HEARTBEAT_LUA)
        self._lock: IO[bytes] | None = None
        self._spooled = 0  # items in the spool (known here: only this process writes it)
        self.spool_wake = asyncio.Event()
        self.store_errors = 0
        self.moved = 0

    def stream(self, shard: int) -> bytes:
        return f"{self._prefix}{shard}".encode()

    def lease_key(self, shard: int) -> bytes:
        return f"{self._prefix}{shard}:lease".encode()

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._lock = _lock(self.spool.path)
        if self._lock is None:
            log.error("webhook_spool_in_use", path=str(self.spool.path))
        await self.spool.open()
        await self._adopt_orphans()
        self._spooled = await self.spool.size()
        if self._spooled:
            log.info("webhook_spool_found", items=self._spooled)
            self.spool_wake.set()

    async def _adopt_orphans(self) -> None:
        """Spools that no running process holds (a worker that is gone: fewer workers
        now, or one router's old files): their webhooks join this spool, oldest first."""
        for path in sorted(self.spool.path.parent.glob("webhooks-spool*.sqlite3")):
            if path == self.spool.path:
                continue
            lock = _lock(path)
            if lock is None:
                continue  # a live process has it
            try:
                orphan = SqliteBacklog(path)
                await orphan.open()
                try:
                    adopted = 0
                    while items := await orphan.oldest(100):
                        for item in items:
                            await self.spool.append(
                                session=item.session,
                                path=item.path,
                                body=item.body,
                                headers=item.headers,
                                timestamp=item.timestamp,
                                enqueued_at=item.enqueued_at,
                            )
                            await orphan.ack(item.id)
                            adopted += 1
                finally:
                    await orphan.close()
                if adopted:
                    log.info("webhook_spool_adopted", path=str(path), items=adopted)
            finally:
                lock.close()

    async def close(self) -> None:
        try:
            await self.spool.close()
            if self._lock is not None:
                self._lock.close()
        finally:
            for client in (self._unused, self._unused_too, self._reader, self.redis):
                await client.aclose()

    # -- intake ----------------------------------------------------------------------------

    def failed(self, op: str, exc: BaseException) -> None:
        """Redis did not answer in time: the spool takes intake for a moment."""
        self.store_errors += 1
        self._breaker.trip()
        log.warning("webhook_stream_unavailable", op=op, error=type(exc).__name__)

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
        """Into the stream, or into the spool while Redis is away or the spool not yet
        empty. One session's appends must come one at a time (the intake's per-session
        lock): an append that sees the spool non-empty joins it behind the earlier ones."""
        at = self._clock() if enqueued_at is None else enqueued_at
        # Its own attempt decides, not the shared breaker: a slow directory call elsewhere
        # must not send this event to the spool while other routers append to the stream
        # (their events of its session would then go first).
        if not self._spooled:
            try:
                async with asyncio.timeout(self._deadline_s):
                    return await self.add(session, path, body, headers, timestamp, at)
            except (TimeoutError, aioredis.RedisError, OSError) as exc:
                # It may still run once Redis answers: the spool's move of the same event
                # then finds its id and adds no second copy.
                self.failed("append", exc)
        self._spooled += 1  # before the await: a later append of this session spools too
        try:
            item = await self.spool.append(
                session=session,
                path=path,
                body=body,
                headers=headers,
                timestamp=timestamp,
                enqueued_at=at,
            )
        except BaseException:
            self._spooled -= 1
            raise
        if item is None:
            self._spooled -= 1
        else:
            self.spool_wake.set()
        return item

    async def add(
        self,
        session: str,
        path: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        timestamp: int,
        enqueued_at: float,
    ) -> str | None:
        """XADD to the session's shard (None: full). Raises what Redis raises."""
        stream = self.stream(shard_of(session, self.shards))
        fields = encode_fields(session, path, body, headers, timestamp, enqueued_at)
        event_id = next((v for k, v in headers if k.lower() == "x-webhook-id"), "")
        id_key = f"{self._prefix}id:{event_id or uuid.uuid4().hex}"
        entry = await self._append(
            keys=[stream, self._pending_key, self._size_key, id_key],
            args=[self._max_items, session, _ID_TTL_MS, *fields],
        )
        return None if entry is None else cast("bytes", entry).decode()

    async def move_spool(self, batch: int = 100) -> int:
        """Move spooled items to their streams, oldest first; returns how many moved.
        Raises what Redis raises (the caller backs off)."""
        moved = 0
        while True:
            items = await self.spool.oldest(batch)
            if not items:
                break
            for item in items:
                async with asyncio.timeout(self._deadline_s * 4):
                    entry = await self.add(
                        item.session,
                        item.path,
                        item.body,
                        item.headers,
                        item.timestamp,
                        item.enqueued_at,
                    )
                if entry is None:
                    return moved  # the streams are full: the rest stays spooled
                await self.spool.ack(item.id)
                self._spooled -= 1  # at 0, appends go to Redis again, behind these
                moved += 1
                self.moved += 1
        return moved

    @property
    def spooled(self) -> int:
        return self._spooled

    async def pending(self, session: str) -> int:
        local = await self.spool.pending(session)
        if self._breaker.open:
            return local
        try:
            async with asyncio.timeout(self._deadline_s):
                raw = await self.redis.hget(self._pending_key, session)
        except (TimeoutError, aioredis.RedisError, OSError) as exc:
            self.failed("pending", exc)
            return local
        return local + int(raw or 0)

    async def stream_size(self) -> int:
        """Entries waiting in the streams (raises what Redis raises)."""
        return int(await self.redis.get(self._size_key) or 0)

    async def size(self) -> int:
        if self._breaker.open:
            return self._spooled  # what is in Redis is not known this moment
        try:
            async with asyncio.timeout(self._deadline_s):
                raw = await self.redis.get(self._size_key)
        except (TimeoutError, aioredis.RedisError, OSError) as exc:
            self.failed("size", exc)
            raw = None
        return self._spooled + int(raw or 0)

    # -- delivery (stream_relay.py) --------------------------------------------------------

    async def ensure_group(self, shard: int) -> None:
        try:
            await self.redis.xgroup_create(self.stream(shard), GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def claim(self, shard: int, consumer: str, batch: int = 256) -> list[Pending]:
        """Every entry read but not acknowledged, whoever read it, now ours, oldest first.
        Called holding the shard's lease: whoever read them before has lost it."""
        stream = self.stream(shard)
        out: list[Pending] = []
        start: bytes | str = "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                stream, GROUP, consumer, min_idle_time=0, start_id=start, count=batch
            )
            cursor, entries = reply[0], reply[1]
            for entry_id, fields in entries:
                if fields:  # None: deleted while pending
                    out.append(decode_entry(entry_id, fields, attempts=1))
                else:
                    await self.redis.xack(stream, GROUP, entry_id)
            if cursor in (b"0-0", "0-0"):
                return out
            start = cursor

    async def read(self, shard: int, consumer: str, count: int, block_ms: int) -> list[Pending]:
        """New entries (never read by anyone), waiting up to `block_ms` for one."""
        return await self._read(shard, consumer, ">", count, block_ms)

    async def read_mine(self, shard: int, consumer: str, after: str, count: int) -> list[Pending]:
        """Entries already read by `consumer` and not acknowledged, with ids above `after`:
        what a read whose reply was lost (timeout, reset, a retried command) handed us."""
        return await self._read(shard, consumer, after, count, None)

    async def _read(
        self, shard: int, consumer: str, start: str, count: int, block_ms: int | None
    ) -> list[Pending]:
        stream = self.stream(shard)
        reply = cast(
            "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes] | None]]]] | None",
            await self._reader.xreadgroup(
                GROUP, consumer, {stream: start}, count=count, block=block_ms
            ),
        )
        out: list[Pending] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                if fields:
                    out.append(decode_entry(entry_id, fields))
                else:  # deleted while pending: nothing to deliver
                    await self.redis.xack(stream, GROUP, entry_id)
        return out

    async def hold(self, item_id: str, ttl_s: float) -> None:
        """A delivery of it timed out: Laravel may still be processing it."""
        await self.redis.set(self._hold_key(item_id), b"1", px=max(1, round(ttl_s * 1000)))

    async def held_for(self, item_id: str) -> float:
        """Seconds before it may be sent again (0: now)."""
        ms = int(await self.redis.pttl(self._hold_key(item_id)))
        return max(ms, 0) / 1000

    def _hold_key(self, item_id: str) -> bytes:
        return f"{self._prefix}hold:{item_id}".encode()

    async def lease_owners(self) -> list[str | None]:
        """Who holds each shard now (None: nobody)."""
        raw = await self.redis.mget([self.lease_key(n) for n in range(self.shards)])
        return [None if v is None else cast("bytes", v).decode() for v in raw]

    async def ack(self, shard: int, item: Pending) -> bool:
        done = await self._ack(
            keys=[self.stream(shard), self._pending_key, self._size_key],
            args=[GROUP, str(item.id), item.session],
        )
        return bool(done)

    async def take_lease(self, shard: int, consumer: str, ttl_ms: int) -> bool:
        return bool(await self.redis.set(self.lease_key(shard), consumer, nx=True, px=ttl_ms))

    async def renew_lease(self, shard: int, consumer: str, ttl_ms: int) -> bool:
        return bool(await self._renew(keys=[self.lease_key(shard)], args=[consumer, ttl_ms]))

    async def release_lease(self, shard: int, consumer: str) -> None:
        await self._release(keys=[self.lease_key(shard)], args=[consumer])

    async def heartbeat(self, consumer: str, ttl_ms: int) -> list[str]:
        """Say this router delivers; returns the routers that do now (this one included)."""
        live = await self._heartbeat(keys=[self.consumers_key], args=[consumer, ttl_ms])
        return [m.decode() if isinstance(m, bytes) else str(m) for m in live]

    async def leave(self, consumer: str) -> None:
        await self.redis.zrem(self.consumers_key, consumer)

    async def forget_idle_consumers(self, shard: int, me: str) -> None:
        for info in await self.redis.xinfo_consumers(self.stream(shard), GROUP):
            name = info.get("name")
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name != me and not info.get("pending") and info.get("idle", 0) > _FORGET_CONSUMER_MS:
                await self.redis.xgroup_delconsumer(self.stream(shard), GROUP, name)
