"""Wiring and lifecycle only: build the parts from the config, start and stop them in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import structlog
from aiohttp import hdrs, web

from .admin import add_admin_routes, only
from .aio import cancel_and_wait
from .apikeys import KeyPolicy
from .backlog import Backlog, SqliteBacklog
from .breaker import Breaker
from .config import Config, backlog_kind
from .delivery import Deliverer, Delivering, Relay, laravel_instance
from .directory import Directory
from .discovery import Discovery
from .draining import SharedDrain
from .errors import ConfigError
from .forward import AiohttpForwarder, Forwarder
from .h1 import LeanForwarder
from .health import HealthChecker
from .laravel_budget import Budget, LaravelBudget
from .lean import LeanServer
from .metrics import Metrics
from .parking import Parking
from .pool import Instance, Pool
from .profiles import Profile, build_profile
from .proxy import Proxy
from .replay import SharedKV
from .rules import RuleTable, SessionIdPolicy
from .runtime import Router, RouterControl, answering, view_of
from .shared_budget import SharedBudget
from .stores import MemoryStore, RedisStore, Store
from .stores.snapshot import Snapshot
from .stream_backlog import StreamBacklog
from .stream_relay import StreamRelay
from .sync import Syncer
from .webhooks import Webhooks

log = structlog.get_logger("wa_router.app")


CONFIG = web.AppKey("config", Config)
ROUTER = web.AppKey("router", Router)
METRICS = web.AppKey("metrics", Metrics)


def build_store(cfg: Config) -> Store:
    if cfg.store.kind == "memory":
        return MemoryStore(tombstone_ttl_s=cfg.directory.tombstone_ttl_s)
    if cfg.store.kind == "redis":
        return RedisStore(
            cfg.store.redis_url,
            key_prefix=cfg.store.key_prefix,
            sentinels=tuple(sentinel_address(a) for a in cfg.store.sentinels),
            sentinel_master=cfg.store.sentinel_master,
            tombstone_ttl_s=cfg.directory.tombstone_ttl_s,
        )
    raise ConfigError("store.kind", f"unknown store {cfg.store.kind}")  # pragma: no cover


def sentinel_address(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def build_backlog(
    cfg: Config,
    forwarder: Forwarder,
    breaker: Breaker,
    *,
    worker: int | None = None,
    workers: int = 1,
) -> tuple[Backlog | None, Delivering | None]:
    """Where webhooks wait for Laravel, and what delivers them; none without relaying."""
    wh = cfg.webhooks
    if not (wh.secrets and wh.laravel_url):
        return None, None
    # Laravel counts per client IP: this process's share of the allowance, which is all of
    # it with one process (the SQLite backlog); with the streams the count is shared in
    # Redis and the share only decides while Redis does not answer (shared_budget.py).
    per_minute = wh.laravel_max_per_minute
    share = None if per_minute is None else max(1, per_minute // workers)
    own = LaravelBudget(share, window_s=wh.laravel_limit_window_s)
    laravel = laravel_instance(wh.laravel_url)

    def relay(budget: Budget) -> Relay:
        return Relay(
            forwarder,
            laravel,
            secret=wh.secrets[0],
            resign_after_s=wh.resign_after_s,
            timeout_s=wh.relay_timeout_s,
            retry_base_s=wh.retry_base_s,
            retry_max_s=wh.retry_max_s,
            inflight_s=wh.inflight_s,
            budget=budget,
        )

    state = Path(cfg.state.dir)
    if backlog_kind(cfg) == "sqlite":
        sqlite = SqliteBacklog(state / "webhooks.sqlite3", max_items=wh.backlog_max_items)
        return sqlite, Deliverer(sqlite, relay(own))
    # Each process its own spool file: two movers of one file would both move its items.
    name = "webhooks-spool.sqlite3" if worker is None else f"webhooks-spool-{worker}.sqlite3"
    streams = StreamBacklog(
        cfg.store.redis_url,
        SqliteBacklog(state / name, max_items=wh.backlog_max_items),
        key_prefix=cfg.store.key_prefix,
        shards=wh.shards,
        max_items=wh.backlog_max_items,
        sentinels=tuple(sentinel_address(a) for a in cfg.store.sentinels),
        sentinel_master=cfg.store.sentinel_master,
        breaker=breaker,
    )
    shared = SharedBudget(
        streams.redis,
        key_prefix=cfg.store.key_prefix,
        per_window=per_minute,
        window_s=wh.laravel_limit_window_s,
        breaker=breaker,
        fallback=own,
    )
    return streams, StreamRelay(streams, relay(shared), claim_after_s=wh.claim_after_s)


def build_router(
    cfg: Config,
    *,
    store: Store | None = None,
    worker: int | None = None,
    workers: int = 1,
    forwarder: Forwarder | None = None,
) -> Router:
    """Every part, wired; `store` and `forwarder` replace the configured ones (tests give
    the memory ones: memforward.py)."""
    profile = build_profile(cfg.profile, cfg.rules)
    pool = Pool(
        cfg.instances,
        suspect_cooldown_s=cfg.pool.suspect_cooldown_s,
        fall=cfg.health.fall,
        rise=cfg.health.rise,
    )
    snapshot: Snapshot | None = None
    if store is None:
        store = build_store(cfg)
        every_s = cfg.state.directory_snapshot_s
        if isinstance(store, MemoryStore) and every_s is not None:
            # Each worker has a directory of its own (server.py), and so a file.
            name = "directory.json" if worker is None else f"directory-{worker}.json"
            names = [i.name for i in cfg.instances]
            snapshot = Snapshot(store, Path(cfg.state.dir) / name, every_s, names)
    # One for the store's Redis: whichever part sees it hang, all skip it for a moment.
    breaker = Breaker(cfg.store.deadline_s, cfg.store.breaker_s)
    directory = Directory(
        store,
        cache_ttl_s=cfg.directory.cache_ttl_s,
        cache_max_entries=cfg.directory.cache_max_entries,
        breaker=breaker,
    )
    if forwarder is None:
        client = LeanForwarder if cfg.upstream.client == "lean" else AiohttpForwarder
        forwarder = client(
            connect_timeout_s=cfg.upstream.connect_timeout_s,
            keepalive_s=cfg.upstream.keepalive_s,
            limit_per_host=cfg.upstream.max_connections_per_instance,
            pool_wait_s=cfg.upstream.pool_wait_s,
        )
    discovery = Discovery(
        pool=pool,
        profile=profile,
        forwarder=forwarder,
        directory=directory,
        probe_timeout_s=cfg.discovery.probe_timeout_s,
        negative_ttl_s=cfg.discovery.negative_ttl_s,
    )
    # Parked sessions are asked about again now and then: with the Node key, one listing
    # per instance answers for all of them, so often (a session is served within ~0.15 s
    # of its return even without webhooks); otherwise one probe per session and instance,
    # less often, and rarely when a session_ready webhook will wake them anyway.
    if cfg.upstream.api_key:
        first_s, max_s = 0.05, 0.15
    elif not cfg.webhooks.secrets:
        first_s, max_s = 0.25, 1.0
    else:
        first_s, max_s = 1.0, 2.0
    parking = Parking(
        max_per_session=cfg.parking.max_per_session,
        max_total=cfg.parking.max_total,
        recheck_first_s=first_s,
        recheck_max_s=max_s,
    )
    # Whoever stores a connected owner (webhook, discovery, sync, another router through
    # the store) releases the requests waiting for that session.
    directory.on_connected(parking.wake)
    ids = SessionIdPolicy(cfg.limits.session_id_max_length, cfg.limits.session_id_pattern)
    proxy = Proxy(
        profile=profile,
        rules=RuleTable(profile.rules),
        ids=ids,
        keys=KeyPolicy(profile, cfg.upstream.api_key, cfg.upstream.client_keys),
        pool=pool,
        directory=directory,
        discovery=discovery,
        forwarder=forwarder,
        max_body_bytes=cfg.limits.max_body_bytes,
        probe_timeout_s=cfg.discovery.probe_timeout_s,
        parking=parking,
        parking_cfg=cfg.parking,
    )
    backlog, deliverer = build_backlog(cfg, forwarder, breaker, worker=worker, workers=workers)
    # Replay memory outlives the process: in Redis when routers share it, else in the
    # backlog's file (one router).
    shared: SharedKV | None = (
        store
        if isinstance(store, RedisStore)
        else backlog
        if isinstance(backlog, SqliteBacklog)
        else None
    )
    webhooks = Webhooks(
        cfg=cfg.webhooks,
        advertise_url=advertise_url(cfg),
        seen_shared=shared,
        breaker=breaker,
        pool=pool,
        directory=directory,
        discovery=discovery,
        forwarder=forwarder,
        backlog=backlog,
        deliverer=deliverer,
        ids=ids,
    )
    webhooks.on_hint = parking.kick
    webhooks.probe_key = cfg.upstream.api_key
    syncer = Syncer(
        pool=pool,
        profile=profile,
        forwarder=forwarder,
        directory=directory,
        api_key=cfg.upstream.api_key,
        timeout_s=profile_list_timeout(profile),
        ids=ids,
    )
    if cfg.upstream.api_key:
        parking.recheck = syncer.connected_now  # one listing per instance per round

    async def back(inst: Instance) -> None:
        # It restores its accounts now: re-check what the directory says of it, then ask
        # about the parked sessions at once rather than at the watcher's next turn.
        await syncer.run(only=inst)
        parking.recheck_all()

    health = HealthChecker(
        pool=pool, profile=profile, forwarder=forwarder, cfg=cfg.health, on_recovered=back
    )
    return Router(
        cfg,
        profile,
        pool,
        store,
        directory,
        forwarder,
        discovery,
        proxy,
        webhooks,
        health,
        syncer,
        parking,
        SharedDrain(pool, store, deadline_s=cfg.store.deadline_s),
        snapshot=snapshot,
    )


def advertise_url(cfg: Config) -> str:
    """The router's URL as Laravel should call it (relayed webhooks name it)."""
    if cfg.webhooks.advertise_url:
        return cfg.webhooks.advertise_url.rstrip("/")
    host = cfg.server.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{cfg.server.port}"


def profile_list_timeout(profile: Profile) -> float:
    """Listing sessions is a sessions route: Node gives it up to 60 s."""
    rule = next((r for r in profile.rules if r.kind == "pool_list"), None)
    return rule.read_timeout_s if rule is not None else 60.0


async def _sync_loop(router: Router) -> None:
    """Warm sync at start (readiness waits for it, bounded), then every interval."""
    cfg = router.config.sync
    first = asyncio.ensure_future(router.syncer.run())
    try:
        await asyncio.wait_for(asyncio.shield(first), cfg.startup_timeout_s)
    except TimeoutError:
        log.warning("sync_startup_timeout", timeout_s=cfg.startup_timeout_s)
    except Exception as exc:  # a failed sync must not stop the router from serving
        log.error("sync_failed", error=repr(exc))
    router.warm = True
    try:
        await first
    except Exception as exc:
        log.error("sync_failed", error=repr(exc))
    while True:
        await asyncio.sleep(cfg.interval_s)
        try:
            await router.syncer.run()
        except Exception as exc:
            log.error("sync_failed", error=repr(exc))


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Start the parts; after the server stopped taking requests and those in flight ended,
    stop them in reverse order."""
    router = app[ROUTER]
    tasks: list[asyncio.Task[None]] = []
    if router.snapshot is not None:
        await router.snapshot.load()  # before anything reads or writes the directory
    try:
        await router.store.start()
    except Exception as exc:
        # Route without the shared store (cache + discovery) until it can be reached.
        log.error("store_unavailable", op="start", error=repr(exc))
        tasks.append(asyncio.create_task(_start_store_later(router)))
    await router.drain.load()  # drained by an operator on another router, before our start
    router.drain.pinned = frozenset(i.name for i in router.config.instances if i.drain)
    for name in sorted(router.drain.pinned):  # `drain: false` undoes no operator's drain
        await router.drain.set(name, True)
    await router.forwarder.start()
    backlog = router.webhooks.backlog
    deliverer = router.webhooks.deliverer
    delivering: asyncio.Task[None] | None = None
    try:
        if backlog is not None:
            await backlog.open()
            if deliverer is not None:
                delivering = asyncio.create_task(deliverer.run(), name="webhook-delivery")
                tasks.append(delivering)
        tasks.append(asyncio.create_task(router.health.run()))
        tasks.append(asyncio.create_task(_sync_loop(router)))
        if router.snapshot is not None:
            tasks.append(asyncio.create_task(router.snapshot.run(), name="directory-snapshot"))
        log.info(
            "router_started",
            instances=[i.name for i in router.pool.instances],
            profile=router.profile.name,
            store=router.config.store.kind,
            webhooks=bool(router.config.webhooks.secrets),
            backlog=await backlog.size() if backlog is not None else None,
        )
        yield
    finally:
        if deliverer is not None and delivering is not None:
            # Let it hand its shards back itself (deliveries in flight end first).
            deliverer.close()
            await asyncio.wait({delivering}, timeout=router.config.webhooks.relay_timeout_s + 5)
        for task in reversed(tasks):
            await cancel_and_wait(task)
        await router.health.stop()
        if backlog is not None:
            await backlog.close()
        await router.forwarder.close()
        await router.directory.close()
        if router.snapshot is not None:
            await router.snapshot.save()  # what was learned since the last write
        await router.store.close()
        log.info("router_stopped")


async def _start_store_later(router: Router) -> None:
    delay_s = 0.5
    while True:
        await asyncio.sleep(delay_s)
        try:
            await router.store.start()
        except Exception as exc:
            log.warning("store_unavailable", op="start", error=type(exc).__name__)
            delay_s = min(delay_s * 2, 10.0)
        else:
            log.info("store_connected")
            await router.drain.load()  # drained by an operator while we could not hear
            return


async def _drain(app: web.Application) -> None:
    """on_shutdown runs once the listener is closed: give requests in flight the grace,
    then cancel what is left. (aiohttp's own shutdown_timeout is applied twice over.)"""
    router = app[ROUTER]
    grace_s = router.config.server.shutdown_grace_s
    # Parked requests are answered now (503 session_unavailable), not cut off at the end.
    await router.parking.close()
    inflight = router.inflight
    if inflight:
        log.info("router_draining", inflight=len(inflight), grace_s=grace_s)
        # What is cancelled or cut after the grace is answered 503 (runtime.answering).
        late = await inflight.drain(grace_s, on_late=lambda: setattr(router, "stopping", True))
        if late:
            log.warning("router_drain_cancelled", requests=late)


async def _closing_said(request: web.Request, response: web.StreamResponse) -> None:
    """While the router stops, an answer of aiohttp's says the connection ends with it (the
    caller sends no next request into a closing socket). Its head is formed already when
    this runs: the field is set here, and `force_close` makes aiohttp close after it."""
    if request.app[ROUTER].closing:
        response.force_close()
        response.headers[hdrs.CONNECTION] = "close"


class RouterRunner(web.AppRunner):
    """aiohttp's runner with the lean server in front (`server.front: lean`): the sockets
    it serves speak to `lean.LeanServer`, which hands aiohttp what is not a proxied route."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        # The lean server has checked the head against limits.max_header_bytes already:
        # aiohttp's own smaller line limits must not refuse (as text) what it let through.
        limit = app[ROUTER].config.limits.max_header_bytes
        kwargs.setdefault("max_line_size", limit)
        kwargs.setdefault("max_field_size", limit)
        if app[ROUTER].config.server.front == "lean":
            # Nor its count of fields (128: once a plain-text 400, on HTTP/1.0): the head's
            # size, checked already, bounds it. (aiohttp's front keeps the count: there it
            # is what bounds a head of fields each up to the field limit.)
            kwargs.setdefault("max_headers", limit)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        router = self.app[ROUTER]
        if router.config.server.front != "lean":
            return server
        # Duck-typed: the runner only calls it, pre_shutdown() and shutdown().
        return cast(web.Server, LeanServer(server, router, router.config))

    async def cleanup(self) -> None:
        # Before the listener closes (aiohttp's front) or the lean server's pre_shutdown:
        # from now every answer says `Connection: close`.
        if self._app is not None:
            self._app[ROUTER].closing = True
        await super().cleanup()


def build_app(
    cfg: Config, *, store: Store | None = None, worker: int | None = None, workers: int = 1
) -> web.Application:
    router = build_router(cfg, store=store, worker=worker, workers=workers)
    # Bodies are read by the proxy itself (JSON 413); aiohttp's own limit only backs it up.
    # auto_decompress off: a gzip request body must reach Node as the gzip bytes it is,
    # matching the Content-Encoding header that goes with it.
    app = web.Application(
        client_max_size=cfg.limits.max_body_bytes + 1,
        handler_args={"auto_decompress": False},
        middlewares=[answering(router)],
    )
    app[CONFIG] = cfg
    app[ROUTER] = router
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_drain)
    app.on_response_prepare.append(_closing_said)
    wh = cfg.webhooks
    view = view_of(router)
    metrics = Metrics(view)
    router.proxy.observe_latency = metrics.observe_upstream
    router.proxy.observe_request = metrics.observe_request
    router.parking.observe_wait = metrics.observe_park
    app[METRICS] = metrics
    app.router.add_get("/metrics", metrics.handle)
    app.router.add_route("*", "/metrics", only("GET", "HEAD"))
    app.router.add_post(wh.path, router.webhooks.intake)
    app.router.add_route("*", wh.path, only("POST"))
    app.router.add_route(
        "*",
        wh.passthrough_prefix.rstrip("/") + "/{tail:.*}",
        router.webhooks.passthrough,
    )
    add_admin_routes(app, view, RouterControl(router))
    app.router.add_route("*", "/{tail:.*}", router.proxy.handle)
    return app
