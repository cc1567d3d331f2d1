"""Webhooks: intake throughput and latency, and delivery after a Laravel outage.

- Intake: N concurrent posters (closed loop, each owning some of the sessions, so one
  session's events are sent one after another) post distinct signed `message_received`
  webhooks to the router for a fixed time. SQLite backlog (memory store) and Redis Stream
  backlog (Redis store on a redis-server of the bench's own), with the Laravel stand-in up
  (200: relayed at once, or through the stream) and down (503: every event is queued).
  Events/s, intake latency p50/p99, and with Laravel up the delivery lag (sent to the router
  -> arrived at the stand-in).
- Outage: Laravel down (503), an open-loop load of R events/s over S sessions for the
  outage, then Laravel back: the time from its return until every queued event arrived,
  duplicates (the same X-Webhook-Id twice), order violations per session, lost events. SQLite
  with 1 router, Redis Stream with 1 router and with 2 routers on one Redis (the load spread
  over both), for each `webhooks.retry_max_s` asked for (60 s, the default, and 5 s).

The routers are subprocesses (`python -m wa_router.cli serve`, uvloop) on the router core;
the posters, the Laravel stand-in and the simulated instance share the bench's event loop
on the other core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from wa_router.errors import RequestRejected
from wa_router.signing import INSTANCE_URL, SIGNATURE, TIMESTAMP, sign, verify
from wa_router.sim import SimInstance

from . import _harness as h
from . import common as c
from ._webhooks_report import render

SECRET = h.WEBHOOK_SECRET
HOOK = h.WEBHOOK_PATH
WEBHOOK_ID = "X-Webhook-Id"
SHARDS = 16  # webhooks.shards (the default)
CLIENT_TIMEOUT_S = 15.0  # above the router's relay timeout (10 s): a slow relay is seen


@dataclass(frozen=True, slots=True)
class Setup:
    """One router configuration: where webhooks wait, how many routers."""

    backlog: str  # "sqlite" | "redis"
    routers: int = 1

    @property
    def label(self) -> str:
        store = "memory store" if self.backlog == "sqlite" else "redis store"
        plural = "router" if self.routers == 1 else "routers"
        return f"{self.backlog} ({store}), {self.routers} {plural}"


@dataclass(frozen=True, slots=True)
class Plan:
    posters: int
    sessions: int
    warm_s: float
    duration_s: float
    repeats: int
    outage_s: float
    outage_rate: float
    outage_sessions: int
    retry_base_s: float
    retry_max: tuple[float, ...]
    drain_timeout_s: float
    smoke: bool
    out: Path
    stop_grace_s: float  # SIGTERM -> SIGKILL when a router does not exit
    # Only for the smoke: shorter leases, so two routers split the shards within a second
    # (claim_after_s must stay above relay_timeout_s). None: the defaults (10 s, 20 s).
    relay_timeout_s: float | None = None
    claim_after_s: float | None = None


# -- what was sent, what arrived -----------------------------------------------------------


@dataclass(slots=True)
class Sent:
    session: str
    seq: int  # per session, from 0, in the order the bench sends them
    router: int  # which router it was posted to
    t_due: float = 0.0  # open loop: when it was due
    t_sent: float = 0.0  # perf_counter just before the request was written
    t_done: float = 0.0
    status: int = 0  # 0: no HTTP answer
    answer: str = ""  # the router's `status` field, or the error

    @property
    def accepted(self) -> bool:
        return self.status in (200, 202)


def webhook(run: str, session: str, seq: int, workspace: int) -> bytes:
    """A `message_received` body as Node sends it (compact JSON), with the bench's tags."""
    phone = f"62812{abs(hash(session)) % 10**7:07d}"
    data = {
        "session_id": session,
        "workspace_id": workspace,
        "message": {
            "id": f"false_{phone}@c.us_{uuid.uuid4().hex[:20].upper()}",
            "from": f"{phone}@c.us",
            "body": f"bench message {seq}",
            "type": "chat",
            "timestamp": int(time.time()),
            "has_media": False,
        },
        "bench_run": run,
        "bench_seq": seq,
    }
    return json.dumps({"event": "message_received", "data": data}, separators=(",", ":")).encode()


class Laravel:
    """Laravel's webhook route: verifies the signature as VerifyWhatsAppHmac does, answers 200
    while `up` (503 while down), and keeps, per delivered event, its first arrival time, the
    X-Webhook-Ids seen, and each session's order."""

    def __init__(self) -> None:
        self.port = h.listen_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self._runner: web.AppRunner | None = None
        self.reset("")

    def reset(self, run: str, up: bool = True) -> None:
        self.run, self.up = run, up
        self.first: dict[tuple[str, int], float] = {}  # (session, seq) -> perf_counter
        self.ids: set[str] = set()
        self.dup_ids = 0  # a delivery whose X-Webhook-Id was delivered before
        self.dup_other_id = 0  # an event delivered before, under another id
        self.order_violations = 0  # arrived after a later event of its session
        self._last_seq: dict[str, int] = {}
        self.refused = 0  # 503s answered while down
        self.bad_signature = 0
        self.no_id = 0
        self.stray = 0  # from another run's router

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        t = time.perf_counter()
        try:
            verify(request.headers, body, (SECRET,), time.time(), 300.0)
        except RequestRejected:
            self.bad_signature += 1
            return web.json_response({"error": "unauthorized"}, status=401)
        data = json.loads(body)["data"]
        if data.get("bench_run") != self.run:
            self.stray += 1
            return web.json_response({"status": "success"})
        if not self.up:
            self.refused += 1
            return web.json_response({"error": "down"}, status=503)
        session, seq = str(data["session_id"]), int(data["bench_seq"])
        wid = request.headers.get(WEBHOOK_ID)
        if wid is None:
            self.no_id += 1
        elif wid in self.ids:
            self.dup_ids += 1
        else:
            self.ids.add(wid)
        key = (session, seq)
        if key in self.first:
            if wid is not None and wid not in self.ids:
                self.dup_other_id += 1
            return web.json_response({"status": "success"})
        self.first[key] = t
        last = self._last_seq.get(session, -1)
        if seq < last:
            self.order_violations += 1
        else:
            self._last_seq[session] = seq
        return web.json_response({"status": "success"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(HOOK, self._hook)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=511).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def commit_cost_us(directory: Path, commits: int) -> tuple[float, float]:
    """(wall, CPU) µs of one single-row write transaction in a WAL SQLite file with
    synchronous=FULL, as the SQLite backlog commits them, on `directory`'s filesystem."""
    path = directory / "commit-cost.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (k BLOB PRIMARY KEY, v BLOB NOT NULL)")
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(commits):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (k, v) VALUES (?, ?)", (i.to_bytes(8, "big"), b"1"))
            conn.execute("COMMIT")
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        conn.close()
        path.unlink(missing_ok=True)
    return 1e6 * wall / commits, 1e6 * cpu / commits


def code_state() -> str:
    """HEAD and a digest of the uncommitted and untracked files under wa_router/: the code
    every router of the run should be running (each run starts fresh processes)."""
    git = ["git", "-C", str(c.REPO)]
    head = c.tool_version([*git, "rev-parse", "--short", "HEAD"])
    digest = hashlib.sha256()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        diff = subprocess.run([*git, "diff", "HEAD", "--", "wa_router"], capture_output=True,
                              timeout=30, check=False).stdout  # fmt: skip
        digest.update(diff)
        listed = subprocess.run([*git, "ls-files", "--others", "--exclude-standard", "--",
                                 "wa_router"], capture_output=True, text=True, timeout=30,
                                check=False).stdout.split()  # fmt: skip
        for name in sorted(listed):
            digest.update(name.encode())
            with contextlib.suppress(OSError):
                digest.update((c.REPO / name).read_bytes())
    return f"{head} ({digest.hexdigest()[:10]})"


# -- redis-server ----------------------------------------------------------------------------


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProc:
    """A redis-server of the bench's own: a free loopback port (never 6379), no persistence,
    pinned to the router core."""

    def __init__(self, tmp: Path, cores: h.Cores) -> None:
        self.tmp, self.cores = tmp, cores
        self.port = 0
        self.proc: c.Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        for _ in range(3):  # another process may take the port before redis binds it
            self.port = h.listen_ports(1)[0]
            argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(self.tmp)]  # fmt: skip
            self.proc = c.Proc(f"redis-{self.port}", [*self.cores.router_prefix(), *argv], self.tmp)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.popen.poll() is None:
                if await asyncio.to_thread(redis_ping, self.port):
                    return
                await asyncio.sleep(0.02)
            await asyncio.to_thread(self.proc.stop)
        raise RuntimeError(f"redis-server did not start: {self.proc.tail() if self.proc else ''}")

    def cpu_s(self) -> float:
        return 0.0 if self.proc is None else c.tree_cpu_s(self.proc.pid)

    async def stop(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            await asyncio.to_thread(proc.stop)


# -- the routers -----------------------------------------------------------------------------


@dataclass(slots=True)
class Routers:
    procs: list[SnapshotRouter]
    sim: SimInstance
    prefix: str  # the Redis key prefix ("" for SQLite)
    logs: list[Path] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.procs]

    def cpu_s(self) -> float:
        return sum(c.tree_cpu_s(r.pid) for r in self.procs)


class SnapshotRouter(h.RouterProc):
    """`h.RouterProc`, optionally running the router from an exported copy of wa_router/
    (`--at REV`): `python -P` keeps the working directory (the repo) off sys.path, so
    PYTHONPATH decides which wa_router is imported, whatever is edited meanwhile."""

    def __init__(self, tmp: Path, cores: h.Cores, name: str, code: Path | None) -> None:
        super().__init__(tmp, cores, name)
        self.code = code

    def spawn(self, doc: dict[str, Any]) -> None:
        if self.code is None:
            super().spawn(doc)
            return
        path = self.tmp / f"{self.name}.yaml"
        path.write_text(json.dumps(doc, indent=2))  # JSON is YAML
        env = {k: v for k, v in os.environ.items() if not k.startswith("WA_ROUTER_")}
        env["PYTHONPATH"] = str(self.code)
        argv = [sys.executable, "-P", "-m", "wa_router.cli", "serve", "-c", str(path), "--loop",
                "uvloop"]  # fmt: skip
        self.proc = c.Proc(self.name, [*self.cores.router_prefix(), *argv], self.tmp, env)

    async def stop_timed(self, grace_s: float) -> Exit:
        """SIGTERM, then SIGKILL after `grace_s`: how long it took to exit by itself."""
        proc, self.proc = self.proc, None
        if proc is None:
            return Exit(0.0, False)
        started = time.perf_counter()
        await asyncio.to_thread(proc.stop, grace_s)
        return Exit(time.perf_counter() - started, proc.popen.returncode == -signal.SIGKILL)


@dataclass(frozen=True, slots=True)
class Exit:
    seconds: float  # SIGTERM -> gone
    killed: bool  # did not exit within the grace: SIGKILLed


def snapshot(rev: str, into: Path) -> str:
    """`git archive REV wa_router` extracted under `into`; returns the short commit."""
    git = ["git", "-C", str(c.REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", f"{rev}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    tar = subprocess.run([*git, "archive", "--format=tar", commit, "wa_router"],
                         capture_output=True, check=True).stdout  # fmt: skip
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    return commit


@contextlib.asynccontextmanager
async def routers(
    plan: Plan, setup: Setup, ctx: Context, name: str, retry_max_s: float
) -> AsyncIterator[Routers]:
    """Fresh router processes (fresh state dirs, a fresh key prefix), ready, warm (their
    start-up sync learned every session on the simulated instance)."""
    wh: dict[str, Any] = {
        "secrets": [SECRET],
        "laravel_url": ctx.laravel.url,
        "retry_base_s": plan.retry_base_s,
        "retry_max_s": retry_max_s,
        # The stand-in has no webhook limiter; the bench measures delivery, not Laravel's.
        "laravel_max_per_minute": None,
    }
    if plan.relay_timeout_s is not None:
        wh["relay_timeout_s"] = plan.relay_timeout_s
    if plan.claim_after_s is not None:
        wh["claim_after_s"] = plan.claim_after_s
    extra: dict[str, Any] = {"webhooks": wh}
    prefix = ""
    if setup.backlog == "redis":
        assert ctx.redis is not None
        prefix = f"bench-{uuid.uuid4().hex[:8]}:"
        extra["store"] = {"kind": "redis", "redis_url": ctx.redis.url, "key_prefix": prefix}
    procs = [SnapshotRouter(ctx.tmp, ctx.cores, f"{name}-{i + 1}", ctx.code)
             for i in range(setup.routers)]  # fmt: skip
    group = Routers(procs, ctx.sim, prefix)
    try:
        for i, r in enumerate(procs):
            doc = h.router_config(r.port, [ctx.sim], ctx.tmp / f"state-{name}-{i + 1}", **extra)
            r.spawn(doc)
            if r.log_path is not None:
                group.logs.append(r.log_path)
        await asyncio.gather(*(r.wait_ready(ctx.http) for r in procs))
        if setup.backlog == "redis":
            assert ctx.redis is not None
            await wait_split(ctx.redis.url, prefix, setup.routers, 30.0)
        yield group
    finally:
        exits = await asyncio.gather(*(r.stop_timed(plan.stop_grace_s) for r in procs))
        ctx.exits += [(setup.backlog, e) for e in exits]


async def lease_holders(url: str, prefix: str) -> Counter[str]:
    """Consumer -> shards whose lease it holds now."""
    rds = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        keys = [f"{prefix}wh:{n}:lease" for n in range(SHARDS)]
        values = await rds.mget(keys)
    finally:
        await rds.aclose()
    return Counter(str(v) for v in values if v is not None)


async def wait_split(url: str, prefix: str, routers: int, timeout_s: float) -> Counter[str]:
    """Until every shard is held and each router holds its share (the leases settle a
    renewal round or two after the routers start)."""
    deadline = time.monotonic() + timeout_s
    share = -(-SHARDS // routers)
    while True:
        held = await lease_holders(url, prefix)
        settled = sum(held.values()) == SHARDS and len(held) == routers
        if settled and max(held.values()) <= share:
            return held
        if time.monotonic() > deadline:
            raise TimeoutError(f"shard leases did not settle: {dict(held)}")
        await asyncio.sleep(0.1)


# -- the load --------------------------------------------------------------------------------


class Poster:
    """Signs and posts webhooks as Node does (one signature per attempt, X-Instance-Url of the
    pool member), recording what each answer said."""

    def __init__(self, http: aiohttp.ClientSession, urls: list[str], run: str, port: int) -> None:
        self.http, self.urls, self.run, self.port = http, urls, run, port
        self.timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
        self.sent: list[Sent] = []
        self._next: Counter[str] = Counter()
        self._workspace: dict[str, int] = {}

    def next_event(self, session: str) -> Sent:
        workspace = self._workspace.setdefault(session, len(self._workspace) + 1)
        seq = self._next[session]
        self._next[session] += 1
        # With several routers a session's events alternate between them.
        ev = Sent(session, seq, (seq + workspace) % len(self.urls))
        self.sent.append(ev)
        return ev

    async def post(self, ev: Sent) -> None:
        body = webhook(self.run, ev.session, ev.seq, self._workspace[ev.session])
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP: ts,
                   SIGNATURE: sign(SECRET, ts, body),
                   INSTANCE_URL: f"http://localhost:{self.port}"}  # fmt: skip
        ev.t_sent = time.perf_counter()
        try:
            url = self.urls[ev.router] + HOOK
            async with self.http.post(url, data=body, headers=headers, timeout=self.timeout) as r:
                data = await r.read()
                ev.status = r.status
            with contextlib.suppress(ValueError, AttributeError):
                doc = json.loads(data)
                ev.answer = str(doc.get("status") or doc.get("error") or "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            ev.answer = f"client: {type(exc).__name__}"
        ev.t_done = time.perf_counter()


async def closed_loop(poster: Poster, sessions: list[str], posters: int, end: float) -> None:
    """`posters` posters, each its share of the sessions in turn, one request at a time."""

    async def one(i: int) -> None:
        mine = sessions[i::posters]
        k = 0
        while time.perf_counter() < end:
            await poster.post(poster.next_event(mine[k % len(mine)]))
            k += 1

    await asyncio.gather(*(one(i) for i in range(posters)))


async def open_loop(poster: Poster, sessions: list[str], rate: float, t0: float,
                    duration_s: float) -> None:  # fmt: skip
    """Event k is due at t0 + k / rate, for sessions in turn; a session's event waits for the
    answer to its previous one (Node sends one session's webhooks in order)."""
    tails: dict[str, asyncio.Task[None]] = {}

    async def after(prev: asyncio.Task[None] | None, ev: Sent) -> None:
        if prev is not None:
            await prev
        await poster.post(ev)

    for k in range(int(rate * duration_s)):
        due = t0 + k / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        session = sessions[k % len(sessions)]
        ev = poster.next_event(session)
        ev.t_due = due
        tails[session] = asyncio.create_task(after(tails.get(session), ev))
    await asyncio.gather(*tails.values())


async def drained(laravel: Laravel, sent: Sequence[Sent], timeout_s: float) -> bool:
    """Until every event the router accepted has arrived at the stand-in."""
    want = [(ev.session, ev.seq) for ev in sent if ev.accepted]
    deadline = time.perf_counter() + timeout_s
    while not all(key in laravel.first for key in want):
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def router_warnings(logs: Sequence[Path]) -> Counter[str]:
    """The routers' log lines (level warning and above) by event name."""
    out: Counter[str] = Counter()
    for path in logs:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    out[str(json.loads(line).get("event", "?"))] += 1
                except (ValueError, AttributeError):
                    out["(not JSON)"] += 1
    return out


# -- intake throughput -----------------------------------------------------------------------


@dataclass(slots=True)
class IntakeRun:
    setup: Setup
    laravel_up: bool
    rep: int
    duration_s: float
    events: int = 0  # answered within the window
    answers: Counter[str] = field(default_factory=Counter)  # whole run: "202 queued": n
    latency_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)
    lost: int = 0  # accepted, never arrived (Laravel up)
    dup_ids: int = 0
    order_violations: int = 0
    refused: int = 0  # 503 answers while down (delivery attempts + direct relays)
    router_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    bench_cpu_s: float = 0.0
    warnings: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.events / self.duration_s

    @property
    def core_busy(self) -> float:
        """% of the router core the routers and redis-server used over the window."""
        return 100 * (self.router_cpu_s + self.redis_cpu_s) / self.duration_s

    @property
    def ok(self) -> bool:
        return all(k.startswith(("200", "202")) for k in self.answers) and not self.lost


async def intake_run(plan: Plan, setup: Setup, up: bool, rep: int, ctx: Context) -> IntakeRun:
    run_id = f"intake-{setup.backlog}-{'up' if up else 'down'}-{rep}"
    ctx.laravel.reset(run_id, up=up)
    res = IntakeRun(setup, up, rep, plan.duration_s)
    async with routers(plan, setup, ctx, run_id, plan.retry_max[0]) as group:
        poster = Poster(ctx.http, group.urls, run_id, ctx.sim.port)
        t0 = time.perf_counter()
        start, end = t0 + plan.warm_s, t0 + plan.warm_s + plan.duration_s
        cpu: dict[str, list[float]] = {"router": [], "redis": [], "bench": []}

        async def sample_at(t: float) -> None:
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            cpu["router"].append(group.cpu_s())
            cpu["redis"].append(ctx.redis.cpu_s() if ctx.redis and setup.backlog == "redis"
                                else 0.0)  # fmt: skip
            cpu["bench"].append(time.process_time())

        sampler = asyncio.gather(sample_at(start), sample_at(end))
        await closed_loop(poster, ctx.sessions[: plan.sessions], plan.posters, end)
        await sampler
        if up:
            await drained(ctx.laravel, poster.sent, plan.drain_timeout_s)
        await asyncio.sleep(0.2)  # a late duplicate, if any
    res.warnings = router_warnings(group.logs)
    res.router_cpu_s, res.redis_cpu_s, res.bench_cpu_s = (v[1] - v[0] for v in
                                                          (cpu["router"], cpu["redis"],
                                                           cpu["bench"]))  # fmt: skip
    lv = ctx.laravel
    for ev in poster.sent:
        res.answers[f"{ev.status} {ev.answer}".strip()] += 1
        if start <= ev.t_done < end:
            res.events += 1
            res.latency_ms.append((ev.t_done - ev.t_sent) * 1000)
            arrived = lv.first.get((ev.session, ev.seq))
            if up and arrived is not None:
                res.lag_ms.append((arrived - ev.t_sent) * 1000)
        if up and ev.accepted and (ev.session, ev.seq) not in lv.first:
            res.lost += 1
    res.dup_ids, res.order_violations, res.refused = lv.dup_ids, lv.order_violations, lv.refused
    return res


# -- after an outage -------------------------------------------------------------------------


@dataclass(slots=True)
class OutageRun:
    setup: Setup
    retry_max_s: float
    outage_s: float
    sent: int = 0
    queued: int = 0  # answered 202
    answers: Counter[str] = field(default_factory=Counter)
    intake_ms: list[float] = field(default_factory=list)
    behind_ms: list[float] = field(default_factory=list)  # sent later than due (open loop)
    refused: int = 0  # 503 answers during the outage: delivery attempts
    backlog_at_return: int | None = None
    holders_at_return: list[int] = field(default_factory=list)  # shards per router
    drain_s: float | None = None  # Laravel back -> the last queued event arrived; None: never
    first_s: float | None = None  # Laravel back -> the first queued event arrived
    waits_s: list[float] = field(default_factory=list)  # per event: Laravel back -> arrival
    lost: int = 0
    dup_ids: int = 0
    dup_other_id: int = 0
    order_violations: int = 0
    bad_signature: int = 0
    warnings: Counter[str] = field(default_factory=Counter)


async def outage_run(plan: Plan, setup: Setup, retry_max_s: float, ctx: Context) -> OutageRun:
    run_id = f"outage-{setup.backlog}-{setup.routers}-{retry_max_s:g}"
    ctx.laravel.reset(run_id, up=False)
    res = OutageRun(setup, retry_max_s, plan.outage_s)
    async with routers(plan, setup, ctx, run_id, retry_max_s) as group:
        poster = Poster(ctx.http, group.urls, run_id, ctx.sim.port)
        t0 = time.perf_counter() + 0.05
        await open_loop(poster, ctx.sessions[: plan.outage_sessions], plan.outage_rate, t0,
                        plan.outage_s)  # fmt: skip
        with contextlib.suppress(Exception):
            m = await group.procs[0].metrics(ctx.http)
            res.backlog_at_return = int(m.get("wa_router_webhook_backlog", -1))
        if setup.backlog == "redis" and ctx.redis is not None:
            held = await lease_holders(ctx.redis.url, group.prefix)
            res.holders_at_return = sorted(held.values(), reverse=True)
        res.refused = ctx.laravel.refused
        ctx.laravel.up = True
        t_back = time.perf_counter()
        ok = await drained(ctx.laravel, poster.sent, retry_max_s * 2 + plan.drain_timeout_s)
        lv = ctx.laravel
        accepted = [lv.first.get((ev.session, ev.seq)) for ev in poster.sent if ev.accepted]
        arrived = [t for t in accepted if t is not None]
        if arrived:
            res.first_s = max(0.0, min(arrived) - t_back)
        if ok and arrived:
            res.drain_s = max(arrived) - t_back
        await asyncio.sleep(0.5 if plan.smoke else 2.0)  # a late duplicate, if any
    res.warnings = router_warnings(group.logs)
    res.waits_s = [max(0.0, t - t_back) for t in arrived]
    res.sent = len(poster.sent)
    for ev in poster.sent:
        res.answers[f"{ev.status} {ev.answer}".strip()] += 1
        res.queued += ev.status == 202
        res.intake_ms.append((ev.t_done - ev.t_sent) * 1000)
        res.behind_ms.append((ev.t_sent - ev.t_due) * 1000)
    res.lost = len(accepted) - len(arrived)
    res.dup_ids, res.dup_other_id = lv.dup_ids, lv.dup_other_id
    res.order_violations, res.bad_signature = lv.order_violations, lv.bad_signature
    return res


# -- the command -----------------------------------------------------------------------------


@dataclass(slots=True)
class Context:
    laravel: Laravel
    sim: SimInstance
    redis: RedisProc | None
    cores: h.Cores
    tmp: Path
    http: aiohttp.ClientSession
    sessions: list[str]
    code: Path | None  # the exported wa_router the routers run (`--at`); None: the repo's
    exits: list[tuple[str, Exit]]  # (backlog, how each router stopped)


@dataclass(slots=True)
class Results:
    intake: list[IntakeRun] = field(default_factory=list)
    outage: list[OutageRun] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    redis_version: str = ""
    commit_us: tuple[float, float] | None = None  # (wall, CPU) of one fsynced commit
    code: tuple[str, str] = ("", "")  # code_state() at the start and at the end
    at: str = ""  # the commit the routers ran from (`--at`), else ""
    exits: list[tuple[str, Exit]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def intake_line(r: IntakeRun) -> str:
    p = h.percentile
    lag = (f", lag p50 {c.fmt(p(r.lag_ms, 50), 1)} p99 {c.fmt(p(r.lag_ms, 99), 1)} ms"
           if r.laravel_up else "")  # fmt: skip
    return (f"{r.rate:8,.0f} ev/s, intake p50 {c.fmt(p(r.latency_ms, 50), 1)} p99 "
            f"{c.fmt(p(r.latency_ms, 99), 1)} ms{lag}; "
            f"{', '.join(f'{k}: {v}' for k, v in r.answers.most_common())}"
            f"{f', LOST {r.lost}' if r.lost else ''}")  # fmt: skip


def outage_line(r: OutageRun) -> str:
    drain = "never" if r.drain_s is None else f"{r.drain_s:.2f} s"
    first = "never" if r.first_s is None else f"{r.first_s:.2f} s"
    return (
        f"{r.queued}/{r.sent} queued, first delivered {first}, all {drain} after the return; "
        f"dup ids {r.dup_ids}, order violations {r.order_violations}, lost {r.lost}"
    )


async def measure(plan: Plan, cores: h.Cores, tmp: Path, res: Results, code: Path | None
                  ) -> None:  # fmt: skip
    laravel = Laravel()
    await laravel.start()
    sims = await h.start_sims(1)
    sessions = h.session_ids(max(plan.sessions, plan.outage_sessions), seed=21)
    for sid in sessions:
        sims[0].add_session(sid)
    res.commit_us = await asyncio.to_thread(commit_cost_us, tmp, 200 if plan.smoke else 2000)
    redis: RedisProc | None = None
    backlogs = ["sqlite"]
    if shutil.which("redis-server") is None:
        res.notes.append("redis-server is not installed: the Redis Stream rows were skipped.")
    else:
        redis = RedisProc(tmp, cores)
        await redis.start()
        res.redis_version = c.tool_version(["redis-server", "--version"])
        backlogs.append("redis")
    try:
        async with h.client() as http:
            ctx = Context(laravel, sims[0], redis, cores, tmp, http, sessions, code, res.exits)
            for rep in range(plan.repeats):
                order = [(b, up) for up in (True, False) for b in backlogs]
                shift = rep % len(order)
                for backlog, up in order[shift:] + order[:shift]:
                    r = await intake_run(plan, Setup(backlog), up, rep, ctx)
                    res.intake.append(r)
                    print(f"webhooks intake {rep + 1}/{plan.repeats} {backlog:<6} Laravel "
                          f"{'up  ' if up else 'down'} {intake_line(r)}", flush=True)  # fmt: skip
            setups = [Setup("sqlite")]
            if redis is not None:
                setups += [Setup("redis"), Setup("redis", 2)]
            for retry_max_s in plan.retry_max:
                for setup in setups:
                    o = await outage_run(plan, setup, retry_max_s, ctx)
                    res.outage.append(o)
                    print(f"webhooks outage {plan.outage_s:g} s, retry_max_s {retry_max_s:g}, "
                          f"{setup.label}: {outage_line(o)}", flush=True)  # fmt: skip
    finally:
        if redis is not None:
            await redis.stop()
        await h.stop_sims(sims)
        await laravel.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--posters", type=int, default=32, help="concurrent posters (32)")
    parser.add_argument("--sessions", type=int, default=200, help="intake: sessions (200)")
    parser.add_argument("--duration", type=float, default=10.0, help="intake: seconds (10)")
    parser.add_argument("--repeats", type=int, default=3, help="intake: runs per row (3)")
    parser.add_argument(
        "--outage-s", type=float, default=None, help="Laravel down, seconds (60; smoke 3)"
    )
    parser.add_argument(
        "--outage-rate", type=float, default=50.0, help="events per second during it (50)"
    )
    parser.add_argument("--outage-sessions", type=int, default=100, help="sessions (100)")
    parser.add_argument(
        "--retry-max",
        type=float,
        action="append",
        help="webhooks.retry_max_s; repeatable (default 60 and 5; smoke 60)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI: 1.5 s intake runs, a 3 s outage, retry_max_s 60 only; "
        "writes bench/out/webhooks-smoke.md unless --out",
    )
    parser.add_argument(
        "--at",
        metavar="REV",
        help="run the routers from `git archive REV wa_router` (a commit, unaffected by "
        "edits during the run) instead of the working tree",
    )
    parser.add_argument("--out", type=Path, help="default: bench/results/webhooks.md")


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        plan = Plan(args.posters, args.sessions, 0.3, 1.5, 1,
                    args.outage_s if args.outage_s is not None else 3.0, args.outage_rate,
                    args.outage_sessions, 1.0, tuple(args.retry_max or (60.0,)), 10.0, True,
                    args.out or c.SCRATCH / "webhooks-smoke.md", 1.0, 1.0, 2.0)  # fmt: skip
    else:
        plan = Plan(args.posters, args.sessions, 1.0, args.duration, args.repeats,
                    args.outage_s if args.outage_s is not None else 60.0, args.outage_rate,
                    args.outage_sessions, 1.0, tuple(args.retry_max or (60.0, 5.0)), 30.0,
                    False, args.out or c.RESULTS / "webhooks.md", 5.0)  # fmt: skip
    intake_s = 4 * plan.repeats * (plan.warm_s + plan.duration_s + 2)
    outage_s = sum(3 * (plan.outage_s + min(m, plan.outage_s) + 4) for m in plan.retry_max)
    print(f"bench webhooks: 4 intake rows x {plan.repeats} runs of {plan.duration_s:g} s, "
          f"{3 * len(plan.retry_max)} outage runs of {plan.outage_s:g} s: expect about "
          f"{(intake_s + outage_s) / 60:.1f} min", flush=True)  # fmt: skip
    load_at_start, cores, started = h.load_average(), h.Cores.split(), time.monotonic()
    res = Results(machine=c.machine_info())
    first = code_state()
    with TemporaryDirectory(prefix="wa-bench-webhooks-") as tmp, h.affinity(cores.bench):
        code = None
        if args.at:
            code = Path(tmp) / "code"
            res.at = snapshot(args.at, code)
            print(f"bench webhooks: the routers run wa_router/ of {res.at} (git archive)")
        h.run_loop(measure(plan, cores, Path(tmp), res, code))
    res.code = (first, first if res.at else code_state())
    if res.code[0] != res.code[1]:
        print(f"bench webhooks: wa_router changed during the run ({res.code[0]} -> "
              f"{res.code[1]}): the rows may come from different code",
              file=sys.stderr)  # fmt: skip
    command = " ".join(["python -m bench", *sys.argv[1:]])
    head = h.header("webhooks", command, time.monotonic() - started, plan.smoke, load_at_start)
    h.write_results(render(plan, cores, res, head), plan.out)
    bad = [r for r in res.intake if not r.ok] + [
        o for o in res.outage if o.drain_s is None or o.lost or o.queued != o.sent
    ]
    for r in bad:
        print(f"bench webhooks: a run lost events or had refused answers: {r.setup.label}",
              file=sys.stderr)  # fmt: skip
    return 1 if bad else 0
