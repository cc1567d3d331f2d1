"""Delivering the Redis Stream backlog: each shard by one router at a time, in order.

Each round (a quarter of `claim_after_s`) a router says it is alive, renews the leases of
the shards it holds, takes free ones up to its share (shards divided by the routers
alive) and any that stayed free a whole round (their holder died, or nobody counted
them), and hands one back when another router is below its share. For each shard it
holds it claims what a previous holder left unacknowledged (`XAUTOCLAIM`), reads new
entries as they come (a blocking XREADGROUP wakes at once on an XADD from any router),
and delivers each session's entries one after another, sessions side by side. An entry
is acknowledged right after Laravel's answer, so a router killed mid-delivery leaves at
most the one entry per session that was in flight for the next holder to send again.

A delivery starts only while the lease has more than the relay timeout left: whatever a
holder that lost its lease (hung, cut off from Redis) has in flight has ended before the
next holder can take the shard. A delivery whose outcome is unknown (timed out) leaves a
hold in Redis, so the next holder too waits `inflight_s` before sending it again.

A read whose reply was lost (a timeout, a reset, a command retried by the client) may
still have handed entries to this router in Redis: after any failed read, this router's
own unacknowledged entries above the last one it has are read back before new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import socket
import time
import uuid
import zlib
from collections import Counter, deque
from collections.abc import Callable

import structlog

from .aio import cancel_and_wait
from .backlog import Pending
from .delivery import Relay
from .stream_backlog import StreamBacklog

log = structlog.get_logger("wa_router.stream_relay")

_READ_COUNT = 256
_READ_BLOCK_MS = 1000
# Read ahead per shard while its sessions wait (Laravel down): beyond this the rest stays
# in the stream, unread. Bounded in entries and in bytes (bodies are up to 1 MiB).
_WINDOW_MAX = 4096
_WINDOW_MAX_BYTES = 32 * 1024 * 1024
_CONCURRENCY = 16  # deliveries in flight per router
_RETRY_S = 0.5
# Backing-off sessions are woken by a success at most this often: one event Laravel keeps
# refusing (5xx) while it takes the others is then tried once a second, not on every one.
_WAKE_EVERY_S = 1.0
# While every session backs off from a Laravel outage, one of them is tried this often.
_PROBE_S = 2.0


def consumer_name() -> str:
    """Unique per process start: a restarted router is a new consumer, and what its
    previous life left pending is claimed like any dead router's."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def stream_id(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)


def rebalance(
    mine: int, shards: int, owners: list[str | None], live: list[str], me: str
) -> tuple[int, int]:
    """(free shards to take, shards to hand back). The share is ceil(shards / routers
    alive); shards go back only beyond it, and only as many as the other live routers
    lack of floor(shards / routers) (never to nobody)."""
    routers = max(1, len(live))
    share = math.ceil(shards / routers)
    held = Counter(o for o in owners if o is not None)
    lacking = sum(max(0, shards // routers - held[r]) for r in live if r != me)
    return max(0, share - mine), min(max(0, mine - share), lacking)


class _Shard:
    """One held shard: what was read of it and not yet acknowledged, per session."""

    def __init__(self, n: int, lease_until: float) -> None:
        self.n = n
        self.sessions: dict[str, deque[Pending]] = {}
        self.size = 0
        self.bytes = 0
        self.last_id = "0-0"  # the newest entry added: reads resume after it
        self.lost_read = False  # a read failed: read back our own entries first
        self.busy: set[str] = set()  # sessions with a delivery task running
        self.tasks: set[asyncio.Task[None]] = set()
        self.reader: asyncio.Task[None] | None = None
        self.lease_until = lease_until  # monotonic, from when the renewal was sent
        self.stopped = asyncio.Event()

    def add(self, item: Pending) -> bool:
        if stream_id(str(item.id)) <= stream_id(self.last_id):
            return False  # already here (read back after a lost reply)
        self.sessions.setdefault(item.session, deque()).append(item)
        self.size += 1
        self.bytes += len(item.body)
        self.last_id = str(item.id)
        return True

    @property
    def full(self) -> bool:
        return self.size >= _WINDOW_MAX or self.bytes >= _WINDOW_MAX_BYTES

    async def pause(self, delay_s: float, also: asyncio.Event | None = None) -> None:
        """Wait `delay_s`, or less when the shard is given up (or `also` is set)."""
        waits = [asyncio.ensure_future(self.stopped.wait())]
        if also is not None:
            waits.append(asyncio.ensure_future(also.wait()))
        try:
            await asyncio.wait(waits, timeout=delay_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


class StreamRelay:
    def __init__(
        self,
        backlog: StreamBacklog,
        relay: Relay,
        *,
        claim_after_s: float = 20.0,
        consumer: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if claim_after_s <= relay.timeout_s:
            raise ValueError("claim_after_s must be longer than the relay timeout")
        self._backlog = backlog
        self.relay = relay
        self.consumer = consumer or consumer_name()
        self._lease_ms = max(1, round(claim_after_s * 1000))
        self._renew_every_s = claim_after_s / 4
        self._monotonic = monotonic
        self._held: dict[int, _Shard] = {}
        self._leaving: set[asyncio.Task[None]] = set()
        self._free_before: set[int] = set()
        self._sem = asyncio.Semaphore(_CONCURRENCY)
        self._closing = asyncio.Event()
        # Sessions backing off from a Laravel outage, each with the event that wakes it:
        # all of them when Laravel takes an event again (they go now, not each at the end
        # of its own backoff), one at a time every _PROBE_S to notice that it does.
        self._sleepers: dict[tuple[int, str], asyncio.Event] = {}
        self._last_attempt = float("-inf")
        self._woken_at = float("-inf")
        self._last_size = 0  # the streams' size at the last round
        self.routers = 1  # delivering routers, as the last heartbeat counted them
        self.acks_failed = 0

    @property
    def held(self) -> list[int]:
        return sorted(self._held)

    def wake(self) -> None:
        """An XADD wakes the shard's blocking read by itself."""

    def hold(self, session: str) -> None:
        """Nothing is relayed directly here: every attempt is the stream's own."""

    def close(self) -> None:
        """Stop: `run()` gives its shards back (deliveries in flight end first) and returns.
        An event rather than a cancel: cleanup that a cancel interrupted would leave
        leases held and deliveries running."""
        self._closing.set()

    # -- the leases ------------------------------------------------------------------------

    async def run(self) -> None:
        spool = asyncio.create_task(self._move_spool(), name="webhook-spool-move")
        probe = asyncio.create_task(self._probe(), name="webhook-probe")
        try:
            while not self._closing.is_set():
                try:
                    await self._round()
                except Exception as exc:
                    log.warning("webhook_stream_round_failed", error=type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._renew_every_s):
                        await self._closing.wait()
        finally:
            await cancel_and_wait(probe)
            await cancel_and_wait(spool)
            await self._stop_all()

    async def _round(self) -> None:
        b = self._backlog
        live = await b.heartbeat(self.consumer, self._lease_ms)
        self.routers = max(1, len(live))
        for n, shard in list(self._held.items()):
            sent = self._monotonic()
            if await b.renew_lease(n, self.consumer, self._lease_ms):
                shard.lease_until = sent + self._lease_ms / 1000
            else:
                log.warning("webhook_shard_lost", shard=n, consumer=self.consumer)
                self._give_up(n, release=False)
        owners = await b.lease_owners()
        take, give_back = rebalance(len(self._held), b.shards, owners, live, self.consumer)
        free = {n for n, owner in enumerate(owners) if owner is None}
        # Free ones first from this router's own place in the ring (routers spread out),
        # then any that stayed free since the last round: nobody else is taking them.
        order = [(self._first() + i) % b.shards for i in range(b.shards)]
        wanted = [n for n in order if n in free][:take]
        wanted += [n for n in order if n in free & self._free_before and n not in wanted]
        self._free_before = free
        for n in wanted:
            if self._closing.is_set():
                return
            sent = self._monotonic()
            if await b.take_lease(n, self.consumer, self._lease_ms):
                await self._start(n, sent + self._lease_ms / 1000)
        for n in sorted(self._held, reverse=True)[:give_back]:
            self._give_up(n, release=True)
        # Another router's deliveries going through means Laravel answers again: the
        # sessions here that back off from its outage need not wait out their backoff.
        size = await b.stream_size()
        if self._sleepers and size < self._last_size:
            self._wake_backing_off()
        self._last_size = size

    def _first(self) -> int:
        return zlib.crc32(self.consumer.encode()) % self._backlog.shards

    def _wake_backing_off(self) -> None:
        now = self._monotonic()
        if now - self._woken_at >= _WAKE_EVERY_S:
            self._woken_at = now
            for wake in self._sleepers.values():
                wake.set()

    async def _probe(self) -> None:
        """While every session here backs off, wake the one asleep longest every
        `_PROBE_S`: Laravel's return is noticed within that, not at the end of backoffs
        that grow to retry_max_s. (In-flight holds are not sleepers: never probed.)"""
        while True:
            await asyncio.sleep(_PROBE_S)
            if self._sleepers and self._monotonic() - self._last_attempt >= _PROBE_S:
                next(iter(self._sleepers.values())).set()

    def _leased(self, shard: _Shard) -> bool:
        return shard.lease_until - self._monotonic() > self.relay.timeout_s

    async def _start(self, n: int, lease_until: float) -> None:
        b = self._backlog
        shard = _Shard(n, lease_until)
        try:
            await b.ensure_group(n)
            for item in await b.claim(n, self.consumer):
                shard.add(item)
        except BaseException:
            # Give it back now rather than sit on a lease with nothing reading the shard.
            with contextlib.suppress(Exception):
                await b.release_lease(n, self.consumer)
            raise
        with contextlib.suppress(Exception):
            await b.forget_idle_consumers(n, self.consumer)
        self._held[n] = shard
        log.info("webhook_shard_taken", shard=n, claimed=shard.size, consumer=self.consumer)
        shard.reader = asyncio.create_task(self._read(shard), name=f"webhook-shard-{n}")
        self._kick(shard)

    def _give_up(self, n: int, *, release: bool) -> None:
        """No new attempt from now on; in the background, let the one in flight per session
        end, then hand the lease back (the next holder claims what is left). The round
        does not wait for it."""
        shard = self._held.pop(n, None)
        if shard is None:
            return
        shard.stopped.set()
        task = asyncio.create_task(self._wind_down(shard, release), name=f"webhook-leave-{n}")
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def _wind_down(self, shard: _Shard, release: bool) -> None:
        if shard.reader is not None:
            await cancel_and_wait(shard.reader)
        await asyncio.gather(*shard.tasks, return_exceptions=True)
        if release:
            with contextlib.suppress(Exception):
                await self._backlog.release_lease(shard.n, self.consumer)
            log.info("webhook_shard_released", shard=shard.n, consumer=self.consumer)

    async def _stop_all(self) -> None:
        for n in list(self._held):
            self._give_up(n, release=True)
        if self._leaving:
            await asyncio.gather(*self._leaving, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._backlog.leave(self.consumer)

    # -- one shard -------------------------------------------------------------------------

    async def _read(self, shard: _Shard) -> None:
        b = self._backlog
        while not shard.stopped.is_set():
            if shard.full or not self._leased(shard):
                await shard.pause(0.1)
                continue
            try:
                if shard.lost_read:
                    items = await b.read_mine(shard.n, self.consumer, shard.last_id, _READ_COUNT)
                    shard.lost_read = bool(items)  # until nothing of ours is left unseen
                else:
                    items = await b.read(shard.n, self.consumer, _READ_COUNT, _READ_BLOCK_MS)
            except Exception as exc:
                # Redis may have handed us entries whose reply we never saw.
                shard.lost_read = True
                log.warning("webhook_stream_read_failed", shard=shard.n, error=type(exc).__name__)
                if "NOGROUP" in str(exc):  # the stream was deleted under us
                    with contextlib.suppress(Exception):
                        await b.ensure_group(shard.n)
                await shard.pause(_RETRY_S)
                continue
            if any([shard.add(item) for item in items]):
                self._kick(shard)

    def _kick(self, shard: _Shard) -> None:
        """A delivery task for each session with something waiting and none running."""
        for session in shard.sessions:
            if session not in shard.busy:
                shard.busy.add(session)
                task = asyncio.create_task(self._deliver(shard, session))
                shard.tasks.add(task)
                task.add_done_callback(shard.tasks.discard)

    async def _deliver(self, shard: _Shard, session: str) -> None:
        """`session`'s entries, one after another, while the shard is ours."""
        queue = shard.sessions[session]
        try:
            while queue and not shard.stopped.is_set():
                try:
                    await self._deliver_head(shard, queue)
                except Exception:
                    log.exception("webhook_delivery_error", shard=shard.n, session=session)
                    await shard.pause(_RETRY_S)
        finally:
            shard.busy.discard(session)
            if not queue:
                shard.sessions.pop(session, None)

    async def _deliver_head(self, shard: _Shard, queue: deque[Pending]) -> None:
        if not self._leased(shard):
            await shard.pause(0.1)
            return
        item = queue[0]
        if item.attempts:
            # Tried before, here or by an earlier holder: a timed-out try may still run.
            wait_s = await self._backlog.held_for(str(item.id))
            if wait_s > 0:
                await shard.pause(wait_s)
                return
        async with self._sem:
            if shard.stopped.is_set() or not self._leased(shard):
                return
            self._last_attempt = self._monotonic()
            outcome = await self.relay.attempt(item)
        if not outcome.done:
            if outcome.sent:
                queue[0] = dataclasses.replace(item, attempts=item.attempts + 1)
            if outcome.result.unknown:
                with contextlib.suppress(Exception):
                    await self._backlog.hold(str(item.id), self.relay.inflight_s)
                await shard.pause(outcome.delay_s)  # may still run at Laravel: no early wake
                return
            key, wake = (shard.n, item.session), asyncio.Event()
            self._sleepers[key] = wake
            try:
                await shard.pause(outcome.delay_s, also=wake)
            finally:
                if self._sleepers.get(key) is wake:
                    del self._sleepers[key]
            return
        if self._sleepers:
            self._wake_backing_off()
        await self._ack(shard, item)
        queue.popleft()
        shard.size -= 1
        shard.bytes -= len(item.body)

    async def _ack(self, shard: _Shard, item: Pending) -> None:
        """Laravel answered: the entry must leave the stream, or the next holder sends it
        again. Retried while Redis is away (never re-sent meanwhile)."""
        delay_s = 0.05
        while True:
            try:
                await self._backlog.ack(shard.n, item)
                return
            except Exception as exc:
                self.acks_failed += 1
                log.warning("webhook_ack_failed", id=item.id, error=type(exc).__name__)
                if shard.stopped.is_set():
                    # Given up (shutdown, lease lost) with Redis away: the next holder will
                    # send it again, with the same X-Webhook-Id.
                    log.warning("webhook_ack_lost", id=item.id, session=item.session)
                    return
                await shard.pause(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    # -- the spool -------------------------------------------------------------------------

    async def _move_spool(self) -> None:
        """What was spooled while Redis was away goes to its stream, oldest first."""
        b = self._backlog
        while True:
            await b.spool_wake.wait()
            b.spool_wake.clear()
            while b.spooled:
                try:
                    moved = await b.move_spool()
                except Exception as exc:
                    b.failed("spool_move", exc)
                    await asyncio.sleep(_RETRY_S)
                    continue
                if moved:
                    log.info("webhook_spool_moved", items=moved, left=b.spooled)
                elif b.spooled:
                    await asyncio.sleep(_RETRY_S)  # the streams are full
