"""Failover: one of 4 instances crashes under steady load; its sessions come up on the others.

Per run: 4 simulated instances and 1,000 sessions spread over them (in the bench's event
loop, pinned to one core), the router as a subprocess pinned to the other core, warm (its
start-up sync learned every owner). An open-loop load generator sends a fixed rate of
`POST /api/messages/send` and `GET /api/sessions/{id}/status`, half each, random sessions.
After `--steady` seconds one instance is stopped (a crash: listener closed, connections
aborted); after the gap its sessions are added on the other three, either silently
(rediscovery only) or each announced by a signed `session_ready` webhook to the router.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp

from . import _harness as h
from . import common as c
from ._failover_report import Outcome, Scenario, analyse, render

SEND_PATH = "/api/messages/send"
VICTIM = 1  # node-2


@dataclass(frozen=True, slots=True)
class Plan:
    sessions: int
    rate: float
    warm_s: float
    steady_s: float
    after_s: float
    repeats: int
    scenarios: tuple[Scenario, ...]
    profile: bool
    smoke: bool
    out: Path


@dataclass(slots=True)
class Req:
    rid: int
    session: str
    kind: str  # "send" | "status"
    t_sched: float  # perf_counter when it was due (open loop: latency counts from here)
    t_end: float = 0.0
    status: int = 0  # 0: no HTTP answer (client-side error)
    cause: str = ""  # router `error` code, the instance's error, or `client: Exception`
    sent: bool = False  # the router says it left for `instance` (may have been processed)
    instance: str = ""


@dataclass(slots=True)
class Run:
    scenario: Scenario
    sessions: int
    victim: str
    moved: list[str]
    reqs: list[Req] = field(default_factory=list)
    t0: float = 0.0
    t_stop: float = 0.0
    t_stop_done: float = 0.0
    t_add: dict[str, float] = field(default_factory=dict)
    reached_victim: set[int] = field(default_factory=set)
    discovery_before: dict[str, int] = field(default_factory=dict)
    discovery_after: dict[str, int] = field(default_factory=dict)
    probes_seen: int = 0
    router_cpu_s: float = 0.0
    directory_size: int = 0
    profile: Path | None = None


async def sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


class Load:
    """Open loop: request i is due at t0 + i / rate and is sent then, answered or not."""

    def __init__(self, http: aiohttp.ClientSession, url: str, sessions: list[str], seed: int):
        self.http, self.url, self.sessions = http, url, sessions
        self.rng = random.Random(seed)
        self.timeout = aiohttp.ClientTimeout(total=20)

    async def run(self, run: Run, rate: float, duration_s: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        for i in range(int(rate * duration_s)):
            due = run.t0 + i / rate
            await sleep_until(due)
            req = Req(i, self.rng.choice(self.sessions), "send" if i % 2 else "status", due)
            run.reqs.append(req)
            task = asyncio.create_task(self.one(req))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=30)

    async def one(self, req: Req) -> None:
        headers = {"X-Bench-Id": str(req.rid)}
        try:
            if req.kind == "send":
                body = {"session_id": req.session, "workspace_id": 1,
                        "recipient_phone": "628123456789", "message": "bench", "type": "text",
                        "api_key": h.API_KEY}  # fmt: skip
                headers["Content-Type"] = "application/json"
                cm = self.http.post(self.url + SEND_PATH, data=json.dumps(body).encode(),
                                    headers=headers, timeout=self.timeout)  # fmt: skip
            else:
                path = f"/api/sessions/{req.session}/status?api_key={h.API_KEY}"
                cm = self.http.get(self.url + path, headers=headers, timeout=self.timeout)
            async with cm as resp:
                data = await resp.read()
                req.status = resp.status
            if req.status != 200:
                req.cause, req.sent, req.instance = h.error_cause(req.status, data)
        except (aiohttp.ClientError, TimeoutError) as exc:
            req.cause = f"client: {type(exc).__name__}"
        req.t_end = time.perf_counter()


async def one_run(plan: Plan, scenario: Scenario, cores: h.Cores, tmp: Path, seed: int,
                  profile_to: Path | None = None) -> Run:  # fmt: skip
    router = h.RouterProc(tmp, cores)
    hooks = scenario.mode == "webhooks"
    sims = await h.start_sims(4, router.url + h.WEBHOOK_PATH if hooks else None)
    sessions = h.session_ids(plan.sessions, seed)
    for i, sid in enumerate(sessions):
        sims[i % len(sims)].add_session(sid)
    victim, others = sims[VICTIM], [s for i, s in enumerate(sims) if i != VICTIM]
    run = Run(scenario, len(sessions), victim.name, [s for s in sessions if s in victim.sessions])
    extra: dict[str, Any] = {"webhooks": {"secrets": [h.WEBHOOK_SECRET]}} if hooks else {}
    if scenario.negative_ttl_s is not None:
        extra["discovery"] = {"negative_ttl_s": scenario.negative_ttl_s}
    doc = h.router_config(router.port, sims, tmp / f"state-{seed}", **extra)
    spy: c.Proc | None = None
    try:
        async with h.client() as http:
            await router.start(doc, http)
            run.discovery_before = await router.discovery(http)
            run.directory_size = run.discovery_before["directory"]
            for sim in sims:
                sim.reset_counters()
            load = Load(http, router.url, sessions, seed)
            cpu_before = c.tree_cpu_s(router.pid)
            run.t0 = time.perf_counter() + 0.05
            t_stop = run.t0 + plan.steady_s

            async def event() -> None:
                nonlocal spy
                if profile_to is not None:
                    await sleep_until(t_stop - 0.5)
                    prefix = c.pinned(None if cores.bench is None else str(cores.bench),
                                      cores.taskset)  # fmt: skip
                    spy = c.pyspy_record(router.pid, int(scenario.gap_s + 4), profile_to, tmp,
                                         prefix)  # fmt: skip
                await sleep_until(t_stop)
                run.t_stop = time.perf_counter()
                await victim.stop()
                run.t_stop_done = time.perf_counter()
                await sleep_until(run.t_stop + scenario.gap_s)
                for k, sid in enumerate(run.moved):
                    others[k % len(others)].add_session(sid, notify=hooks)
                    run.t_add[sid] = time.perf_counter()

            event_task = asyncio.create_task(event())
            await load.run(run, plan.rate, plan.steady_s + plan.after_s)
            await event_task
            run.router_cpu_s = c.tree_cpu_s(router.pid) - cpu_before
            run.discovery_after = await router.discovery(http)
        if spy is not None:
            await asyncio.to_thread(spy.popen.wait, 30)
            found = profile_to is not None and await asyncio.to_thread(profile_to.exists)
            run.profile = profile_to if found else None
    finally:
        if spy is not None:
            await asyncio.to_thread(spy.stop)
        await router.stop()
        await h.stop_sims(sims)
    for sim in sims:
        for r in sim.received:
            bench_id = r.headers.get("X-Bench-Id")
            if sim is victim and bench_id is not None:
                run.reached_victim.add(int(bench_id))
            if bench_id is None and r.method == "GET" and r.path.endswith("/status"):
                run.probes_seen += 1
    return run


async def measure(plan: Plan, cores: h.Cores, tmp: Path) -> tuple[list[Outcome], Path | None]:
    outcomes: list[Outcome] = []
    for rep in range(plan.repeats):
        for k, scenario in enumerate(plan.scenarios):
            run = await one_run(plan, scenario, cores, tmp, seed=1 + rep * 10 + k)
            outcome = analyse(run, plan.warm_s)
            outcomes.append(outcome)
            print(f"failover {rep + 1}/{plan.repeats} {scenario.label:<34} {outcome.line()}",
                  flush=True)  # fmt: skip
    profile = None
    if plan.profile:
        worst = max(outcomes, key=lambda o: (o.cat_c, o.delay_p99 or 0.0))
        if worst.cat_c or (worst.delay_p99 or 0.0) > 0.2:
            out = c.SCRATCH / "failover" / "router-event.speedscope.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.unlink(missing_ok=True)
            try:
                run = await one_run(plan, worst.scenario, cores, tmp, 99, profile_to=out)
                profile = run.profile
                print(f"failover profile run ({worst.scenario.label}): "
                      f"{analyse(run, plan.warm_s).line()}", flush=True)  # fmt: skip
            except FileNotFoundError as exc:
                print(f"failover: no profile: {exc}", file=sys.stderr)
    return outcomes, profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=300.0, help="requests per second (300)")
    parser.add_argument("--steady", type=float, default=4.0, help="seconds before the stop (4)")
    parser.add_argument("--after", type=float, default=6.0, help="seconds after the stop (6)")
    parser.add_argument("--gap", type=float, action="append",
                        help="stop -> sessions back, seconds; repeatable (default 0.5 and 0)")
    parser.add_argument("--negative-ttl", type=float, action="append",
                        help="also run rediscovery only, the first gap, with this "
                        "discovery.negative_ttl_s; repeatable (default 0.2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per scenario (3)")
    parser.add_argument("--no-profile", action="store_true",
                        help="no py-spy run even when a target is missed")
    parser.add_argument("--smoke", action="store_true",
                        help="CI: 100 sessions, 100 req/s, 1 s + 1.5 s, 1 run per scenario; "
                        "writes bench/out/failover-smoke.md unless --out")
    parser.add_argument("--out", type=Path, help="default: bench/results/failover.md")


def run(args: argparse.Namespace) -> int:
    gaps = tuple(args.gap) if args.gap else (0.5, 0.0)
    scenarios = tuple(Scenario(m, g) for g in gaps for m in ("rediscovery", "webhooks"))
    ttls = () if args.smoke else tuple(args.negative_ttl or (0.2,))
    scenarios += tuple(Scenario("rediscovery", gaps[0], ttl) for ttl in ttls)
    if args.smoke:
        plan = Plan(100, 100.0, 0.3, 1.0, 1.5, 1, scenarios, False, True,
                    args.out or c.SCRATCH / "failover-smoke.md")  # fmt: skip
    else:
        plan = Plan(args.sessions, args.rate, 1.0, args.steady, args.after, args.repeats,
                    scenarios, not args.no_profile, False,
                    args.out or c.RESULTS / "failover.md")  # fmt: skip
    runs = plan.repeats * len(scenarios)
    print(f"bench failover: {len(scenarios)} scenarios x {plan.repeats} runs of "
          f"{plan.steady_s + plan.after_s:.0f} s: expect about "
          f"{runs * (plan.steady_s + plan.after_s + 3) / 60:.1f} min", flush=True)  # fmt: skip
    load_at_start = h.load_average()
    cores = h.Cores.split()
    started = time.monotonic()
    with TemporaryDirectory(prefix="wa-bench-failover-") as tmp, h.affinity(cores.bench):
        outcomes, profile = h.run_loop(measure(plan, cores, Path(tmp)))
    elapsed = time.monotonic() - started
    command = " ".join(["python -m bench", *sys.argv[1:]])
    text = render(plan, cores, outcomes, profile, h.header(
        "failover", command, elapsed, plan.smoke, load_at_start))  # fmt: skip
    h.write_results(text, plan.out)
    broken = [o for o in outcomes if o.directory_size != o.sessions or o.steady_failed]
    for o in broken:
        print(f"bench failover: harness problem in {o.scenario.label}: directory "
              f"{o.directory_size}/{o.sessions}, {o.steady_failed} failures before the stop",
              file=sys.stderr)  # fmt: skip
    return 1 if broken else 0
