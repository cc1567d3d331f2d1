"""The shared store: Redis, for several routers in front of one pool.

Keys (all under `key_prefix`, nothing else is touched, nothing is ever flushed):

    {prefix}s:{session}  string: JSON [instance (null = tombstone), observed_at, source,
                         status]; one GET/MGET reads it, json.loads parses it in C, and
                         JSON floats are written with repr() so timestamps round-trip.
                         Tombstones expire after `tombstone_ttl_s`; live entries never do.
    {prefix}counts       hash: instance -> live sessions (what placement reads)
    {prefix}live         sorted set of live session ids, all scores 0, so ZRANGEBYLEX gives
                         the admin API's id-ordered cursor pages
    {prefix}changes      pub/sub channel: one message per stored observation
    {prefix}seen:{hex}   webhook replay / retry memory, with the TTL of its window
    {prefix}drained      set of drained instances (admin drain, shared by every router)
    {prefix}pool         pub/sub channel: {"instance": name, "draining": bool} per change
    {prefix}wh:*         the webhook backlog's streams (stream_backlog.py)

Every write goes through one Lua script (compare-and-set, counts, live set, TTL, publish),
so two routers racing can never let the older observation win, and the counts and the live
set never disagree with the entries. For Redis Cluster, put a hash tag in the prefix
(`{wa-router}:`) so all keys land in one slot, as the script requires.

Tombstone TTL is counted from the write, on Redis' clock (MemoryStore counts it from
`observed_at`): routers' clocks may disagree, Redis' is the only one all of them share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import PubSub
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import EqualJitterBackoff, NoBackoff

from ..aio import cancel_and_wait
from .base import DrainListener, Entry, Source

log = structlog.get_logger("wa_router.stores.redis")

Subscriber = Callable[[str, Entry | None], None]

# Ids per round trip when walking the live set: big enough that 100 k entries take ~100
# round trips, small enough that one batch never blocks Redis noticeably.
_BATCH = 1000
# Command connections per router, and how long a command waits for one when all are busy.
_MAX_CONNECTIONS = 64
_POOL_WAIT_S = 5.0
# Listener reconnect backoff: quick first retries (a restart takes well under a second),
# capped so a long outage costs one attempt every few seconds.
_RECONNECT_FIRST_S = 0.05
_RECONNECT_MAX_S = 2.0

# KEYS: 1 entry, 2 counts hash, 3 live set.
# ARGV: 1 session, 2 encoded entry, 3 observed_at (repr), 4 "1" live / "0" tombstone,
#       5 instance, 6 tombstone TTL (ms), 7 channel, 8 change payload, 9 status ("" when
#       none), 10 only-if instance ("" when none).
# Lua numbers are doubles and both tonumber() and cjson parse with strtod: the comparison
# is exact, like Python's.
_PUT_FN = """
local function put(key, counts, live, a)
  local old = redis.call('GET', key)
  if a[10] ~= '' then
    if not old or cjson.decode(old)[1] ~= a[10] then
      return 0
    end
  end
  if old then
    old = cjson.decode(old)
    -- may_replace() of stores/base.py. Time: equal times let the later arrival win, so
    -- only a strictly older one loses.
    if tonumber(a[3]) < old[2] then
      return 0
    end
    -- Status: a connected owner elsewhere is displaced only by a connected observation.
    if a[4] == '1' and old[1] ~= cjson.null and old[1] ~= a[5]
        and old[4] == 'connected' and a[9] ~= 'connected' then
      return 0
    end
    if old[1] ~= cjson.null then
      if redis.call('HINCRBY', counts, old[1], -1) <= 0 then
        redis.call('HDEL', counts, old[1])
      end
    end
  end
  if a[4] == '1' then
    -- A plain SET also drops the TTL of a tombstone it replaces.
    redis.call('SET', key, a[2])
    redis.call('HINCRBY', counts, a[5], 1)
    redis.call('ZADD', live, 0, a[1])
  else
    redis.call('SET', key, a[2], 'PX', a[6])
    redis.call('ZREM', live, a[1])
  end
  redis.call('PUBLISH', a[7], a[8])
  return 1
end
"""
_PUT_LUA = _PUT_FN + "return put(KEYS[1], KEYS[2], KEYS[3], ARGV)\n"
# A batch in one call (a first sync of 100 k sessions: ~400 calls, not 100 k). KEYS: counts,
# live, then one entry key per item; ARGV: the single script's 10 arguments per item.
_PUT_MANY_LUA = (
    _PUT_FN
    + """
local out = {}
for i = 3, #KEYS do
  local a = {}
  for j = 1, 10 do
    a[j] = ARGV[(i - 3) * 10 + j]
  end
  out[#out + 1] = put(KEYS[i], KEYS[1], KEYS[2], a)
end
return out
"""
)


def _fields(entry: Entry) -> list[Any]:
    return [entry.instance, float(entry.observed_at), entry.source.value, entry.status]


def encode_entry(entry: Entry) -> str:
    """The stored value. json writes floats with repr(): the timestamp round-trips."""
    return json.dumps(_fields(entry), separators=(",", ":"))


def decode_entry(raw: str | None) -> Entry | None:
    """A stored value back to the Entry that was put; None when the key does not exist."""
    if raw is None:
        return None
    instance, observed_at, source, status = json.loads(raw)
    return Entry(instance, float(observed_at), Source(source), status)


def encode_change(session: str, entry: Entry) -> str:
    """The pub/sub payload: the session, then the entry as stored."""
    return json.dumps([session, *_fields(entry)], separators=(",", ":"))


def decode_change(payload: str) -> tuple[str, Entry]:
    session, instance, observed_at, source, status = json.loads(payload)
    return str(session), Entry(instance, float(observed_at), Source(source), status)


# Commands: one short retry covers a pooled connection that died under us; a Redis that
# stays down surfaces quickly as ConnectionError for the caller to handle.
_COMMANDS: dict[str, Any] = {
    "decode_responses": True,
    "socket_connect_timeout": 2.0,
    "socket_timeout": 5.0,
    "retry": Retry(EqualJitterBackoff(cap=0.1, base=0.01), 1),
}
# Listener: its own client without retries, because redis-py's pubsub otherwise reconnects
# and resubscribes silently, and the messages missed meanwhile would go unnoticed. No
# socket timeout: a quiet channel is normal. The health-check PING (and TCP keepalive)
# turns a half-open connection into an error.
_LISTENER: dict[str, Any] = {
    "decode_responses": True,
    "socket_connect_timeout": 2.0,
    "socket_timeout": None,
    "socket_keepalive": True,
    "health_check_interval": 15,
    "retry": Retry(NoBackoff(), 0),
}


def connect(
    url: str,
    sentinels: tuple[tuple[str, int], ...] = (),
    master: str = "mymaster",
    *,
    decode: bool = True,
) -> tuple[aioredis.Redis, aioredis.Redis]:
    """The command client and the listener's client for one deployment. `decode=False`:
    replies as bytes (the webhook streams keep raw bodies)."""
    commands = {**_COMMANDS, "decode_responses": decode}
    listener = {**_LISTENER, "decode_responses": decode}
    if sentinels:
        return _sentinel_clients(url, sentinels, master, commands, listener)
    return _direct_clients(url, commands, listener)


def _direct_clients(
    url: str, commands: dict[str, Any], listener: dict[str, Any]
) -> tuple[aioredis.Redis, aioredis.Redis]:
    """redis://, rediss:// (TLS), unix://; user and password (ACL) from the URL. A
    blocking pool: a burst of requests waits for one of `_MAX_CONNECTIONS` instead of
    failing with "Too many connections". Options in the URL's query string win."""
    client = aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(
            url, max_connections=_MAX_CONNECTIONS, timeout=_POOL_WAIT_S, **commands
        )
    )
    return client, aioredis.Redis.from_url(url, **listener)


def _sentinel_clients(
    url: str,
    sentinels: tuple[tuple[str, int], ...],
    master: str,
    commands: dict[str, Any],
    listener: dict[str, Any],
) -> tuple[aioredis.Redis, aioredis.Redis]:
    """The master Sentinel names now (and after a failover): redis-py asks the sentinels
    on every new connection. Credentials and db come from `url` (its host is unused)."""
    auth: dict[str, Any] = {
        k: v for k, v in parse_url(url).items() if k in ("username", "password", "db")
    }
    # redis-py 8 types these calls, older releases do not: the ignores allow both.
    sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        list(sentinels), socket_timeout=1.0, socket_connect_timeout=1.0
    )
    client = sentinel.master_for(master, max_connections=_MAX_CONNECTIONS, **auth, **commands)
    return client, sentinel.master_for(master, **auth, **listener)


class RedisStore:
    """The `Store` protocol over Redis, plus change notifications for in-process caches.

    `start()` before use (it connects, loads the script and starts the listener);
    `close()` when done.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "wa-router:",
        tombstone_ttl_s: float = 600.0,
        sentinels: tuple[tuple[str, int], ...] = (),
        sentinel_master: str = "mymaster",
    ) -> None:
        self.key_prefix = key_prefix
        self.channel = f"{key_prefix}changes"
        self.pool_channel = f"{key_prefix}pool"
        self._drained_key = f"{key_prefix}drained"
        self._drain_listeners: list[DrainListener] = []
        self._counts_key = f"{key_prefix}counts"
        self._live_key = f"{key_prefix}live"
        self._tombstone_ttl_ms = max(1, round(tombstone_ttl_s * 1000))
        self._redis, self._listener_redis = connect(url, sentinels, sentinel_master)
        self._put_script = self._redis.register_script(_PUT_LUA)
        self._put_many_script = self._redis.register_script(_PUT_MANY_LUA)
        self._subscribers: list[Subscriber] = []
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    def _key(self, session: str) -> str:
        return f"{self.key_prefix}s:{session}"

    async def start(self) -> None:
        """Connect, load the script, subscribe; errors (Redis unreachable) propagate.

        Returns once subscribed: every change stored after `start()` is delivered."""
        if self._listener is not None:
            return
        await self._redis.script_load(_PUT_LUA)
        await self._redis.script_load(_PUT_MANY_LUA)
        pubsub = await self._subscribe()
        self._listener = asyncio.create_task(self._listen(pubsub), name="redis-store-listener")

    async def close(self) -> None:
        """Stop the listener and close both connection pools; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            await cancel_and_wait(self._listener)
            self._listener = None
        await self._listener_redis.aclose()
        await self._redis.aclose()

    def subscribe(self, callback: Subscriber) -> None:
        """Call `callback(session, entry)` for every change any router stores (this one's
        included), from the listener task: `entry` is the new Entry, or None when the
        session was forgotten (tombstone).

        `callback("", None)` means everything may have changed: the listener lost its
        connection and messages may have been missed, so drop the whole cache. It is sent
        once the listener is subscribed again, so nothing after it is missed.

        Callbacks must be quick and must not block; an exception is logged and ignored.
        """
        self._subscribers.append(callback)

    async def get(self, session: str) -> Entry | None:
        # decode_responses=True: str, whatever the (bytes | str) annotations say.
        return decode_entry(cast("str | None", await self._redis.get(self._key(session))))

    async def get_many(self, sessions: list[str]) -> list[Entry | None]:
        """One MGET for a batch: sync checks 100 k sessions, not 100 k round trips."""
        if not sessions:
            return []
        rows = cast("list[str | None]", await self._redis.mget([self._key(s) for s in sessions]))
        return [decode_entry(raw) for raw in rows]

    async def put(self, session: str, entry: Entry, *, only_if: str | None = None) -> bool:
        stored = await self._put_script(
            keys=[self._key(session), self._counts_key, self._live_key],
            args=self._put_args(session, entry, only_if),
        )
        return bool(stored)

    async def put_many(self, items: list[tuple[str, Entry]]) -> list[bool]:
        """`put` of each (no `only_if`), in one script call."""
        if not items:
            return []
        args: list[Any] = []
        for session, entry in items:
            args += self._put_args(session, entry, None)
        stored = await self._put_many_script(
            keys=[self._counts_key, self._live_key, *(self._key(s) for s, _ in items)],
            args=args,
        )
        return [bool(x) for x in stored]

    def _put_args(self, session: str, entry: Entry, only_if: str | None) -> list[Any]:
        return [
            session,
            encode_entry(entry),
            repr(float(entry.observed_at)),
            "1" if entry.instance is not None else "0",
            entry.instance or "",
            self._tombstone_ttl_ms,
            self.channel,
            encode_change(session, entry),
            entry.status or "",
            only_if or "",
        ]

    async def kv_get(self, key: bytes) -> bytes | None:
        """Webhook intake memory shared by every router (replay.SharedKV)."""
        value = await self._redis.get(f"{self.key_prefix}seen:{key.hex()}")
        return bytes.fromhex(value) if isinstance(value, str) else None

    async def kv_put(self, key: bytes, value: bytes, ttl_s: float) -> None:
        name = f"{self.key_prefix}seen:{key.hex()}"
        await self._redis.set(name, value.hex(), px=max(1, round(ttl_s * 1000)))

    async def counts(self) -> dict[str, int]:
        raw = cast("dict[str, str]", await self._redis.hgetall(self._counts_key))
        counts = {name: int(n) for name, n in raw.items()}
        return {name: n for name, n in counts.items() if n > 0}

    async def items(self) -> AsyncIterator[tuple[str, Entry]]:
        """Every live entry, in id order (walking the live set by id: no duplicates, unlike
        ZSCAN, and entries added or removed meanwhile are simply seen or not)."""
        after: str | None = None
        while True:
            ids, batch = await self._batch(after, _BATCH)
            for item in batch:
                yield item
            if len(ids) < _BATCH:
                return
            after = ids[-1]

    async def page(
        self, *, after: str | None, limit: int, instance: str | None = None
    ) -> list[tuple[str, Entry]]:
        out: list[tuple[str, Entry]] = []
        while len(out) < limit:
            # Filtering by instance may discard most of a batch: read whole batches then.
            count = min(limit - len(out) if instance is None else _BATCH, _BATCH)
            ids, batch = await self._batch(after, count)
            out.extend((s, e) for s, e in batch if instance is None or e.instance == instance)
            if len(ids) < count:
                break
            after = ids[-1]
        return out[:limit]

    async def _batch(
        self, after: str | None, count: int
    ) -> tuple[list[str], list[tuple[str, Entry]]]:
        """Up to `count` ids of the live set above `after`, and their live entries (an id
        tombstoned between the two reads is skipped)."""
        lo = "-" if after is None else f"({after}"
        ids = cast(
            "list[str]", await self._redis.zrangebylex(self._live_key, lo, "+", start=0, num=count)
        )
        if not ids:
            return ids, []
        rows = cast("list[str | None]", await self._redis.mget([self._key(s) for s in ids]))
        live: list[tuple[str, Entry]] = []
        for session, raw in zip(ids, rows, strict=True):
            entry = decode_entry(raw)
            if entry is not None and entry.instance is not None:
                live.append((session, entry))
        return ids, live

    async def _subscribe(self) -> PubSub:
        pubsub = self._listener_redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel, self.pool_channel)
        except BaseException:
            await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
            raise
        return pubsub

    async def _listen(self, pubsub: PubSub | None) -> None:
        """Deliver changes until cancelled; on any failure, resubscribe with backoff and
        tell subscribers to drop everything (what was missed cannot be known)."""
        delay_s = _RECONNECT_FIRST_S
        while True:
            try:
                if pubsub is None:
                    pubsub = await self._subscribe()
                    log.info("redis_listener_resumed", channel=self.channel)
                    delay_s = _RECONNECT_FIRST_S
                    self._notify("", None)
                    self._notify_drain(None, False)
                while True:
                    # A timeout, not a blocking read: redis-py sends its health-check PING
                    # only from inside this call.
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        if message.get("channel") == self.pool_channel:
                            self._deliver_drain(message["data"])
                        else:
                            self._deliver(message["data"])
            except Exception as exc:  # the listener must outlive any failure
                log.warning(
                    "redis_listener_reconnect",
                    channel=self.channel,
                    error=f"{type(exc).__name__}: {exc}",
                    delay_s=delay_s,
                )
                await self._drop(pubsub)
                pubsub = None
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, _RECONNECT_MAX_S)
            except asyncio.CancelledError:
                await self._drop(pubsub)
                raise

    @staticmethod
    async def _drop(pubsub: PubSub | None) -> None:
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]

    def _deliver(self, payload: Any) -> None:
        try:
            session, entry = decode_change(str(payload))
        except (ValueError, TypeError, KeyError) as exc:
            log.warning(
                "redis_change_malformed", channel=self.channel, error=f"{type(exc).__name__}: {exc}"
            )
            return
        self._notify(session, entry if entry.instance is not None else None)

    async def set_draining(self, instance: str, draining: bool) -> None:
        payload = json.dumps({"instance": instance, "draining": draining})
        async with self._redis.pipeline(transaction=True) as pipe:
            if draining:
                pipe.sadd(self._drained_key, instance)
            else:
                pipe.srem(self._drained_key, instance)
            pipe.publish(self.pool_channel, payload)
            await pipe.execute()

    async def drained(self) -> set[str]:
        return {str(m) for m in await self._redis.smembers(self._drained_key)}

    def on_draining(self, callback: DrainListener) -> None:
        self._drain_listeners.append(callback)

    def _deliver_drain(self, payload: Any) -> None:
        try:
            doc = json.loads(str(payload))
            instance, draining = str(doc["instance"]), bool(doc["draining"])
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("redis_drain_malformed", error=f"{type(exc).__name__}: {exc}")
            return
        self._notify_drain(instance, draining)

    def _notify_drain(self, instance: str | None, draining: bool) -> None:
        for callback in list(self._drain_listeners):
            try:
                callback(instance, draining)
            except Exception:
                log.exception("redis_drain_subscriber_failed", instance=instance)

    def _notify(self, session: str, entry: Entry | None) -> None:
        for callback in list(self._subscribers):
            try:
                callback(session, entry)
            except Exception:
                log.exception("redis_subscriber_failed", session=session)
