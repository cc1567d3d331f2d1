"""Delivering the Redis Stream backlog: each shard by one router at a time, in order.

A router takes a share of the shards (their count divided by the routers delivering, who
say so with a heartbeat), holds each by a lease it renews, and for each shard it holds:
claims what a previous holder left unacknowledged, reads new entries as they come (a
blocking XREADGROUP wakes at once on an XADD from any router), and delivers each session's
entries one after another, sessions side by side. An entry is acknowledged right after
Laravel's answer, so a router killed mid-delivery leaves at most the one entry per
session that was in flight for the next holder to send again.

A delivery starts only while the lease has more than the relay timeout left: whatever a
holder that lost its lease (hung, cut off from Redis) still has in flight has ended before
the next holder can take the shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable

import structlog

from .aio import cancel_and_wait
from .backlog import Pending
from .delivery import Relay
from .stream_backlog import StreamBacklog

log = structlog.get_logger("wa_router.stream_relay")

_READ_COUNT = 256
_READ_BLOCK_MS = 1000
# Entries read ahead per shard while their sessions wait (Laravel down): beyond this the
# rest stays in the stream, unread.
_WINDOW_MAX = 4096
_CONCURRENCY = 16  # deliveries in flight per router
_SPOOL_RETRY_S = 0.5


def consumer_name() -> str:
    """Unique per process start: a restarted router is a new consumer, and what its
    previous life left pending is claimed like any dead router's."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Shard:
    """One held shard: what was read of it and not yet acknowledged, per session."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.sessions: dict[str, deque[Pending]] = {}
        self.size = 0
        self.busy: set[str] = set()  # sessions with a delivery task running
        self.tasks: set[asyncio.Task[None]] = set()
        self.reader: asyncio.Task[None] | None = None
        self.lease_until = 0.0  # monotonic, counted from when the renewal was sent
        self.stopped = asyncio.Event()

    async def pause(self, delay_s: float) -> None:
        """Wait `delay_s`, or less when the shard is given up."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self.stopped.wait()

    def add(self, item: Pending) -> None:
        self.sessions.setdefault(item.session, deque()).append(item)
        self.size += 1


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
        self._sem = asyncio.Semaphore(_CONCURRENCY)
        self._first = zlib.crc32(self.consumer.encode()) % backlog.shards
        self.routers = 1  # delivering routers, as the last heartbeat counted them
        self.acks_failed = 0

    # Counters read by metrics.py, as Deliverer has them.
    @property
    def delivered(self) -> int:
        return self.relay.delivered

    @property
    def dropped(self) -> int:
        return self.relay.dropped

    @property
    def failures(self) -> int:
        return self.relay.failures

    @property
    def held(self) -> list[int]:
        return sorted(self._held)

    def wake(self) -> None:
        """An XADD wakes the shard's blocking read by itself."""

    def hold(self, session: str) -> None:
        """Nothing is relayed directly here: every attempt is the stream's own."""

    # -- the leases ------------------------------------------------------------------------

    async def run(self) -> None:
        spool = asyncio.create_task(self._move_spool(), name="webhook-spool-move")
        me = asyncio.current_task()
        try:
            while True:
                try:
                    await self._round()
                except Exception as exc:
                    log.warning("webhook_stream_round_failed", error=type(exc).__name__)
                    self._backlog.failed("leases", exc)
                if me is not None and me.cancelling():
                    raise asyncio.CancelledError  # swallowed inside redis-py (aio.py)
                await asyncio.sleep(self._renew_every_s)
        finally:
            await cancel_and_wait(spool)
            await self._stop_all()

    async def _round(self) -> None:
        b = self._backlog
        self.routers = max(1, await b.heartbeat(self.consumer, self._lease_ms))
        for n, shard in list(self._held.items()):
            sent = self._monotonic()
            if await b.renew_lease(n, self.consumer, self._lease_ms):
                shard.lease_until = sent + self._lease_ms / 1000
            else:
                log.warning("webhook_shard_lost", shard=n, consumer=self.consumer)
                await self._stop(n)
        share = math.ceil(b.shards / self.routers)
        for i in range(b.shards):
            if len(self._held) >= share:
                break
            n = (self._first + i) % b.shards
            if n in self._held:
                continue
            sent = self._monotonic()
            if await b.take_lease(n, self.consumer, self._lease_ms):
                await self._start(n, sent + self._lease_ms / 1000)
        # More than our share (another router joined): give the rest back.
        for n in sorted(self._held, reverse=True)[: max(0, len(self._held) - share)]:
            await self._stop(n)
            await b.release_lease(n, self.consumer)

    def _leased(self, shard: _Shard) -> bool:
        return shard.lease_until - self._monotonic() > self.relay.timeout_s

    async def _start(self, n: int, lease_until: float) -> None:
        b = self._backlog
        shard = _Shard(n)
        shard.lease_until = lease_until
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

    async def _stop(self, n: int) -> None:
        """Stop reading and let deliveries in flight end: nothing of it is acknowledged
        after this, the next holder claims what is left."""
        shard = self._held.pop(n, None)
        if shard is None:
            return
        shard.stopped.set()
        if shard.reader is not None:
            await cancel_and_wait(shard.reader)
        # Deliveries see `stopped` (between attempts) and end; one in flight is awaited.
        await asyncio.gather(*shard.tasks, return_exceptions=True)

    async def _stop_all(self) -> None:
        held = list(self._held)
        for n in held:
            await self._stop(n)
        with contextlib.suppress(Exception):
            for n in held:
                await self._backlog.release_lease(n, self.consumer)
            await self._backlog.leave(self.consumer)

    # -- one shard -------------------------------------------------------------------------

    async def _read(self, shard: _Shard) -> None:
        b = self._backlog
        while not shard.stopped.is_set():
            if shard.size >= _WINDOW_MAX or not self._leased(shard):
                await shard.pause(0.1)
                continue
            try:
                items = await b.read(shard.n, self.consumer, _READ_COUNT, _READ_BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if "NOGROUP" in str(exc):  # the stream was deleted under us
                    with contextlib.suppress(Exception):
                        await b.ensure_group(shard.n)
                else:
                    b.failed("read", exc)
                await shard.pause(_SPOOL_RETRY_S)
                continue
            for item in items:
                shard.add(item)
            if items:
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
                if not self._leased(shard):
                    await shard.pause(0.1)
                    continue
                item = queue[0]
                async with self._sem:
                    if not self._leased(shard):
                        continue
                    outcome = await self.relay.attempt(item)
                if not outcome.done:
                    queue[0] = _again(item)
                    await shard.pause(outcome.delay_s)
                    continue
                await self._ack(shard, item)
                queue.popleft()
                shard.size -= 1
        finally:
            shard.busy.discard(session)
            if not queue:
                shard.sessions.pop(session, None)

    async def _ack(self, shard: _Shard, item: Pending) -> None:
        """Laravel answered: the entry must leave the stream, or the next holder sends it
        again. Retried while Redis is away (never re-sent meanwhile)."""
        delay_s = 0.05
        while True:
            try:
                await self._backlog.ack(shard.n, item)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.acks_failed += 1
                self._backlog.failed("ack", exc)
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
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    b.failed("spool_move", exc)
                    await asyncio.sleep(_SPOOL_RETRY_S)
                    continue
                if moved:
                    log.info("webhook_spool_moved", items=moved, left=b.spooled)
                elif b.spooled:
                    await asyncio.sleep(_SPOOL_RETRY_S)  # the streams are full


def _again(item: Pending) -> Pending:
    return Pending(
        id=item.id,
        session=item.session,
        path=item.path,
        body=item.body,
        headers=item.headers,
        timestamp=item.timestamp,
        attempts=item.attempts + 1,
        enqueued_at=item.enqueued_at,
    )
