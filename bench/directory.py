"""Directory: memory per session entry, lookup cost, sync of 100 k sessions, Redis propagation.

- Memory: 100 k and 1 M entries (MemoryStore + the Directory cache), each size in a fresh
  process (`bench._dirmem`): RSS deltas, and exact Python allocations (tracemalloc) at 100 k.
- Lookups: ns per `Directory.lookup` (cache hit, store hit, miss) in a tight loop, in process.
- Sync: 100 k sessions over 16 simulated instances (in a subprocess on the other core);
  `Syncer.run()` of a fresh router twice: the first learns every session, the second
  verifies them all. Memory store, then the Redis store.
- Redis: two routers on one real redis-server; router A writes an ownership change, the time
  until router B routes by it (its store subscription updated its cache), 1,000 changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from wa_router.app import build_router
from wa_router.directory import Directory
from wa_router.stores import Entry, MemoryStore, RedisStore, Source, Store

from . import _harness as h
from . import common as c
from ._directory_report import render
from ._dirsync import SyncSample, profile_sync, simhost, sync_config, sync_runs


@dataclass(frozen=True, slots=True)
class Plan:
    sizes: tuple[int, ...]  # memory, RSS
    exact_sizes: tuple[int, ...]  # memory, tracemalloc
    lookup_entries: int
    lookup_repeats: int
    redis_lookups: int
    sync_sessions: int
    sync_instances: int
    sync_repeats: int
    redis_sync: bool
    changes: int
    smoke: bool
    out: Path


@dataclass(slots=True)
class Results:
    memory: list[dict[str, Any]] = field(default_factory=list)
    lookups: list[tuple[str, list[float]]] = field(default_factory=list)
    sync: list[SyncSample] = field(default_factory=list)
    redis_bytes_per_entry: float | None = None
    write_us: list[float] = field(default_factory=list)
    propagate_us: list[float] = field(default_factory=list)
    stale_after_event: int = 0
    missed: int = 0
    redis_note: str = ""
    profile: list[tuple[str, float, float]] | None = None
    profile_note: str = ""


# -- memory (subprocesses) -------------------------------------------------------------------


def memory(plan: Plan) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    runs = [(n, "rss") for n in plan.sizes] + [(n, "tracemalloc") for n in plan.exact_sizes]
    for n, mode in runs:
        argv = [sys.executable, "-m", "bench._dirmem", str(n), mode]
        done = subprocess.run(argv, cwd=c.REPO, capture_output=True, text=True, timeout=600,
                              check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"bench._dirmem {n} {mode} failed: {done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"directory memory {mode:<11} {n:>9,} entries: "
              f"{(result['ids'] + result['store'] + result['cache']) / n:,.0f} B/entry "
              f"({result['seconds']:.1f} s)", flush=True)  # fmt: skip
        out.append(result)
    return out


# -- lookups ---------------------------------------------------------------------------------


async def per_call_ns(fn: Callable[[str], Awaitable[object]], ids: list[str],
                      repeats: int) -> list[float]:  # fmt: skip
    out = []
    for _ in range(repeats):
        started = time.perf_counter_ns()
        for sid in ids:
            await fn(sid)
        out.append((time.perf_counter_ns() - started) / len(ids))
    return out


async def fill(store: Store, ids: list[str]) -> None:
    now = time.time()
    for i, sid in enumerate(ids):
        await store.put(sid, Entry(f"node-{i % 16 + 1}", now, Source.SYNC, "connected"))


async def raw_get_ns(url: str, ids: list[str], repeats: int) -> list[float]:
    """GET of a missing key, written and read by hand: what a round trip costs here."""
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))

    async def get(sid: str) -> None:
        key = f"bench-raw:{sid}".encode()
        writer.write(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key))
        await reader.readuntil(b"\r\n")  # `$-1`: no such key

    try:
        return await per_call_ns(get, ids, repeats)
    finally:
        writer.close()
        await writer.wait_closed()


async def lookups(plan: Plan, redis_url: str | None) -> list[tuple[str, list[float]]]:
    ids = h.session_ids(plan.lookup_entries, seed=11)
    unknown = [f"{sid}x" for sid in ids]
    store = MemoryStore()
    await fill(store, ids)
    cached = Directory(store, cache_ttl_s=300.0, cache_max_entries=len(ids))
    for sid in ids:
        await cached.lookup(sid)
    expired = Directory(store, cache_ttl_s=0.0, cache_max_entries=len(ids))

    async def noop(sid: str) -> None:
        return None

    r = plan.lookup_repeats
    out = [
        ("empty coroutine call (the loop's floor)", await per_call_ns(noop, ids, r)),
        ("cache hit: `Directory.lookup`", await per_call_ns(cached.lookup, ids, r)),
        ("store hit: `Directory.lookup`, cache entry expired (TTL 0): MemoryStore + refill",
         await per_call_ns(expired.lookup, ids, r)),
        ("miss: `Directory.lookup` of an unknown session (MemoryStore)",
         await per_call_ns(cached.lookup, unknown, r)),
        ("`MemoryStore.get` (hit)", await per_call_ns(store.get, ids, r)),
    ]  # fmt: skip
    if redis_url is not None:
        rstore = RedisStore(redis_url, key_prefix=f"bench-{uuid.uuid4().hex[:8]}:")
        await rstore.start()
        try:
            few = ids[: plan.redis_lookups]
            await fill(rstore, few)
            rdir = Directory(rstore, cache_ttl_s=0.0, cache_max_entries=len(few))
            out += [
                ("raw RESP `GET` over an asyncio stream (the round trip's floor, no client "
                 "library)", await raw_get_ns(redis_url, few, r)),
                ("`RedisStore.get` (hit: one round trip)", await per_call_ns(rstore.get, few, r)),
                ("store hit via Redis: `Directory.lookup`, cache entry expired",
                 await per_call_ns(rdir.lookup, few, r)),
            ]  # fmt: skip
        finally:
            await rstore.close()
    for name, values in out:
        print(f"directory lookup {h.spread(values, 0):>22} ns  {name}", flush=True)
    return out


# -- sync ------------------------------------------------------------------------------------


async def sync(plan: Plan, cores: h.Cores, redis_url: str | None, res: Results) -> None:
    async with simhost(plan.sync_instances, plan.sync_sessions, cores) as (urls, pid):
        for _ in range(plan.sync_repeats):
            res.sync += await sync_runs(sync_config(urls), pid, "memory")
        if not plan.smoke:
            seconds = max(2, round(2 * sum(s.wall_s for s in res.sync[:2]) + 1))
            res.profile, res.profile_note = await profile_sync(sync_config(urls), cores, seconds)
        if redis_url is not None and plan.redis_sync:
            rds = aioredis.Redis.from_url(redis_url)
            try:
                before = int((await rds.info("memory"))["used_memory"])
                res.sync += await sync_runs(sync_config(urls, redis_url), pid, "redis")
                after = int((await rds.info("memory"))["used_memory"])
                res.redis_bytes_per_entry = (after - before) / plan.sync_sessions
            finally:
                await rds.aclose()


# -- Redis propagation -----------------------------------------------------------------------


async def propagation(plan: Plan, redis_url: str, res: Results) -> None:
    cfg = sync_config(["http://127.0.0.1:9", "http://127.0.0.1:10"], redis_url)
    a, b = build_router(cfg), build_router(cfg)
    await a.store.start()
    await b.store.start()
    heard: dict[str, asyncio.Future[int]] = {}

    def on_change(session: str, entry: Entry | None) -> None:
        # Called after B's Directory.on_store_change (it subscribed first): B's cache is
        # up to date when this runs.
        fut = heard.get(session)
        if fut is not None and not fut.done() and entry is not None and entry.instance == "node-2":
            fut.set_result(time.perf_counter_ns())

    b.store.subscribe(on_change)
    try:
        ids = h.session_ids(plan.changes, seed=13)
        for sid in ids:
            await a.directory.observe(sid, "node-1", Source.WEBHOOK)
        for sid in ids:  # B routes these now: cached
            entry = await b.directory.lookup(sid)
            assert entry is not None and entry.instance == "node-1"
        await asyncio.sleep(0.2)  # let B's listener drain the setup's messages
        loop = asyncio.get_running_loop()
        for sid in ids:
            heard[sid] = loop.create_future()
            started = time.perf_counter_ns()
            await a.directory.observe(sid, "node-2", Source.WEBHOOK)
            res.write_us.append((time.perf_counter_ns() - started) / 1000)
            try:
                at = await asyncio.wait_for(heard[sid], 2.0)
            except TimeoutError:
                res.missed += 1
                continue
            res.propagate_us.append((at - started) / 1000)
            entry = await b.directory.lookup(sid)
            res.stale_after_event += entry is None or entry.instance != "node-2"
    finally:
        await a.store.close()
        await b.store.close()
    print(f"directory redis propagation: p50 {h.percentile(res.propagate_us, 50):.0f} us, p99 "
          f"{h.percentile(res.propagate_us, 99):.0f} us over {len(res.propagate_us)} changes",
          flush=True)  # fmt: skip


# -- the command -----------------------------------------------------------------------------


async def measure(plan: Plan, cores: h.Cores, res: Results) -> None:
    server = None
    if shutil.which("redis-server") is None:
        res.redis_note = "redis-server is not installed: the Redis rows were skipped."
    else:
        from tests.redis_server import RedisServer  # the tests' own: free port, no disk

        server = RedisServer()
        with h.affinity(cores.router):  # redis-server inherits the other core
            await asyncio.to_thread(server.start)
    url = server.url if server is not None else None
    try:
        res.lookups = await lookups(plan, url)
        await sync(plan, cores, url, res)
        if url is not None:
            await propagation(plan, url, res)
    finally:
        if server is not None:
            await asyncio.to_thread(server.close)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sync-repeats", type=int, default=3, help="memory-store syncs (3)")
    parser.add_argument("--no-redis-sync", action="store_true", help="skip the Redis sync")
    parser.add_argument(
        "--exact-1m", action="store_true", help="tracemalloc at 1 M too (about a minute more)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI: 2 k entries, 2 sims, 20 "
        "changes; writes bench/out/directory-smoke.md unless --out",
    )
    parser.add_argument("--out", type=Path, help="default: bench/results/directory.md")


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        plan = Plan((2000,), (2000,), 2000, 3, 200, 2000, 2, 1, True, 20, True,
                    args.out or c.SCRATCH / "directory-smoke.md")  # fmt: skip
    else:
        exact = (100_000, 1_000_000) if args.exact_1m else (100_000,)
        plan = Plan((100_000, 1_000_000), exact, 100_000, 7, 2000, 100_000, 16,
                    args.sync_repeats, not args.no_redis_sync, 1000, False,
                    args.out or c.RESULTS / "directory.md")  # fmt: skip
    load_at_start, cores, started = h.load_average(), h.Cores.split(), time.monotonic()
    res = Results()
    with h.affinity(cores.bench):
        res.memory = memory(plan)
        h.run_loop(measure(plan, cores, res))
    command = " ".join(["python -m bench", *sys.argv[1:]])
    head = h.header("directory", command, time.monotonic() - started, plan.smoke, load_at_start)
    h.write_results(render(plan, cores, res, head), plan.out)
    return 0
