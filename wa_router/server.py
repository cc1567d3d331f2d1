"""Process level: the event loop, the listening socket, workers, signals.

`--workers N` forks N processes that share the port with SO_REUSEPORT (the kernel spreads
connections over them). Each has its own directory cache; with the memory store each also
has its own directory, which is correct (every worker finds sessions by itself) but costs a
rediscovery per worker: use the Redis store to share one. Relaying webhooks with several
workers needs the Redis Stream backlog (store.kind redis): every worker takes intake and
delivers its share of the shards; each keeps its own spool file for when Redis is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

import structlog
from aiohttp import web

from .app import build_app
from .config import Config, backlog_kind
from .errors import ConfigError

log = structlog.get_logger("wa_router.server")

LOOPS = ("uvloop", "asyncio")


def new_event_loop(kind: str = "uvloop") -> asyncio.AbstractEventLoop:
    """uvloop where asked for and installed: the proxy's hot path is mostly socket I/O."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            return asyncio.new_event_loop()
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def serve(
    cfg: Config, *, loop_kind: str = "uvloop", reuse_port: bool = False, worker: int | None = None
) -> None:
    """Run until SIGTERM/SIGINT: stop accepting, let requests in flight finish (bounded by
    server.shutdown_grace_s), then close upstream connections and the store."""
    loop = new_event_loop(loop_kind)
    asyncio.set_event_loop(loop)
    log.info(
        "router_listening",
        host=cfg.server.host,
        port=cfg.server.port,
        loop=loop_kind,
        pid=os.getpid(),
    )
    web.run_app(
        build_app(cfg, worker=worker),
        host=cfg.server.host,
        port=cfg.server.port,
        # The grace is applied by the app's drain; this only bounds aiohttp's last wait.
        shutdown_timeout=1.0,
        access_log=None,
        print=None,
        loop=loop,
        handle_signals=True,
        reuse_port=reuse_port or None,
    )


def serve_workers(cfg: Config, *, workers: int, loop_kind: str = "uvloop") -> int:
    """Fork `workers` serving processes; forward SIGTERM/SIGINT; exit when all have."""
    if workers < 1:
        raise ConfigError("--workers", "must be at least 1")
    if workers == 1:
        serve(cfg, loop_kind=loop_kind)
        return 0
    if cfg.webhooks.laravel_url and cfg.webhooks.secrets and backlog_kind(cfg) != "redis":
        # Each worker would run its own delivery of one shared backlog file.
        raise ConfigError(
            "--workers", "relaying webhooks with several workers needs store.kind: redis"
        )
    children: list[int] = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                serve(cfg, loop_kind=loop_kind, reuse_port=True, worker=index)
            except BaseException as exc:
                print(f"wa-router worker {os.getpid()}: {exc!r}", file=sys.stderr)
                code = 1
            os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status))
    return worst
