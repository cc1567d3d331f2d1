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
import ctypes
import errno
import gc
import os
import resource
import signal
import socket
import sys

import structlog
from aiohttp import web

from .app import ROUTER, RouterRunner, build_app
from .config import Config, backlog_kind
from .errors import ConfigError, PortInUse
from .reload import reload

log = structlog.get_logger("wa_router.server")

LOOPS = ("uvloop", "asyncio")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


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


def listen_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The listening socket, bound before anything starts: a port in use is one line on
    stderr (PortInUse), not a traceback after `router_started`."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(host, port, "server.port, or WA_ROUTER_SERVER__PORT") from None
        raise
    sock.set_inheritable(False)
    return sock


def serve(
    cfg: Config,
    *,
    loop_kind: str = "uvloop",
    reuse_port: bool = False,
    worker: int | None = None,
    workers: int = 1,
    config_path: str | None = None,
) -> None:
    """Run until SIGTERM/SIGINT: stop accepting, let requests in flight finish (bounded by
    server.shutdown_grace_s), then close upstream connections and the store."""
    # A SIGHUP while the router starts (its default action would end the process) is kept
    # and applied once it serves: a reload right after a start is not a kill.
    asked: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, _frame: asked.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # see serve_workers
    sock = listen_socket(cfg.server.host, cfg.server.port, reuse_port=reuse_port)
    loop = new_event_loop(loop_kind)
    asyncio.set_event_loop(loop)
    log.info(
        "router_listening",
        host=cfg.server.host,
        port=cfg.server.port,
        loop=loop_kind,
        pid=os.getpid(),
    )
    raise_file_limit()
    app = build_app(cfg, worker=worker, workers=workers)
    # What exists now lives as long as the process: out of the collector's sight, so a full
    # collection walks only what requests made (it stalled every request for ~15 ms).
    gc.collect()
    gc.freeze()
    try:
        loop.run_until_complete(_run(app, sock, config_path, asked))
    finally:
        _cancel_rest(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _run(
    app: web.Application, sock: socket.socket, config_path: str | None, asked: list[int]
) -> None:
    """Serve until SIGTERM/SIGINT, then stop as aiohttp's run_app does: the listener closed,
    idle connections closed, the app's drain (the grace), what is left cut."""
    loop = asyncio.get_running_loop()
    router = app[ROUTER]
    serving = False

    def hup() -> None:
        # SIGHUP (logrotate, systemctl reload) re-reads the config instead of ending the
        # process; until the router serves it is kept, as `serve` keeps it before the loop.
        if serving:
            reload(router, config_path)
        else:
            asked.append(signal.SIGHUP)

    # The loop takes SIGHUP first, before it has a wakeup fd for any other signal: a SIGHUP
    # once reached both `serve`'s early handler and, through that fd, the loop's, and one
    # signal reloaded twice. Now both only keep it until the router serves.
    loop.add_signal_handler(signal.SIGHUP, hup)
    # The grace is applied by the app's drain; shutdown_timeout only bounds aiohttp's last
    # wait for its own connections.
    runner = RouterRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.SockSite(runner, sock).start()
        serving = True
        if asked:  # one or more that came while starting: applied once, now
            reload(router, config_path)
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()


def _cancel_rest(loop: asyncio.AbstractEventLoop) -> None:
    rest = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in rest:
        task.cancel()
    if rest:
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))


def raise_file_limit() -> None:
    """Open files up to the hard limit: each caller connection and each upstream one is a
    descriptor, and the soft limit is often 1024 (`server.max_connections` is kept below
    what this gives, lean.py)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def die_with_parent(parent: int) -> None:
    """Linux: the kernel sends this process SIGTERM when its parent dies, however it dies
    (kill -9 included), so no worker is left serving orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request above was made
        os._exit(1)


def serve_workers(
    cfg: Config, *, workers: int, loop_kind: str = "uvloop", config_path: str | None = None
) -> int:
    """Fork `workers` serving processes; forward SIGTERM/SIGINT; exit when all have."""
    if workers < 1:
        raise ConfigError("--workers", "must be at least 1")
    if workers == 1:
        serve(cfg, loop_kind=loop_kind, config_path=config_path)
        return 0
    if cfg.webhooks.laravel_url and cfg.webhooks.secrets and backlog_kind(cfg) != "redis":
        # Each worker would run its own delivery of one shared backlog file.
        raise ConfigError(
            "--workers", "relaying webhooks with several workers needs store.kind: redis"
        )
    # Taken by another program: say so once, here, rather than from every worker.
    listen_socket(cfg.server.host, cfg.server.port, reuse_port=True).close()
    children: list[int] = []
    parent = os.getpid()
    # SIGHUP held back while the workers are forked: a worker takes its own handler first
    # (`serve`), the parent forwards it once every worker exists; none is lost meanwhile.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                die_with_parent(parent)
                serve(
                    cfg,
                    loop_kind=loop_kind,
                    reuse_port=True,
                    worker=index,
                    workers=workers,
                    config_path=config_path,
                )
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
    signal.signal(signal.SIGHUP, forward)  # each worker reloads its config
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    worst = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status))
    return worst
