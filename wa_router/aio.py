"""Stopping background tasks for sure.

redis-py's asyncio client can swallow a cancellation that arrives in the middle of a
command (redis/redis-py#2028, seen here with 8.1: about half of the cancels of a task
looping over GET were lost). A task cancelled once may then run on, and a shutdown that
awaits it hangs. `cancel_and_wait` cancels again until the task has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

log = structlog.get_logger("wa_router.aio")


async def cancel_and_wait(
    task: asyncio.Task[Any], *, every_s: float = 0.2, rounds: int = 50
) -> None:
    """Cancel `task` and wait for its end, cancelling again every `every_s` (at most
    `rounds` times; then it is left running and logged). Its exception, if any, is
    dropped: the caller is stopping it."""
    for _ in range(rounds):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    if not task.done():
        log.error("task_would_not_stop", task=task.get_name())
        return
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
