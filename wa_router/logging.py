"""structlog setup: JSON lines when not on a terminal, readable lines when on one.

Event names are constants (`session_rediscovered`), facts are key/value fields. A last
processor drops fields that could carry message text or secrets, in case a call site
forgets: logs never contain message bodies, phone numbers or api keys.

Everything goes through it, the standard library's loggers too (aiohttp's, asyncio's):
one JSON object per line, a traceback as the `exception` field. aiohttp's own lines can
quote a malformed request (its request line with an api key in the query, a header): of
those only the logger, the level and the exception's type are kept, never their text.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

import structlog

from .config import LogConfig

REDACTED_FIELDS = frozenset(
    {
        "api_key",
        "apikey",
        "key",
        "message",
        "text",
        "body",
        "recipient_phone",
        "phone",
        "phone_number",
        "authorization",
        "x-api-key",
        "secret",
        "signature",
    }
)


# The request being handled, as a function that names it: the id is only made when a line
# is actually logged (binding it eagerly cost ~4% of the proxy's CPU).
CURRENT_REQUEST: ContextVar[Callable[[], str] | None] = ContextVar(
    "wa_router_request", default=None
)


def _add_request_id(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    current = CURRENT_REQUEST.get()
    if current is not None:
        event.setdefault("request_id", current())
    return event


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in list(event):
        if name.lower() in REDACTED_FIELDS:
            event[name] = "[redacted]"
    return event


# Loggers whose messages may quote what a caller sent.
_QUOTING = ("aiohttp",)


def _foreign(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A standard-library record: named by its logger; aiohttp's stripped to their kind."""
    record = event.get("_record")
    name = record.name if isinstance(record, logging.LogRecord) else "?"
    event["logger"] = name
    if name.split(".")[0] in _QUOTING:
        exc = event.pop("exc_info", None)
        event.pop("positional_args", None)
        event["event"] = f"{name.replace('.', '_')}_{event.get('level', 'log')}"
        if isinstance(exc, tuple) and exc[0] is not None:
            event["error"] = exc[0].__name__
    return event


def setup_logging(cfg: LogConfig, *, stream: Any = None) -> None:
    stream = sys.stderr if stream is None else stream
    as_json = cfg.format == "json" or (cfg.format == "auto" and not stream.isatty())
    level = logging.getLevelNamesMapping()[cfg.level.upper()]
    renderer: Any = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    # The console renderer prints a traceback itself; JSON gets it as a field.
    tracebacks: list[Any] = [structlog.processors.format_exc_info] if as_json else []
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, *tracebacks, _redact, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        # Not cached: module-level loggers may be used before setup (config errors), and a
        # cached one would keep the old configuration. Logging is off the hot path.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, _foreign],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tracebacks,
                _redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(level, logging.INFO))  # no library debug chatter, whatever the level
