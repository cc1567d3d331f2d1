"""Laravel's webhook allowance kept in Redis, for every worker and router on the key prefix.

Laravel counts per client IP, and a router's workers (and routers behind one NAT) are one
IP to it. Counted apart, each could stay under its share while Laravel's count, re-armed
by all of them, never lapses; and a 429 pausing one worker while the others go on keeps
Laravel closed for good (laravel_budget.py says why). So the count and the pause live in
Redis, as Laravel keeps them: a count whose expiry every send re-arms (it lapses after a
whole window of quiet), and a pause key set on any 429. Routers on the same prefix behind
different IPs share one allowance too: less than Laravel would take, never more.

When Redis does not answer (the breaker shared with the streams), the process's own count
(`fallback`, its share of the allowance) decides meanwhile; a pause is kept there as well.
"""

from __future__ import annotations

import asyncio
import math

import redis.asyncio as aioredis
import structlog

from .breaker import Breaker
from .laravel_budget import LaravelBudget, pause_s

log = structlog.get_logger("wa_router.shared_budget")

# KEYS: 1 the count, 2 the pause. ARGV: 1 the allowance (-1: not counted), 2 window ms.
# Returns 0 (counted: send now) or the ms to hold off.
_TAKE_LUA = """
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return paused end
local per = tonumber(ARGV[1])
if per < 0 then return 0 end
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= per then
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then return left end
  return 1
end
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
"""
# KEYS: 1 the count.
_GIVE_BACK_LUA = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then redis.call('DECR', KEYS[1]) end
return 0
"""
# KEYS: 1 the pause. ARGV: 1 its length in ms. Returns the pause left, in ms.
_PAUSE_LUA = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return redis.call('PTTL', KEYS[1])
"""

_ERRORS = (TimeoutError, aioredis.RedisError, OSError)


class SharedBudget:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        key_prefix: str,
        per_window: int | None,
        window_s: float,
        breaker: Breaker,
        fallback: LaravelBudget,
    ) -> None:
        self._keys = [f"{key_prefix}laravel:count", f"{key_prefix}laravel:paused"]
        self._per = -1 if per_window is None else per_window
        self.per_window = per_window
        self.window_s = window_s
        self._window_ms = max(1, math.ceil(window_s * 1000))
        self._breaker = breaker
        self.fallback = fallback
        self._take = redis.register_script(_TAKE_LUA)
        self._give_back = redis.register_script(_GIVE_BACK_LUA)
        self._pause = redis.register_script(_PAUSE_LUA)
        self.throttles = 0
        self.deferred = 0
        self.store_errors = 0

    async def take(self) -> float:
        if not self._breaker.open:
            try:
                async with asyncio.timeout(self._breaker.deadline_s):
                    ms = int(await self._take(keys=self._keys, args=[self._per, self._window_ms]))
            except _ERRORS as exc:
                self._failed("take", exc)
            else:
                if ms > 0:
                    self.deferred += 1
                return ms / 1000
        wait = await self.fallback.take()
        if wait > 0:
            self.deferred += 1
        return wait

    async def give_back(self) -> None:
        if not self._breaker.open:
            try:
                async with asyncio.timeout(self._breaker.deadline_s):
                    await self._give_back(keys=self._keys[:1])
                return
            except _ERRORS as exc:
                self._failed("give_back", exc)
        await self.fallback.give_back()

    async def pause(self, retry_after_s: float | None) -> float:
        self.throttles += 1
        local = self.fallback.throttled(retry_after_s)  # kept here too, for an outage
        if self._breaker.open:
            return local
        ms = max(1, math.ceil(pause_s(self.window_s, retry_after_s) * 1000))
        try:
            async with asyncio.timeout(self._breaker.deadline_s):
                left = int(await self._pause(keys=self._keys[1:], args=[ms]))
        except _ERRORS as exc:
            self._failed("pause", exc)
            return local
        return max(local, left / 1000)

    def _failed(self, op: str, exc: BaseException) -> None:
        self.store_errors += 1
        self._breaker.trip()
        log.warning("laravel_budget_unavailable", op=op, error=type(exc).__name__)


__all__ = ["SharedBudget"]
