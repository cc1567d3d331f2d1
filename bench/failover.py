"""Failover: one of 4 instances crashes under steady load; its sessions come up on the others.

Per run: 4 simulated instances and 1,000 sessions spread over them (in the bench's event
loop, pinned to one core), the router as a subprocess pinned to the other core, warm (its
start-up sync learned every owner). An open-loop load generator sends a fixed rate of
`POST /api/messages/send` and `GET /api/sessions/{id}/status`, half each, random sessions.
After `--steady` seconds one instance is stopped (a crash: listener closed, connections
aborted); after the gap its sessions are added on the other three, either silently
(rediscovery only) or each announced by a signed `session_ready` webhook to the router.

Restarts (issue 8), with the simulated pool behaving like the real one (node-pool-api.md,
"Around restarts"): 4 instances whose LARAVEL_URL is the router (it relays to a
`SimLaravel`), one shared `SessionFolder`, a 2.5 s `authenticated` window. Under a steady
send-only load, one instance is killed and started again after a gap (**restart-one**), or
all four are (**restart-all**, a server restart). A started instance restores every active
account from Laravel, sessions live elsewhere included, and the last `session_ready` wins
(the older copy drops with CONFLICT). The load runs until the pool has settled (every
session connected on exactly one instance, no restore or login under way), plus a tail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp

from wa_router.sim import SessionFolder, SimInstance, SimLaravel
from wa_router.sim.models import CONNECTED

from . import _harness as h
from . import _restart_report as rr
from . import common as c
from ._failover_report import Outcome, Scenario, analyse, render
from ._restart_report import RestartOutcome, RestartScenario

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
    restart: RestartPlan | None = None


@dataclass(frozen=True, slots=True)
class RestartPlan:
    """The restart scenarios: the real-pool simulator under a send-only load."""

    sessions: int
    rate: float  # sends per second
    steady_s: float  # before the kill
    tail_s: float  # after the pool has settled
    max_s: float  # the load stops here even if the pool never settles
    ready_delay_s: float  # authenticated -> connected (the real service: ~2.5 s)
    connect_delay_s: float  # created -> authenticated
    restore_step_s: float  # between two restored accounts
    conflict_delay_s: float  # both copies connected this long, then the older one drops
    repeats: int
    scenarios: tuple[RestartScenario, ...]


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

    def __init__(self, http: aiohttp.ClientSession, url: str, sessions: list[str], seed: int,
                 timeout_s: float = 20.0):  # fmt: skip
        self.http, self.url, self.sessions = http, url, sessions
        self.rng = random.Random(seed)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

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

    async def run_until(self, run: RestartRun, rate: float, end: Callable[[], float]) -> None:
        """Sends only, request i due at t0 + i / rate, until `end()` (it may move earlier
        while the load runs); then waits for the answers (at most the client timeout)."""
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while (due := run.t0 + i / rate) < end():
            await sleep_until(due)
            if due >= end():
                break
            req = Req(i, self.rng.choice(self.sessions), "send", due)
            run.reqs.append(req)
            task = asyncio.create_task(self.one(req))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.wait(tasks, timeout=(self.timeout.total or 30) + 5)

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


# -- restarts with the real-pool simulator ------------------------------------------------


@dataclass(slots=True)
class Flip:
    """One copy of a session became connected on an instance (`up`), or stopped being so."""

    t: float  # time.perf_counter()
    instance: str
    session: str
    up: bool
    why: str  # the webhook the sim queued at that moment, or "killed"


@dataclass(slots=True)
class RestartRun:
    scenario: RestartScenario
    sessions: list[str]
    seeded: dict[str, str]  # session -> the instance it was added to
    reqs: list[Req] = field(default_factory=list)
    flips: list[Flip] = field(default_factory=list)
    t0: float = 0.0
    t_kill: dict[str, float] = field(default_factory=dict)
    t_start: dict[str, float] = field(default_factory=dict)
    t_restored: dict[str, float] = field(default_factory=dict)  # restore loop over
    restored: dict[str, int] = field(default_factory=dict)  # accounts restored per start
    t_settled: float | None = None  # first poll that saw the pool settled; None: never
    t_load_end: float = 0.0
    arrivals: dict[int, list[tuple[float, str]]] = field(default_factory=dict)
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    router_cpu_s: float = 0.0
    # session -> the instance whose session_ready reached Laravel (through the router) last,
    # after the first kill: the copy the router was told about last
    last_ready: dict[str, str] = field(default_factory=dict)
    deleted_logins: int = 0  # DELETEs that reached an instance not holding the session
    seed_problem: str = ""  # the pool did not start as planned: a harness problem
    router_log: Path | None = None


def watch(sim: SimInstance, flips: list[Flip]) -> None:
    """Timestamp, as it happens, every change of a connected copy on `sim`: the sim sets a
    session's status and queues its lifecycle webhook in one step (`lifecycle.py`,
    `add_session`), so wrapping `notify` and `emit` sees the moment itself (no polling)."""
    notify, emit = sim.notify, sim.emit

    def record(event: str, data: dict[str, Any] | None) -> None:
        data = data or {}
        sid = data.get("session_id")
        if sid and event in ("session_ready", "session_disconnected"):
            up = event == "session_ready"
            why = event if up else f"{event} {data.get('reason')}"
            flips.append(Flip(time.perf_counter(), sim.name, str(sid), up, why))

    def notify_hooked(event: str, data: dict[str, Any] | None) -> None:
        record(event, data)
        notify(event, data)

    async def emit_hooked(event: str, data: dict[str, Any] | None) -> int | None:
        record(event, data)
        return await emit(event, data)

    sim.notify = notify_hooked  # type: ignore[method-assign]
    sim.emit = emit_hooked  # type: ignore[method-assign]


async def kill(sim: SimInstance, flips: list[Flip]) -> float:
    """`stop()` (a crash); every copy connected there is gone from this moment."""
    t = time.perf_counter()
    for sid, session in sim.sessions.items():
        if session.status == CONNECTED:
            flips.append(Flip(t, sim.name, sid, False, "killed"))
    await sim.stop()
    return t


def settled(sims: list[SimInstance], sessions: list[str]) -> bool:
    """Every instance running, none restoring or logging a session in, and every session
    connected on exactly one of them."""
    if not all(sim.running and sim.restore_done.is_set() for sim in sims):
        return False
    if any(sim.lifecycle.connecting(sid) for sim in sims for sid in sessions):
        return False
    holders = [sum(1 for sim in sims if sim.holds_connected(sid)) for sid in sessions]
    return all(n == 1 for n in holders)


async def wait_until(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.perf_counter() + timeout_s
    while not check():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def relayed_from(headers: Mapping[str, str], sims: list[SimInstance]) -> str | None:
    """The instance a webhook relayed to Laravel came from: `X-Instance-Url` as Node sent
    it, or, when the router advertises itself there, the origin headers it adds."""
    by_url = {f"http://localhost:{sim.port}": sim.name for sim in sims}
    names = set(by_url.values())
    origin = headers.get("X-Wa-Router-Instance")
    if origin in names:
        return origin
    for key in ("X-Wa-Router-Instance-Url", "X-Instance-Url"):
        name = by_url.get(headers.get(key, ""))
        if name is not None:
            return name
    return None


def real_pool(rp: RestartPlan, router: h.RouterProc) -> tuple[SessionFolder, list[SimInstance]]:
    """4 sims as Blazz's PM2 pool: LARAVEL_URL is the router, one shared session folder."""
    folder = SessionFolder(conflict_delay_s=rp.conflict_delay_s)
    ports = [p for p in h.listen_ports(5) if p != router.port][:4]
    sims = [
        SimInstance(name=f"node-{i + 1}", port=ports[i], api_key=h.API_KEY,
                    laravel_url=router.url, webhook_secret=h.WEBHOOK_SECRET, folder=folder,
                    ready_delay_s=rp.ready_delay_s, connect_delay_s=rp.connect_delay_s,
                    restore_step_s=rp.restore_step_s)
        for i in range(4)
    ]  # fmt: skip
    return folder, sims


async def restart_run(rp: RestartPlan, scenario: RestartScenario, cores: h.Cores, tmp: Path,
                      seed: int) -> RestartRun:  # fmt: skip
    laravel = SimLaravel(secret=h.WEBHOOK_SECRET)
    await laravel.start()
    router = h.RouterProc(tmp, cores, name=f"router-{scenario.kind}-{seed}")
    folder, sims = real_pool(rp, router)
    by_name = {sim.name: sim for sim in sims}
    sessions = h.session_ids(rp.sessions, seed)
    seeded = {sid: sims[i % len(sims)].name for i, sid in enumerate(sessions)}
    run = RestartRun(scenario, sessions, seeded)
    for sim in sims:
        h.timed(sim)
        watch(sim, run.flips)
    victims = sims if scenario.kind == "restart-all" else [sims[VICTIM]]
    webhooks = {"secrets": [h.WEBHOOK_SECRET], "laravel_url": laravel.url}
    doc = h.router_config(router.port, sims, tmp / f"state-{scenario.kind}-{seed}",
                          webhooks=webhooks)  # fmt: skip
    try:
        async with h.client() as http:
            # The router first (the sims' restore asks Laravel through it), then the sims:
            # Laravel has no account yet, so their start-up restore finds nothing.
            router.spawn(doc)
            run.router_log = router.log_path
            await router.wait_alive(http)
            for sim in sims:
                await h.start_sim(sim)
            for sim in sims:
                await asyncio.wait_for(sim.restore_done.wait(), 15)
            await router.wait_ready(http)
            for sid in sessions:
                laravel.add_account(sid)
                by_name[seeded[sid]].add_session(sid, notify=True)  # its login is saved
            ready = await wait_until(
                lambda: len(laravel.events_named("session_ready")) >= len(sessions), 15
            )
            known = 0
            for _ in range(100):
                known = (await router.discovery(http))["directory"]
                if known >= len(sessions):
                    break
                await asyncio.sleep(0.05)
            if not ready or known != len(sessions):
                run.seed_problem = (
                    f"{len(laravel.events_named('session_ready'))} session_ready "
                    f"relayed, directory {known}, of {len(sessions)} sessions"
                )
            for sim in sims:
                sim.reset_counters()
            run.metrics_before = await router.metrics(http)
            load = Load(http, router.url, sessions, seed, timeout_s=30.0)  # Laravel's send
            cpu_before = c.tree_cpu_s(router.pid)
            run.t0 = time.perf_counter() + 0.05
            end = [run.t0 + rp.max_s]
            seen_at_kill = [len(laravel.events)]

            def restored(sim: SimInstance) -> Callable[[asyncio.Task[Any]], None]:
                def done(task: asyncio.Task[Any]) -> None:
                    if not task.cancelled():
                        run.t_restored[sim.name] = time.perf_counter()

                return done

            # The kill at a random phase between two due sends, not on one of them.
            phase = random.Random(seed).uniform(0.0, 1.0 / rp.rate)

            async def event() -> None:
                await sleep_until(run.t0 + rp.steady_s + phase)
                seen_at_kill[0] = len(laravel.events)
                for sim in victims:  # all at once: no await between them but the kills
                    run.t_kill[sim.name] = await kill(sim, run.flips)
                await sleep_until(min(run.t_kill.values()) + scenario.gap_s)
                waits = []
                for sim in victims:
                    run.t_start[sim.name] = time.perf_counter()
                    await h.start_sim(sim)
                    waits.append(task := asyncio.create_task(sim.restore_done.wait()))
                    task.add_done_callback(restored(sim))
                limit = end[0]
                while (now := time.perf_counter()) < limit:
                    if settled(sims, sessions):
                        run.t_settled = now
                        end[0] = min(limit, now + rp.tail_s)
                        break
                    await asyncio.sleep(0.05)
                for task in waits:
                    task.cancel()
                # Then on until every session was answered 200 by its last copy (the only
                # connected one once settled): the tail never ends before the load asked.
                while run.t_settled is not None and (now := time.perf_counter()) < limit:
                    since = run.t_settled
                    served = {r.session for r in run.reqs if r.status == 200 and r.t_sched > since}
                    if len(served) == len(sessions):
                        break
                    end[0] = min(limit, max(end[0], now + 0.1))
                    await asyncio.sleep(0.05)

            event_task = asyncio.create_task(event())
            await load.run_until(run, rp.rate, lambda: end[0])
            run.t_load_end = end[0]
            await event_task
            for e in laravel.events[seen_at_kill[0] :]:
                sender = relayed_from(e.headers, sims)
                if e.event == "session_ready" and sender is not None:
                    run.last_ready[str(e.data.get("session_id"))] = sender
            run.router_cpu_s = c.tree_cpu_s(router.pid) - cpu_before
            run.metrics_after = await router.metrics(http)
    finally:
        await router.stop()
        await h.stop_sims(sims)
        await laravel.stop()
    run.restored = {sim.name: len(sim.restored) for sim in victims}
    run.deleted_logins = len(folder.deleted_by)
    for sim in sims:
        log = h.timed(sim)
        for t, r in log.timed():
            bench_id = r.headers.get("X-Bench-Id")
            if bench_id is not None and r.path == SEND_PATH:
                run.arrivals.setdefault(int(bench_id), []).append((t, sim.name))
    for hops in run.arrivals.values():
        hops.sort()
    return run


async def measure(plan: Plan, cores: h.Cores, tmp: Path
                  ) -> tuple[list[Outcome], list[RestartOutcome], Path | None]:  # fmt: skip
    outcomes: list[Outcome] = []
    restarts: list[RestartOutcome] = []
    rp = plan.restart
    reps = max(plan.repeats if plan.scenarios else 0, rp.repeats if rp is not None else 0)
    for rep in range(reps):
        for k, scenario in enumerate(plan.scenarios if rep < plan.repeats else ()):
            run = await one_run(plan, scenario, cores, tmp, seed=1 + rep * 10 + k)
            outcome = analyse(run, plan.warm_s)
            outcomes.append(outcome)
            print(f"failover {rep + 1}/{plan.repeats} {scenario.label:<34} {outcome.line()}",
                  flush=True)  # fmt: skip
        if rp is None or rep >= rp.repeats:
            continue
        for k, rs in enumerate(rp.scenarios):
            rrun = await restart_run(rp, rs, cores, tmp, seed=101 + rep * 10 + k)
            restart = rr.analyse(rrun)
            if restart.failed and rrun.router_log is not None and rrun.router_log.exists():
                keep = c.SCRATCH / "failover" / rrun.router_log.name
                keep.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(rrun.router_log, keep)
                restart.log_copy = keep
            restarts.append(restart)
            print(f"failover {rep + 1}/{rp.repeats} {rs.label:<40} {restart.line()}",
                  flush=True)  # fmt: skip
    profile = None
    if plan.profile and outcomes:
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
    return outcomes, restarts, profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=300.0, help="requests per second (300)")
    parser.add_argument("--steady", type=float, default=4.0, help="seconds before the stop (4)")
    parser.add_argument("--after", type=float, default=6.0, help="seconds after the stop (6)")
    parser.add_argument(
        "--gap",
        type=float,
        action="append",
        help="stop -> sessions back, seconds; repeatable (default 0.5 and 0)",
    )
    parser.add_argument(
        "--negative-ttl",
        type=float,
        action="append",
        help="also run rediscovery only, the first gap, with this "
        "discovery.negative_ttl_s; repeatable (default 0.2)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per scenario (3)")
    parser.add_argument(
        "--only",
        choices=("crash", "restart"),
        help="only the crash scenarios, or only the restart ones",
    )
    restart = parser.add_argument_group("restart scenarios (the real-pool simulator)")
    restart.add_argument(
        "--restart-gap", type=float, help="restart-one: kill -> start, seconds (2; smoke 0.5)"
    )
    restart.add_argument(
        "--restart-all-gap", type=float, help="restart-all: kill -> start, seconds (3; smoke 0.5)"
    )
    restart.add_argument("--restart-sessions", type=int, default=40, help="sessions (40)")
    restart.add_argument("--restart-rate", type=float, default=50.0, help="sends per second (50)")
    restart.add_argument(
        "--restart-steady", type=float, default=3.0, help="seconds of load before the kill (3)"
    )
    restart.add_argument(
        "--restart-tail",
        type=float,
        default=2.0,
        help="seconds of load after the pool has settled, at least (2)",
    )
    restart.add_argument(
        "--ready-delay",
        type=float,
        help="authenticated -> connected, seconds (2.5, the real one; smoke 0.5)",
    )
    restart.add_argument(
        "--conflict-delay",
        type=float,
        help="both copies connected, then the older drops, seconds (1; smoke 0.3)",
    )
    restart.add_argument(
        "--restart-repeats", type=int, help="runs per restart scenario (default: --repeats)"
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="no py-spy run even when a target is missed"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI: 100 sessions, 100 req/s, 1 s + 1.5 s, 1 run per scenario; "
        "restarts: 12 sessions, 20 sends/s, 0.5 s login; "
        "writes bench/out/failover-smoke.md unless --out",
    )
    parser.add_argument("--out", type=Path, help="default: bench/results/failover.md")


def restart_plan(args: argparse.Namespace) -> RestartPlan:
    def given(value: float | None, full: float, smoke: float) -> float:
        return value if value is not None else smoke if args.smoke else full

    scenarios = (RestartScenario("restart-one", given(args.restart_gap, 2.0, 0.5)),
                 RestartScenario("restart-all", given(args.restart_all_gap, 3.0, 0.5)))  # fmt: skip
    if args.smoke:
        return RestartPlan(12, 20.0, 1.0, 1.0, 20.0, given(args.ready_delay, 2.5, 0.5), 0.1,
                           0.02, given(args.conflict_delay, 1.0, 0.3), 1, scenarios)  # fmt: skip
    return RestartPlan(args.restart_sessions, args.restart_rate, args.restart_steady,
                       args.restart_tail, 60.0, given(args.ready_delay, 2.5, 0.5), 0.2, 0.05,
                       given(args.conflict_delay, 1.0, 0.3), args.restart_repeats or args.repeats,
                       scenarios)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    gaps = tuple(args.gap) if args.gap else (0.5, 0.0)
    scenarios = tuple(Scenario(m, g) for g in gaps for m in ("rediscovery", "webhooks"))
    ttls = () if args.smoke else tuple(args.negative_ttl or (0.2,))
    scenarios += tuple(Scenario("rediscovery", gaps[0], ttl) for ttl in ttls)
    if args.only == "restart":
        scenarios = ()
    rp = None if args.only == "crash" else restart_plan(args)
    if args.smoke:
        plan = Plan(100, 100.0, 0.3, 1.0, 1.5, 1, scenarios, False, True,
                    args.out or c.SCRATCH / "failover-smoke.md", rp)  # fmt: skip
    else:
        plan = Plan(args.sessions, args.rate, 1.0, args.steady, args.after, args.repeats,
                    scenarios, not args.no_profile, False,
                    args.out or c.RESULTS / "failover.md", rp)  # fmt: skip
    runs = plan.repeats * len(scenarios)
    expect = runs * (plan.steady_s + plan.after_s + 3)
    if rp is not None:  # kill, gap, restore, login, CONFLICT drop, tail; ~3 s to set up
        settle = rp.sessions * rp.restore_step_s + rp.connect_delay_s + rp.ready_delay_s
        expect += rp.repeats * sum(rp.steady_s + s.gap_s + settle + rp.conflict_delay_s
                                   + rp.tail_s + 3 for s in rp.scenarios)  # fmt: skip
    print(f"bench failover: {len(scenarios)} crash scenarios x {plan.repeats} runs of "
          f"{plan.steady_s + plan.after_s:.0f} s"
          f"{'' if rp is None else f', {len(rp.scenarios)} restart scenarios x {rp.repeats} runs'}"
          f": expect about {expect / 60:.1f} min", flush=True)  # fmt: skip
    load_at_start = h.load_average()
    cores = h.Cores.split()
    started = time.monotonic()
    with TemporaryDirectory(prefix="wa-bench-failover-") as tmp, h.affinity(cores.bench):
        outcomes, restarts, profile = h.run_loop(measure(plan, cores, Path(tmp)))
    elapsed = time.monotonic() - started
    command = " ".join(["python -m bench", *sys.argv[1:]])
    head = h.header("failover", command, elapsed, plan.smoke, load_at_start)
    parts = [render(plan, cores, outcomes, profile, head) if outcomes else "\n".join(head)]
    if rp is not None:
        parts.append(rr.render(rp, cores, restarts))
    h.write_results("\n".join(parts), plan.out)
    broken = [o for o in outcomes if o.directory_size != o.sessions or o.steady_failed]
    for o in broken:
        print(f"bench failover: harness problem in {o.scenario.label}: directory "
              f"{o.directory_size}/{o.sessions}, {o.steady_failed} failures before the stop",
              file=sys.stderr)  # fmt: skip
    bad = [o for o in restarts if o.seed_problem or o.steady_failed]
    for r in bad:
        print(f"bench failover: harness problem in {r.scenario.label}: "
              f"{r.seed_problem or 'pool as planned'}; {r.steady_failed} failed sends before "
              f"the kill", file=sys.stderr)  # fmt: skip
    return 1 if broken or bad else 0
