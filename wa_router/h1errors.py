"""The lean client's failures, mapped to `errors.py` in one table (the way httpx maps
httpcore's in `map_httpcore_exceptions`).

What a low-level exception means depends on how far the request got, so the table is keyed
by the phase it happened in: a `TimeoutError` while waiting for a pooled connection or while
connecting is `NotReached` (nothing was sent: re-sending is safe), the same `TimeoutError`
once the request is written is `ReadTimeout` (it may have been processed).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

import httptools

from .errors import (
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    PoolTimeout,
    ReadTimeout,
    UpstreamError,
)


class Phase(Enum):
    WAIT = "wait"  # for a free connection at the per-instance limit: nothing written
    CONNECT = "connect"  # TCP and TLS: nothing written
    HEAD = "head"  # the request written, its answer's head awaited
    BODY = "body"  # the head relayed or read, the body awaited


class Closed(Exception):
    """The connection ended (EOF, or lost with `cause`) before the answer did."""

    def __init__(self, cause: BaseException | None = None) -> None:
        super().__init__(str(cause) if cause is not None else "")
        self.cause = cause


class Closing(Exception):
    """The forwarder closed while a request waited for a connection."""


# (phase, exception class) -> (our error, what happened). Looked up along the exception's
# MRO, so the most specific row wins (TimeoutError and ssl.SSLError are OSErrors too).
_TABLE: dict[tuple[Phase, type[BaseException]], tuple[type[UpstreamError], str]] = {
    (Phase.WAIT, TimeoutError): (PoolTimeout, "no free connection"),
    (Phase.WAIT, Closing): (ConnectFailed, "the forwarder is closing"),
    (Phase.CONNECT, TimeoutError): (ConnectTimeout, "connect timed out"),
    (Phase.CONNECT, Closed): (ConnectFailed, "closed before the request was written"),
    (Phase.CONNECT, ssl.SSLError): (ConnectFailed, "TLS handshake failed"),
    (Phase.CONNECT, OSError): (ConnectFailed, "connect failed"),
    (Phase.HEAD, TimeoutError): (ReadTimeout, "no answer within the read timeout"),
    (Phase.HEAD, Closed): (Disconnected, "connection lost before the answer"),
    (Phase.HEAD, OSError): (Disconnected, "connection lost before the answer"),
    (Phase.HEAD, httptools.HttpParserError): (Disconnected, "malformed response"),
    (Phase.BODY, TimeoutError): (ReadTimeout, "no data within the read timeout"),
    (Phase.BODY, Closed): (Disconnected, "answer broken off"),
    (Phase.BODY, OSError): (Disconnected, "answer broken off"),
    (Phase.BODY, httptools.HttpParserError): (Disconnected, "malformed response"),
}


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc)  # its errno is OpenSSL's, not the OS's
    if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
        # asyncio's text is "Connect call failed (addr)"; the errno's says why.
        if exc.errno and exc.errno > 0:
            return os.strerror(exc.errno)
        return exc.strerror or str(exc)
    return str(exc)


def upstream_error(instance: str, phase: Phase, exc: BaseException) -> UpstreamError | None:
    """`exc` as the UpstreamError it means in `phase`; None when the table has no row."""
    for cls in type(exc).__mro__:
        row = _TABLE.get((phase, cls))
        if row is not None:
            error, what = row
            why = _why(exc)
            return error(instance, f"{what}: {why}" if why else what)
    return None


@contextmanager
def mapped(instance: str, phase: Phase) -> Iterator[None]:
    """Raise what escapes the block as `errors.py` says it; anything unmapped unchanged."""
    try:
        yield
    except Exception as exc:
        error = upstream_error(instance, phase, exc)
        if error is None:
            raise
        raise error from exc


__all__ = ["Closed", "Closing", "Phase", "mapped", "upstream_error"]
