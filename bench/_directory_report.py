"""Directory: the Markdown report of `bench.directory`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _harness as h
from . import common as c

if TYPE_CHECKING:
    from .directory import Plan, Results

DEFAULT_CACHE_MAX = 100_000  # directory.cache_max_entries


def memory_table(res: Results) -> list[str]:
    rows = []
    for m in res.memory:
        n = m["entries"]
        per = {k: m[k] / n for k in ("ids", "store", "cache")}
        total = sum(per.values())
        how = "RSS delta" if m["mode"] == "rss" else "tracemalloc (exact)"
        rows.append([f"{n:,}", how, f"{per['ids']:.0f}", f"{per['store']:.0f}",
                     f"{per['cache']:.0f}", f"**{total:.0f}**",
                     f"{total * n / 2**20:,.0f}", f"{m['seconds']:.1f}"])  # fmt: skip
    head = [
        "entries",
        "measured by",
        "id string B/entry",
        "MemoryStore B/entry",
        "Directory cache B/entry",
        "total B/entry",
        "total MiB",
        "build s",
    ]
    out = [c.md_table(head, rows), ""]
    big = [m for m in res.memory if m["mode"] == "rss" and m["entries"] >= 10 * DEFAULT_CACHE_MAX]
    if big:
        m = big[-1]
        n = m["entries"]
        capped = m["ids"] + m["store"] + m["cache"] / n * DEFAULT_CACHE_MAX
        out += [
            f"With the default `directory.cache_max_entries: {DEFAULT_CACHE_MAX:,}` only "
            f"that many entries are cached: {n:,} sessions then cost about "
            f"{capped / 2**20:,.0f} MiB (RSS), {capped / n:.0f} B per session.",
            "",
        ]
    if res.memory:
        out += [f"Entries are built as the webhook path builds them (instance name, status and "
                f"source shared between entries). Entries learned by sync (or discovery) each "
                f"carry their own status string (`status.lower()` of the parsed listing): "
                f"+{res.memory[0]['status_str']} B per entry.", ""]  # fmt: skip
    return out


def lookup_table(plan: Plan, res: Results) -> list[str]:
    rows = [[name, h.spread(v, 0)] for name, v in res.lookups]
    out = [
        f"Tight loop over {plan.lookup_entries:,} ids ({plan.redis_lookups:,} for Redis, "
        f"one at a time), {plan.lookup_repeats} repeats; ns per call including the "
        f"coroutine call, median (min-max) over repeats; `time.perf_counter_ns`.",
        "",
    ]
    return [*out, c.md_table(["lookup", "ns per call"], rows), ""]


def sync_table(plan: Plan, res: Results) -> list[str]:
    rows = []
    for store in ("memory", "redis"):
        for which in ("first", "second"):
            got = [s for s in res.sync if s.store == store and s.run == which]
            if not got:
                continue
            rate = [plan.sync_sessions / s.wall_s for s in got]
            rows.append([store, "first: every session learned" if which == "first"
                         else "second: every session verified", str(len(got)),
                         h.spread([s.wall_s for s in got], 2), h.spread([s.cpu_s for s in got], 2),
                         h.spread([s.sims_cpu_s for s in got], 2), h.spread(rate, 0),
                         h.spread([s.learned for s in got], 0),
                         h.spread([s.verified for s in got], 0),
                         h.spread([s.stall_ms for s in got], 0),
                         "; ".join(sorted({s.other for s in got}))])  # fmt: skip
    head = [
        "store",
        "run",
        "runs",
        "wall s",
        "router CPU s",
        "instances' CPU s",
        "sessions/s",
        "learned",
        "verified",
        "longest event-loop stall ms",
        "other",
    ]
    out = [c.md_table(head, rows), ""]
    if res.profile is not None:
        out += [
            f"Where the memory-store sync's time goes: py-spy record (200 Hz, CPU only) of "
            f"the bench process during one more sync pair (first + second, not in the "
            f"table), {res.profile_note}.",
            "",
            c.profile_table(res.profile),
            "",
        ]
    elif res.profile_note:
        out += [f"No sync profile: {res.profile_note}.", ""]
    if res.redis_bytes_per_entry is not None:
        out += [
            f"Redis `used_memory` grew by {res.redis_bytes_per_entry:,.0f} B per session "
            f"(entry key + JSON value, the live set, the counts hash) over the first Redis "
            f"sync.",
            "",
        ]
    return out


def redis_table(plan: Plan, res: Results) -> list[str]:
    if not res.propagate_us:
        return [res.redis_note or "No Redis measurements.", ""]
    w, p = res.write_us, res.propagate_us
    rows = [["router A's write (`observe`: one EVALSHA)", f"{h.percentile(w, 50):,.0f}",
             f"{h.percentile(w, 99):,.0f}", f"{max(w):,.0f}"],
            ["A's write started -> B's cache holds the new owner", f"{h.percentile(p, 50):,.0f}",
             f"{h.percentile(p, 99):,.0f}", f"{max(p):,.0f}"]]  # fmt: skip
    out = [
        f"{len(p):,} changes one after another (of {plan.changes:,}; {res.missed} never "
        f"heard within 2 s); after each, B's `lookup` returned the old owner "
        f"{res.stale_after_event} times.",
        "",
    ]
    return [*out, c.md_table(["µs", "p50", "p99", "max"], rows), ""]


def render(plan: Plan, cores: h.Cores, res: Results, head: list[str]) -> str:
    out = [*head, "### Method", ""]
    pinning = cores.describe("the sync's simulated instances (`bench._simhost`) and redis-server")
    out += [
        f"""\
- Pinning: {pinning}. The memory runs are separate processes on the bench core.
- Session ids as Blazz makes them (`webjs_<workspace>_<ms>_<rand6>`, ~35 characters); 16 \
instance names.
- Memory: one fresh process per size (`python -m bench._dirmem N rss|tracemalloc`): the id \
strings, then a `MemoryStore` with one `Entry` per id, then a `Directory` whose cache \
(sized to N for the measurement) is filled by one `lookup` per id; each phase measured after \
`gc.collect()`. RSS includes allocator slack (pymalloc arenas, dicts' spare room); \
tracemalloc counts Python allocations exactly.
- Sync: {plan.sync_sessions:,} connected sessions over {plan.sync_instances} simulated \
instances ({plan.sync_sessions // plan.sync_instances:,} each, answering `GET /api/sessions` \
with all of them) in a subprocess; in this process a fresh router (`build_router`, its \
forwarder, memory store) runs `Syncer.run()` twice: the first learns every session, the \
second verifies every session. Wall time by `perf_counter`; router CPU = this process's \
`process_time`; instances' CPU = their process tree's utime + stime. \
{plan.sync_repeats} routers with the memory store; then one with the Redis store (a fresh key \
prefix) when redis-server is there.
- Redis propagation: two routers (`build_router` twice: two Directories, two RedisStores \
with their own pub/sub listener) in one process and event loop, on one redis-server \
(`tests/redis_server.py`'s `RedisServer`, free port, no persistence). {plan.changes:,} \
sessions owned by node-1 and cached by router B; then one at a time router A \
`observe(session, node-2, Source.WEBHOOK)`; measured from just before A's write to B's store \
subscription callback for that change (B's Directory subscribed first, so its cache is \
updated then), checked with B's `lookup`. Clock: `time.perf_counter_ns` (CLOCK_MONOTONIC), \
one process.""",
        "",
    ]
    out += ["### Memory per session entry", "", *memory_table(res)]
    out += ["### Lookup cost", "", *lookup_table(plan, res)]
    out += [
        f"### Sync of {plan.sync_sessions:,} sessions over {plan.sync_instances} "
        f"instances (median (min-max))",
        "",
        *sync_table(plan, res),
    ]
    out += [
        "### Redis: ownership change on router A -> router B routes by it",
        "",
        *redis_table(plan, res),
    ]
    out += ["### Notes", "", *notes(plan, res), ""]
    return "\n".join(out)


def notes(plan: Plan, res: Results) -> list[str]:
    out = []
    mem = [s for s in res.sync if s.store == "memory"]
    if mem:
        stall = max(s.stall_ms for s in mem)
        first = c.median([s.wall_s for s in mem if s.run == "first"]) or 0.0
        second = c.median([s.wall_s for s in mem if s.run == "second"]) or 0.0
        out.append(
            f"- With the memory store a sync of {plan.sync_sessions:,} sessions holds the event "
            f"loop for up to {stall:,.0f} ms at a time (the longest a 1 ms timer waited): "
            f"`Syncer._run` awaits `store.get` and `observe` per session, and with the memory "
            f"store those awaits never suspend, so the whole comparison ({first:.2f} s first, "
            f"{second:.2f} s second run) runs as one block; every request in flight waits for "
            f"it. The periodic sync (`sync.interval_s`, 60 s) repeats this stall."
        )
    rds = {s.run: s for s in res.sync if s.store == "redis"}
    if rds:
        per = {k: 1e6 * v.cpu_s / plan.sync_sessions for k, v in rds.items()}
        out.append(
            f"- With the Redis store the same sync took {rds['first'].wall_s:.1f} s (first) and "
            f"{rds['second'].wall_s:.1f} s (second); the router's CPU was "
            f"{per['first']:.0f} and {per['second']:.0f} µs per session: one `GET` per "
            f"session, one `EVALSHA` per learned one, one after another (see the lookup "
            f"table for what a single round trip costs through redis-py). Batching the reads "
            f"(MGET of 1,000 ids, as `RedisStore.items()` already does) would cut that to a "
            f"few hundred round trips. Even here the loop stalls for up to "
            f"{max(v.stall_ms for v in rds.values()):,.0f} ms: the listings are parsed, merged "
            f"and sorted with no await in between."
        )
    if res.propagate_us:
        out.append(
            f"- Redis propagation p99 {h.percentile(res.propagate_us, 99):,.0f} µs: A's write "
            f"(a Lua script that also PUBLISHes) plus B's listener waking up; both routers "
            f"share one event loop here, so B can only run its listener while A awaits."
        )
    return out
