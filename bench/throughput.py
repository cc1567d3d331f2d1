"""Throughput: wa-router next to the obvious alternatives, one upstream, one load, one run.

Method in `Report.method` (it is printed with the results). The figure to compare is the
proxy's CPU time per request: it does not depend on how much CPU the load generator got.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

from . import common as c

INSTANCES = 4
SESSIONS = 100
API_KEY = "k"
PRIMARY = "wa-uvloop"  # the configuration the ratios and targets are about


@dataclass(frozen=True, slots=True)
class Kind:
    key: str
    title: str
    script: str


KINDS = (
    Kind("GET", "GET /api/sessions/{id}/status?api_key=k (session in the path)", "status_get.lua"),
    Kind("POST", "POST /api/messages/send (session_id in a ~200-byte JSON body)", "send_post.lua"),
)


@dataclass(frozen=True, slots=True)
class Setup:
    key: str
    label: str
    proxy: str  # none | nginx | naive | wa
    loop: str = "uvloop"
    workers: int = 1


SETUPS = (
    Setup("direct", "direct to the upstream", "none"),
    Setup("nginx", "nginx proxy_pass, keepalive pool", "nginx"),
    Setup("naive", "naive aiohttp proxy (uvloop)", "naive"),
    Setup("wa-asyncio", "wa-router --loop asyncio", "wa", loop="asyncio"),
    Setup(PRIMARY, "wa-router --loop uvloop", "wa"),
    Setup("wa-2w", "wa-router --workers 2 (uvloop)", "wa", workers=2),
)


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int
    duration_s: int
    connections: tuple[int, ...]
    warmup_s: int
    profile: bool
    smoke: bool
    out: Path

    def expected_s(self) -> float:
        per_kind = self.warmup_s + 0.1 + len(self.connections) * (self.duration_s + 0.1)
        profile = 3 + 2 * self.warmup_s + self.duration_s if self.profile else 0
        return self.rounds * len(SETUPS) * (0.6 + len(KINDS) * per_kind) + profile


@dataclass(slots=True)
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float | None  # proxy CPU per request; None for `direct`
    errors: int  # socket errors + non-2xx answers

    def line(self) -> str:
        return (f"{self.rps:>8,.0f} req/s  p50 {self.p50_ms:6.2f} ms  p99 {self.p99_ms:7.2f} ms  "
                f"cpu {c.fmt(self.cpu_us, 1):>6} us/req  errors {self.errors}")  # fmt: skip


Samples = dict[tuple[str, str, int], list[Sample]]


@dataclass
class Bench:
    tools: dict[str, str]
    plan: Plan
    tmp: Path
    cores: c.Cores
    ports: list[int] = field(default_factory=list)
    upstream: c.Proc | None = None

    def start_upstream(self) -> None:
        self.ports = c.free_ports(INSTANCES + 1)
        listen = "\n".join(f"        listen 127.0.0.1:{p};" for p in self.ports[:INSTANCES])
        self.upstream = self._nginx("upstream", self.cores.load, listen=listen)
        for port in self.ports[:INSTANCES]:
            c.wait_http(f"http://127.0.0.1:{port}/health", proc=self.upstream)

    def _nginx(self, name: str, cores: str | None, **values: str) -> c.Proc:
        text = (c.NGINX_TEMPLATES / f"{name}.conf").read_text()
        for key, value in {"dir": str(self.tmp), **values}.items():
            text = text.replace("{{" + key + "}}", value)
        (conf := self.tmp / f"{name}.conf").write_text(text)
        argv = [self.tools["nginx"], "-e", str(self.tmp / f"{name}-error.log")]
        argv += ["-p", str(self.tmp), "-c", str(conf)]
        return c.Proc(name, [*c.pinned(cores, self.cores.taskset), *argv], self.tmp)

    @contextlib.contextmanager
    def proxy(self, setup: Setup) -> Iterator[tuple[str, int | None]]:
        """The URL the load goes to and the pid of the proxy's process tree (None: direct)."""
        first = f"http://127.0.0.1:{self.ports[0]}"
        if setup.proxy == "none":
            yield first, None
            return
        port, cores = self.ports[INSTANCES], self.cores.of(setup.workers)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WA_ROUTER_")}
        env["PYTHONPATH"] = str(c.REPO)
        if setup.proxy == "nginx":
            proc = self._nginx(
                "proxy", cores, port=str(port), upstream=first.removeprefix("http://")
            )
        else:
            if setup.proxy == "naive":
                code = "import sys; from bench.throughput import naive_proxy; naive_proxy(sys.argv)"
                argv = [sys.executable, "-c", code, str(port), first]
            else:
                argv = [sys.executable, "-m", "wa_router.cli", "serve", "-c", self._wa_conf(port)]
                argv += ["--loop", setup.loop, "--workers", str(setup.workers)]
            proc = c.Proc(setup.key, [*c.pinned(cores, self.cores.taskset), *argv], self.tmp, env)
        url = f"http://127.0.0.1:{port}"
        try:
            c.wait_http(f"{url}/api/sessions/s0/status?api_key={API_KEY}", proc=proc)
            yield url, proc.pid
        finally:
            proc.stop()

    def _wa_conf(self, port: int) -> str:
        instances = [{"name": f"node-{p}", "url": f"http://127.0.0.1:{p}"} for p in self.ports[:-1]]
        doc = {"server": {"host": "127.0.0.1", "port": port, "shutdown_grace_s": 1},
               "instances": instances, "upstream": {"api_key": API_KEY},
               "health": {"interval_s": 2}, "sync": {"interval_s": 3600},
               "log": {"level": "warning"}, "state": {"dir": str(self.tmp / "state")}}  # fmt: skip
        (path := self.tmp / "router.yaml").write_text(json.dumps(doc, indent=2))  # JSON is YAML
        return str(path)

    def wrk(self, url: str, kind: Kind, connections: int, duration_s: int) -> c.WrkResult:
        env = {"BENCH_SESSIONS": str(SESSIONS), "BENCH_API_KEY": API_KEY}
        prefix = c.pinned(self.cores.load, self.cores.taskset)
        script = c.WRK_SCRIPTS / kind.script
        return c.run_wrk(self.tools["wrk"], url, script, connections, duration_s, prefix, env)

    def warm(self, url: str) -> None:
        for kind in KINDS if self.plan.warmup_s else ():
            self.wrk(url, kind, 32, self.plan.warmup_s)

    def measure(self) -> Samples:
        samples: Samples = {}
        for rnd in range(self.plan.rounds):
            # Rotate the order each round, so no configuration always runs first or last.
            order = SETUPS[rnd % len(SETUPS) :] + SETUPS[: rnd % len(SETUPS)]
            for setup in order:
                with self.proxy(setup) as (url, pid):
                    self.warm(url)
                    for kind in KINDS:
                        for n in self.plan.connections:
                            s = self.one(url, pid, kind, n)
                            samples.setdefault((setup.key, kind.key, n), []).append(s)
                            where = f"round {rnd + 1}/{self.plan.rounds} {setup.key:<10}"
                            print(f"{where} {kind.key:<4} c={n:<3} {s.line()}", flush=True)
        return samples

    def one(self, url: str, pid: int | None, kind: Kind, conns: int) -> Sample:
        before = c.tree_cpu_s(pid) if pid else 0.0
        res = self.wrk(url, kind, conns, self.plan.duration_s)
        cpu_us = (c.tree_cpu_s(pid) - before) * 1e6 / res.requests if pid and res.requests else None
        return Sample(res.rps, res.p50_ms, res.p99_ms, cpu_us, res.socket_errors + res.non_2xx)

    def profile(self) -> str:
        """py-spy on the wa-router uvloop process during one extra c=32 POST run: Markdown."""
        out = c.SCRATCH / "throughput" / "wa-uvloop.speedscope.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        with self.proxy(next(s for s in SETUPS if s.key == PRIMARY)) as (url, pid):
            assert pid is not None
            self.warm(url)
            prefix = c.pinned(self.cores.load, self.cores.taskset)
            try:
                spy = c.pyspy_record(pid, self.plan.duration_s, out, self.tmp, prefix)
            except FileNotFoundError as exc:
                return f"No profile: {exc}."
            try:
                time.sleep(0.5)  # let py-spy attach before the load starts
                got = " ".join(self.one(url, pid, KINDS[1], 32).line().split()[:-2])
                spy.popen.wait(timeout=30)
            finally:
                spy.stop()
        if not out.exists():
            return f"No profile: py-spy wrote none: {spy.tail(300)}"
        return (
            f"py-spy record (200 Hz) of the wa-router uvloop process during one extra "
            f"{self.plan.duration_s} s POST run at c=32, not in the tables (sampling slows it: "
            f"{got}). Python frames only: time in C code (uvloop, the HTTP parser, json) is "
            "the own time of the Python function that called it; time waiting in the event "
            f"loop is left out (py-spy's idle filter). Speedscope: `{out.relative_to(c.REPO)}`."
            "\n\n" + c.profile_table(c.speedscope_top(out, 15))
        )


def naive_proxy(argv: list[str]) -> None:
    """The `naive` baseline: an aiohttp server and one ClientSession that forwards method,
    path and body and returns status and body; no routing, headers or error handling."""
    import uvloop
    from aiohttp import ClientSession, TCPConnector, web

    port, upstream = int(argv[1]), argv[2]
    client = web.AppKey("client", ClientSession)

    async def start(app: web.Application) -> None:
        app[client] = ClientSession(connector=TCPConnector(limit=256))

    async def forward(request: web.Request) -> web.Response:
        body, url = await request.read(), upstream + request.path_qs
        headers = {"Content-Type": request.headers.get("Content-Type", "text/plain")}
        sent = request.app[client].request(request.method, url, data=body, headers=headers)
        async with sent as r:
            return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)

    app = web.Application()
    app.on_startup.append(start)
    app.router.add_route("*", "/{tail:.*}", forward)
    loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)


@dataclass
class Report:
    plan: Plan
    cores: c.Cores
    samples: Samples

    def values(self, setup: str, kind: Kind, n: int, attr: str) -> list[float]:
        found = (getattr(s, attr) for s in self.samples.get((setup, kind.key, n), []))
        return [v for v in found if v is not None]

    def med(self, setup: str, kind: Kind, n: int, attr: str) -> float | None:
        return c.median(self.values(setup, kind, n, attr))

    def table(self, kind: Kind) -> str:
        head = "configuration|proxy cores|c|req/s median (min-max)|p50 ms|p99 ms median (min-max)"
        rows = []
        for s in SETUPS:
            for n in self.plan.connections:
                v = functools.partial(self.values, s.key, kind, n)
                cores = self.cores.describe(s.workers) if s.proxy != "none" else "-"
                rows.append([s.label, cores, str(n), c.fmt_spread(v("rps"), 0)])
                rows[-1] += [c.fmt(c.median(v("p50_ms"))), c.fmt_spread(v("p99_ms"))]
                rows[-1] += [c.fmt_spread(v("cpu_us"), 1), str(int(sum(v("errors"))))]
        return c.md_table([*head.split("|"), "proxy CPU us/req median (min-max)", "errors"], rows)

    def ratios(self) -> list[str]:
        others = ("direct", "nginx", "naive")
        cols = [("cpu_us", o) for o in others[1:]]
        cols += [(a, o) for a in ("p50_ms", "p99_ms") for o in others]
        head = ["request", "c"] + [f"{a.split('_')[0]} / {o}" for a, o in cols]
        rows, added = [], []
        for kind in KINDS:
            for n in self.plan.connections:
                med = functools.partial(self.med, kind=kind, n=n)
                ratios = [c.ratio(med(PRIMARY, attr=a), med(o, attr=a)) for a, o in cols]
                rows.append([kind.key, str(n), *ratios])
            direct, parts = self.med("direct", kind, 1, "p99_ms"), []
            for key in (PRIMARY, "wa-asyncio", "wa-2w"):
                p99 = self.med(key, kind, 1, "p99_ms")
                if p99 is not None and direct is not None:
                    parts.append(f"{key} {p99 - direct:+.3f} ms ({p99:.3f} - {direct:.3f})")
            if parts:
                added.append(f"- added p99 at c=1, {kind.key} (p99 - direct): {'; '.join(parts)}")
        return [c.md_table([h.replace("cpu /", "CPU/req /") for h in head], rows), "", *added]

    def targets(self) -> str:
        rows: list[list[str]] = []
        for kind in KINDS:
            for n in self.plan.connections:
                wa, naive = (self.med(k, kind, n, "cpu_us") for k in (PRIMARY, "naive"))
                if wa is not None and naive is not None:
                    rows.append(["CPU/req below the naive aiohttp proxy's", kind.key, str(n)])
                    rows[-1] += [f"{wa:.1f} us", f"< {naive:.1f} us", c.verdict(wa, naive, "us")]
                if wa is not None:
                    rows.append(["CPU/req <= 50 us", kind.key, str(n), f"{wa:.1f} us"])
                    rows[-1] += ["<= 50 us", c.verdict(wa, 50.0, "us")]
            wa, direct = (self.med(k, kind, 1, "p99_ms") for k in (PRIMARY, "direct"))
            if wa is not None and direct is not None:
                rows.append(["added p99 at c=1 <= 0.25 ms", kind.key, "1", f"{wa - direct:.3f} ms"])
                rows[-1] += ["<= 0.25 ms", c.verdict(wa - direct, 0.25, "ms")]
        return c.md_table(["target", "request", "c", "measured", "target", "verdict"], rows)

    def method(self) -> str:
        p, cores = self.plan, self.cores
        pin = "- Pinning: none (taskset missing or fewer than 2 usable cores)."
        if cores.taskset:
            pin = (f"- Pinning (`taskset -c`): upstream nginx, wrk and py-spy on core "
                   f"{cores.load}; the proxy under test (its process tree) on core {cores.proxy}; "
                   "`--workers 2` gets both cores, one of them shared with the load.")  # fmt: skip
        return f"""\
- Upstream: one nginx `return 200` (75-byte JSON, `worker_processes 1`) on {INSTANCES} ports = \
the {INSTANCES} instances of the pool. wa-router knows all {INSTANCES}; the nginx and naive \
proxies forward to the first one (they do no routing).
- Load: wrk, closed loop, c = {", ".join(map(str, p.connections))} (1 thread for c=1, else 2), \
{p.duration_s} s per run. bench/wrk/*.lua cycle over {SESSIONS} session ids s0..s{SESSIONS - 1}; \
their done() prints wrk's latency percentiles as JSON.
{pin}
- Rounds: {p.rounds}, interleaved: in each round every configuration is started, warmed up \
({p.warmup_s} s per request kind at c=32, not measured), measured (each request kind at each \
c) and stopped; the order rotates each round; the upstream stays up. Tables: median over \
rounds (min-max).
- Proxy CPU per request: utime + stime (/proc/<pid>/stat) of the proxy process and its \
descendants, read before and after each wrk run, divided by the requests wrk counted (clock \
ticks of 10 ms). It includes wa-router's background work (health checks every 2 s).
- wa-router: memory store, `upstream.api_key: {API_KEY}`, health every 2 s, sync every 3600 s, \
log level warning. Each session is found by rediscovery on first use (nginx answers \
`connected` for every session on every port), then served from the directory cache.
- `errors`: socket errors + non-2xx answers, all rounds: a row with errors is not comparable."""

    def render(self, machine: dict[str, str], elapsed_s: float, profile: str) -> str:
        out = ["## Throughput: wa-router next to the alternatives", ""]
        if self.plan.smoke:
            out += ["> **Smoke run** (1 round, 1 s runs, no warm-up): it checks that the bench "
                    "works; its numbers mean nothing.", ""]  # fmt: skip
        p, when = self.plan, time.strftime("%Y-%m-%d %H:%M %Z")
        opts = "--smoke" if p.smoke else f"--rounds {p.rounds} --duration {p.duration_s}"
        out += [f"`python -m bench throughput {opts}`, {when}, {elapsed_s / 60:.1f} min.", ""]
        for title, table in (("Machine", machine), ("Versions", c.versions())):
            out += [f"### {title}", "", c.md_table(["", ""], table.items()), ""]
        out += ["### Method", "", self.method(), ""]
        for kind in KINDS:
            out += [f"### {kind.title}", "", self.table(kind), ""]
        out += ["### Ratios: wa-router (uvloop) / the others (medians of this run)", ""]
        out += [*self.ratios(), ""]
        out += ["### Targets (wa-router with uvloop; reported, not asserted)", ""]
        out += [self.targets(), ""]
        out += ["### Profile: where wa-router's CPU goes", "", profile, ""]
        return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI: 1 round of 1 s runs at c=1 and 32, no warm-up, no profile (the code path, "
        "not numbers); writes bench/out/throughput-smoke.md unless --out",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy run")
    parser.add_argument("--out", type=Path, help="default: bench/results/throughput.md")


def run(args: argparse.Namespace) -> int:
    tools = c.require_tools(["nginx", "wrk"])
    if args.rounds < 1 or args.duration < 1:
        print("bench throughput: --rounds and --duration must be at least 1", file=sys.stderr)
        return 2
    if args.smoke:
        plan = Plan(1, 1, (1, 32), 0, False, True, args.out or c.SCRATCH / "throughput-smoke.md")
    else:
        out = args.out or c.RESULTS / "throughput.md"
        plan = Plan(args.rounds, args.duration, (1, 32, 128), 1, not args.no_profile, False, out)
    conns = ",".join(map(str, plan.connections))
    print(f"bench throughput: {len(SETUPS)} configurations x {len(KINDS)} request kinds x "
          f"c={conns}, {plan.rounds} round(s) of {plan.duration_s} s runs: expect about "
          f"{plan.expected_s() / 60:.1f} min", flush=True)  # fmt: skip
    started, machine = time.monotonic(), c.machine_info()
    cores = c.Cores.pick()
    with TemporaryDirectory(prefix="wa-bench-") as tmp:
        bench = Bench(tools, plan, Path(tmp), cores)
        try:
            bench.start_upstream()
            samples = bench.measure()
            prof = bench.profile() if plan.profile else "Skipped (--smoke or --no-profile)."
        finally:
            if bench.upstream is not None:
                bench.upstream.stop()
    elapsed = time.monotonic() - started
    machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    machine["busy processes at end (not the bench)"] = c.busy_others()
    print(text := Report(plan, cores, samples).render(machine, elapsed, prof))
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    plan.out.write_text(text)
    errors = sum(s.errors for v in samples.values() for s in v)
    print(f"bench throughput: wrote {plan.out} ({elapsed:.0f} s, {errors} errors)", flush=True)
    return 1 if errors else 0
