"""Webhooks as Blazz's `utils/webhookNotifier.js` sends them: signed, in order, with its retries.

What the receiver sees (see `reference/node-pool-api.md`):

    POST {webhook_url}
    Content-Type: application/json
    X-Timestamp: <unix seconds>
    X-HMAC-Signature: hex(HMAC-SHA256(secret, timestamp + raw body))
    X-Instance-Url: http://localhost:{port}      (always localhost, whatever callers use)

    {"event":"session_ready","data":{"session_id":...}}      (compact JSON)

Retry policy (`retry_delay_s`, pure): at most 3 retries; 429 after 1, 2, 4 s; connection
refused / timeout after 2, 4, 8 s; 401, 5xx and everything else are final. Every retry is
re-signed with a fresh timestamp over the *identical* body, which is what lets a receiver
tell a late retry from a replay only by its timestamp window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp

from ..signing import sign

log = logging.getLogger(__name__)

HDR_TIMESTAMP = "X-Timestamp"
HDR_SIGNATURE = "X-HMAC-Signature"
HDR_INSTANCE_URL = "X-Instance-Url"

# Every event the reference lists; `emit()` accepts any string, this is for callers/tests.
EVENTS: tuple[str, ...] = (
    "qr_code_generated",
    "session_authenticated",
    "session_ready",
    "session_disconnected",
    "session_error",
    "session_reconnected",
    "session_reconnect_failed",
    "message_received",
    "message_sent",
    "message_status_updated",
    "message_delivered",
    "message_read",
    "typing_indicator",
    "chat_state_updated",
    "connection_test",
)

MAX_RETRIES = 3
RATE_LIMITED_DELAYS_S = (1.0, 2.0, 4.0)  # after a 429
UNREACHABLE_DELAYS_S = (2.0, 4.0, 8.0)  # after connection refused / timeout

Failure = Literal["refused", "timeout", "error"]


def sign_webhook(secret: str, timestamp: str, body: bytes) -> str:
    """Lowercase hex HMAC-SHA256(secret, timestamp + raw body): the two simply concatenated
    (one signing module for the router, the sim and the Laravel stand-in)."""
    return sign(secret, timestamp, body)


def encode_webhook(event: str, data: dict[str, Any] | None) -> bytes:
    """Compact JSON body. `data=None` (e.g. `connection_test`, "no data") is sent as `{}`:
    receivers read `data.session_id` unconditionally and an object keeps that lookup safe."""
    payload = {"event": event, "data": data if data is not None else {}}
    return json.dumps(payload, separators=(",", ":")).encode()


def retry_delay_s(status: int | None, failure: Failure | None, retries_done: int) -> float | None:
    """Seconds to wait before the next attempt (unscaled), or None when this one is final."""
    if retries_done >= MAX_RETRIES:
        return None
    if status == 429:
        return RATE_LIMITED_DELAYS_S[retries_done]
    if status is None and failure in ("refused", "timeout"):
        return UNREACHABLE_DELAYS_S[retries_done]
    return None  # 2xx delivered; 401 / 5xx / other 4xx / resets: Node gives up at once


@dataclass(frozen=True)
class WebhookAttempt:
    """One POST attempt. `status` is None when no HTTP answer came (see `failure`)."""

    event: str
    session_id: str | None
    timestamp: str
    status: int | None
    attempt: int  # 1 for the first try, 2..4 for the retries
    failure: Failure | None = None
    body: bytes = b""
    signature: str = ""


class WebhookSource(Protocol):
    """What the sender reads from its instance at send time (tests change these live)."""

    webhook_url: str | None
    webhook_secret: str
    webhook_retry_scale: float
    webhook_timeout_s: float
    port: int
    webhooks: list[WebhookAttempt]
    clock: Callable[[], float]

    async def wait_resumed(self) -> None:
        """Return when the instance is not paused (a stopped process sends nothing)."""


@dataclass
class _Job:
    event: str
    data: dict[str, Any] | None
    done: asyncio.Future[int | None]


class WebhookSender:
    """One ordered queue and at most one worker task per instance.

    The worker exists only while jobs are queued; `close()` cancels it (an instance crash
    loses its unsent webhooks) and resolves every waiter with None ("never delivered").
    """

    def __init__(self, source: WebhookSource) -> None:
        self._source = source
        self._jobs: deque[_Job] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        return len(self._jobs)

    def submit(self, event: str, data: dict[str, Any] | None) -> asyncio.Future[int | None]:
        """Queue one webhook; the future resolves to the final status (None: undelivered)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int | None] = loop.create_future()
        if not self._source.webhook_url:
            done.set_result(None)
            return done
        self._jobs.append(_Job(event, data, done))
        self._idle.clear()
        if self._worker is None:
            self._worker = loop.create_task(self._run(), name="sim-webhooks")
        return done

    async def wait_idle(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            await self._idle.wait()

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while self._jobs:
            job = self._jobs.popleft()
            if not job.done.done():
                job.done.set_result(None)
        self._idle.set()

    async def _run(self) -> None:
        # One client session per busy period: no session outlives the worker, so a stopped
        # instance holds no sockets. Closing it awaits, and a submit() may land meanwhile:
        # hence the outer loop re-checks the queue after the close.
        while self._jobs:
            async with aiohttp.ClientSession() as http:
                while self._jobs:
                    job = self._jobs[0]
                    status: int | None = None
                    try:
                        status = await self._deliver(http, job)
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # a bug here must not wedge the queue
                        log.exception("sim_webhook_failed event=%s", job.event)
                    self._jobs.popleft()
                    if not job.done.done():
                        job.done.set_result(status)
        # No await since the last empty check: a submit() from now on starts a new worker.
        self._worker = None
        self._idle.set()

    async def _deliver(self, http: aiohttp.ClientSession, job: _Job) -> int | None:
        src = self._source
        body = encode_webhook(job.event, job.data)
        session_id = job.data.get("session_id") if job.data else None
        attempt = 0
        while True:
            await src.wait_resumed()
            url = src.webhook_url
            if not url:
                return None
            attempt += 1
            timestamp = str(int(src.clock()))
            signature = sign_webhook(src.webhook_secret, timestamp, body)
            headers = {
                "Content-Type": "application/json",
                HDR_TIMESTAMP: timestamp,
                HDR_SIGNATURE: signature,
                HDR_INSTANCE_URL: f"http://localhost:{src.port}",
            }
            status: int | None = None
            failure: Failure | None = None
            try:
                async with http.post(
                    url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=src.webhook_timeout_s),
                ) as resp:
                    status = resp.status
                    await resp.read()
            except TimeoutError:  # aiohttp's connect/read timeouts subclass it
                failure = "timeout"
            except aiohttp.ClientConnectorError:
                failure = "refused"
            except aiohttp.ClientError:
                failure = "error"  # reset mid-answer etc.: Node does not retry these
            src.webhooks.append(
                WebhookAttempt(
                    event=job.event,
                    session_id=str(session_id) if session_id is not None else None,
                    timestamp=timestamp,
                    status=status,
                    attempt=attempt,
                    failure=failure,
                    body=body,
                    signature=signature,
                )
            )
            delay_s = retry_delay_s(status, failure, attempt - 1)
            if delay_s is None:
                return status
            await asyncio.sleep(delay_s * src.webhook_retry_scale)
