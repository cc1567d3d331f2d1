"""Memory of N directory entries, measured in a fresh process (the directory bench runs it).

    python -m bench._dirmem N tracemalloc|rss

Phases, each measured after a `gc.collect()`: the session id strings; a `MemoryStore` with
one `Entry` per id (`store.put`, as `Directory.observe` does); then the `Directory` cache
filled by one `lookup` per id (a store hit each, so the cache holds the same Entry objects;
the cache is sized to N). Prints one JSON line: bytes per phase and seconds.
`tracemalloc` counts Python allocations exactly (and runs ~2x slower); `rss` is what the
process costs the machine (pymalloc arenas, the dicts' spare room), from /proc/self/statm.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
import tracemalloc
from collections.abc import Callable

from wa_router.directory import Directory
from wa_router.stores import Entry, MemoryStore, Source

from ._harness import session_ids

INSTANCES = tuple(f"node-{i}" for i in range(1, 17))
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


async def build(n: int, measure: Callable[[], int]) -> dict[str, float]:
    gc.collect()
    m0 = measure()
    started = time.perf_counter()
    ids = session_ids(n, seed=3)
    gc.collect()
    m1 = measure()
    store = MemoryStore()
    status = "connected"
    for i, sid in enumerate(ids):
        await store.put(sid, Entry(INSTANCES[i % len(INSTANCES)], time.time(), Source.SYNC, status))
    gc.collect()
    m2 = measure()
    directory = Directory(store, cache_ttl_s=300.0, cache_max_entries=n)
    for sid in ids:
        await directory.lookup(sid)
    gc.collect()
    m3 = measure()
    assert len(store) == n and directory.stats.store_hits == n
    return {"entries": n, "ids": m1 - m0, "store": m2 - m1, "cache": m3 - m2,
            "seconds": time.perf_counter() - started,
            "status_str": sys.getsizeof("".join(["connect", "ed"]))}  # fmt: skip


def main(argv: list[str]) -> int:
    n, mode = int(argv[1]), argv[2]
    if mode == "tracemalloc":
        tracemalloc.start()

        def measure() -> int:
            return tracemalloc.get_traced_memory()[0]
    else:
        measure = rss_bytes
    result = asyncio.run(build(n, measure))
    result["mode"] = mode  # type: ignore[assignment]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
