"""Directory: the sync measurements (instances in a subprocess, a router syncing in this one)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from wa_router.app import build_router
from wa_router.config import Config, config_from_dict

from . import _harness as h
from . import common as c


@dataclass(slots=True)
class SyncSample:
    store: str
    run: str  # "first" | "second"
    wall_s: float
    cpu_s: float  # the router's (this process)
    sims_cpu_s: float  # the instances' (their process): listing and JSON
    learned: int
    verified: int
    other: str  # fixed / lost / duplicated / unverified / instance errors, when any
    stall_ms: float  # the longest the event loop went without running a 1 ms ticker


@contextlib.asynccontextmanager
async def simhost(
    instances: int, sessions: int, cores: h.Cores
) -> AsyncIterator[tuple[list[str], int]]:
    """The instances in a subprocess pinned to the other core; yields (urls, pid)."""
    argv = [sys.executable, "-m", "bench._simhost", str(instances), str(sessions)]
    proc = await asyncio.create_subprocess_exec(
        *cores.router_prefix(), *argv, cwd=c.REPO, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        if not line:
            raise RuntimeError("bench._simhost exited before it was ready")
        yield json.loads(line)["urls"], proc.pid
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


def sync_config(urls: list[str], redis_url: str | None = None) -> Config:
    raw: dict[str, Any] = {
        "instances": [{"name": f"node-{i + 1}", "url": u} for i, u in enumerate(urls)],
        "upstream": {"api_key": h.API_KEY},
        "log": {"level": "warning"},
    }
    if redis_url is not None:
        raw["store"] = {"kind": "redis", "redis_url": redis_url,
                        "key_prefix": f"bench-{uuid.uuid4().hex[:8]}:"}  # fmt: skip
    return config_from_dict(raw)


async def ticker(gaps: list[float], stop: asyncio.Event) -> None:
    """What live traffic would see: how long the loop goes without running a 1 ms timer."""
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


async def sync_runs(cfg: Config, sims_pid: int, label: str) -> list[SyncSample]:
    router = build_router(cfg)
    await router.store.start()
    await router.forwarder.start()
    out = []
    try:
        for which in ("first", "second"):
            cpu, sims_cpu = time.process_time(), c.tree_cpu_s(sims_pid)
            gaps: list[float] = []
            stop = asyncio.Event()
            tick = asyncio.create_task(ticker(gaps, stop))
            started = time.perf_counter()
            report = await router.syncer.run()
            wall = time.perf_counter() - started
            stop.set()
            await tick
            other = [f"{k} {len(v)}" for k, v in (("fixed", report.fixed), ("lost", report.lost),
                     ("duplicated", report.duplicated)) if v]  # fmt: skip
            other += [f"{n}: {s}" for n, s in report.instances.items() if s != "ok"]
            sample = SyncSample(label, which, wall, time.process_time() - cpu,
                                c.tree_cpu_s(sims_pid) - sims_cpu, len(report.learned),
                                report.verified, ", ".join(other) or "-",
                                max(gaps, default=0.0) * 1000)  # fmt: skip
            print(f"directory sync {label:<6} {which:<6} {wall:6.2f} s wall, router CPU "
                  f"{sample.cpu_s:5.2f} s, loop stall {sample.stall_ms:,.0f} ms, learned "
                  f"{sample.learned}, verified {sample.verified} {sample.other}",
                  flush=True)  # fmt: skip
            out.append(sample)
    finally:
        await router.forwarder.close()
        await router.store.close()
    return out


Top = list[tuple[str, float, float]]


async def profile_sync(cfg: Config, cores: h.Cores, seconds: int) -> tuple[Top | None, str]:
    """py-spy on this process during one more memory-store sync pair (first + second):
    (the top functions, a note on the file); (None, why not)."""
    out = c.SCRATCH / "directory" / "sync.speedscope.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    prefix = c.pinned(None if cores.router is None else str(cores.router), cores.taskset)
    with TemporaryDirectory(prefix="wa-bench-dir-") as tmp:
        try:
            spy = c.pyspy_record(os.getpid(), seconds, out, Path(tmp), prefix)
        except FileNotFoundError as exc:
            return None, str(exc)
        try:
            await asyncio.sleep(0.5)  # let py-spy attach
            router = build_router(cfg)
            await router.forwarder.start()
            try:
                for _ in range(2):
                    await router.syncer.run()
            finally:
                await router.forwarder.close()
            await asyncio.to_thread(spy.popen.wait, seconds + 30)
        finally:
            await asyncio.to_thread(spy.stop)
    if not await asyncio.to_thread(out.exists):
        return None, "py-spy wrote no profile"
    return c.speedscope_top(out, 15), f"`{out.relative_to(c.REPO)}`, {seconds} s"
