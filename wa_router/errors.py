"""Every exception wa-router raises, in one tree (the httpx way).

    WaRouterError
     ├── ConfigError               bad configuration; the CLI exits 2
     ├── RequestRejected           the caller's request cannot be served as sent (4xx/5xx JSON)
     └── UpstreamError             one attempt at an upstream instance failed
          ├── NotReached           the request never reached the instance: safe to re-send
          │    ├── ConnectFailed   refused / reset / unreachable before sending
          │    ├── ConnectTimeout
          │    └── PoolTimeout     no free pooled connection within upstream.pool_wait_s
          └── SentNoAnswer         the request was sent, no (complete) answer came back:
               │                   a POST may have been processed, never re-sent blindly
               ├── ReadTimeout
               └── Disconnected    the connection closed before the response head

Third-party exceptions are mapped to these in one place per client: aiohttp's in
`forward.py`, the lean client's (OSError, timeouts, httptools') in `h1errors.py`'s table.
"""

from __future__ import annotations

from typing import Any


class WaRouterError(Exception):
    """Base of everything wa-router raises on purpose."""


class ConfigError(WaRouterError):
    """The configuration is invalid. `key` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class PortInUse(WaRouterError):
    """The listening port is taken: one line for the operator, naming what to change."""

    def __init__(self, host: str, port: int, change: str) -> None:
        super().__init__(f"cannot listen on {host}:{port}: the port is in use (change {change})")


class RequestRejected(WaRouterError):
    """An answer the router gives itself: `{"error": code, "message": ..., **extra}`."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = {}  # sent with the answer (Retry-After)
        super().__init__(f"{status} {code}: {message}")

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class UpstreamError(WaRouterError):
    """One attempt at an instance failed; `instance` is the pool member's name."""

    def __init__(self, instance: str, detail: str) -> None:
        self.instance = instance
        self.detail = detail
        super().__init__(f"{instance}: {detail}")


class NotReached(UpstreamError):
    """Nothing was sent: re-sending cannot duplicate anything."""


class ConnectFailed(NotReached):
    pass


class ConnectTimeout(NotReached):
    pass


class PoolTimeout(NotReached):
    """Every connection to the instance stayed busy for the whole wait: nothing was sent."""


def says_down(exc: UpstreamError) -> bool:
    """Whether a failure is evidence the instance is down (a suspect for the health check):
    a refused or broken connection is; every pooled connection busy is not (it is alive)."""
    return isinstance(exc, NotReached | Disconnected) and not isinstance(exc, PoolTimeout)


class SentNoAnswer(UpstreamError):
    """The request left; the instance may have acted on it."""


class ReadTimeout(SentNoAnswer):
    pass


class Disconnected(SentNoAnswer):
    pass
