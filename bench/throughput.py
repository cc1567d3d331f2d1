"""Throughput: wa-router next to the obvious alternatives, one upstream, one load, one run.

Method in `Report.method` (it is printed with the results). The figure to compare is the
proxy's CPU time per request: it does not depend on how much CPU the load generator got.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

from . import common as c

INSTANCES = 4
SESSIONS = 100
API_KEY = "k"
PRIMARY = "wa-uvloop"  # the configuration the ratios and targets are about: the lean front
AIOHTTP_FRONT = "wa-aiohttp"  # the same router with every request through aiohttp
PROFILE_CONNS = 32


# The targets (reported, not asserted), for the lean front against nginx.
CPU_CONNS = (32, 128)  # proxy CPU per request <= CPU_TARGET x nginx's at these c
CPU_TARGET = 1.7
RPS_CONNS = 32  # throughput >= RPS_TARGET x nginx's, one core
RPS_TARGET = 0.6
P50_TARGET_MS = 0.05  # p50 at c=1 within this of nginx's
P99_CONNS = 128  # p99 <= P99_TARGET x nginx's
P99_TARGET = 2.0
TARGETS = {
    "cpu": f"CPU/req <= {CPU_TARGET}x nginx's",
    "rps": f"req/s >= {RPS_TARGET}x nginx's, one core",
    "p50": f"p50 within {P50_TARGET_MS} ms of nginx's",
    "p99": f"p99 <= {P99_TARGET:g}x nginx's",
    "naive": "CPU/req below the naive aiohttp proxy's",
}


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
    proxy: str  # none | nginx | naive | floor | wa
    loop: str = "uvloop"
    workers: int = 1
    front: str = "lean"  # wa-router's `server.front`
    tree: Path | None = None  # where its `wa_router/` comes from (None: the working tree)


SETUPS = (
    Setup("direct", "direct to the upstream", "none"),
    Setup("nginx", "nginx proxy_pass, keepalive pool", "nginx"),
    Setup("naive", "naive aiohttp proxy (uvloop)", "naive"),
    Setup(AIOHTTP_FRONT, "`wa-aiohttp`: wa-router, aiohttp front (uvloop)", "wa", front="aiohttp"),
    Setup("floor", "`floor`: bare httptools proxy (uvloop), no routing", "floor"),
    Setup(PRIMARY, "`wa-uvloop`: wa-router, lean front (uvloop)", "wa"),
    Setup("wa-2w", "`wa-2w`: wa-router, lean front, --workers 2 (uvloop)", "wa", workers=2),
)
WA_SETUPS = tuple(s for s in SETUPS if s.proxy == "wa")
BASELINE = "wa-base"  # `--baseline REV`: PRIMARY as it was at REV, in the same run


def with_baseline(rev: str, tree: Path) -> None:
    """Add `BASELINE` to the configurations: the same router as `PRIMARY`, its code from
    `tree` (REV exported there)."""
    global SETUPS, WA_SETUPS
    label = f"`{BASELINE}`: wa-router at {rev}, lean front (uvloop)"
    base = Setup(BASELINE, label, "wa", tree=tree)
    at = next(i for i, s in enumerate(SETUPS) if s.key == PRIMARY)
    SETUPS = (*SETUPS[:at], base, *SETUPS[at:])
    WA_SETUPS = tuple(s for s in SETUPS if s.proxy == "wa")


def export_rev(rev: str, into: Path) -> str:
    """`wa_router/` of git revision `rev` written under `into`; its short hash."""
    short = subprocess.run(["git", "-C", str(c.REPO), "rev-parse", "--short", rev],
                           check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(c.REPO), "archive", short, "wa_router"],
                             check=True, capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return short


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int
    duration_s: int
    connections: tuple[int, ...]
    warmup_s: int
    profile: bool
    smoke: bool
    out: Path
    baseline: str | None = None  # `--baseline`'s revision, short

    def expected_s(self) -> float:
        per_kind = self.warmup_s + 0.1 + len(self.connections) * (self.duration_s + 0.1)
        profile = 3 + 2 * self.warmup_s + len(KINDS) * (self.duration_s + 1) if self.profile else 0
        return self.rounds * len(SETUPS) * (0.6 + len(KINDS) * per_kind) + profile


@dataclass(slots=True)
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float | None  # proxy CPU per request; None for `direct`
    sys_us: float | None  # the system (kernel) part of it
    errors: int  # socket errors + non-2xx answers
    # wa-router's own p99 over the run: its request-duration histogram (from the request
    # read to its answer written), as the bound of the bucket it falls in; None: not wa
    inside_p99_ms: float | None = None

    def line(self) -> str:
        return (f"{self.rps:>8,.0f} req/s  p50 {self.p50_ms:6.2f} ms  p99 {self.p99_ms:7.2f} ms  "
                f"cpu {c.fmt(self.cpu_us, 1):>6} us/req  errors {self.errors}")  # fmt: skip


Samples = dict[tuple[str, str, int], list[Sample]]
# configuration -> per round: (relayed on the express lane, handed over, session requests)
Lanes = dict[str, list[tuple[float, float, float]]]


def lane_counts(url: str) -> tuple[float, float, float]:
    """What a wa-router's /metrics says of its express lane since it started."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    relayed = handed = session = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "wa_router_express_requests_total":
                if s.labels.get("outcome") == "relayed":
                    relayed = s.value
                else:
                    handed += s.value
            elif s.name == "wa_router_requests_total" and s.labels.get("route_kind") == "session":
                session += s.value
    return relayed, handed, session


def duration_buckets(url: str) -> dict[float, float]:
    """A wa-router's session requests by duration so far, as its /metrics has them
    (`wa_router_request_duration_seconds`: bucket bound in s -> requests, cumulative)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.name == "wa_router_request_duration_seconds_bucket"
                and s.labels.get("route_kind") == "session"
            ):
                out[float(s.labels["le"])] = s.value
    return out


def bucket_p99_ms(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The bound of the bucket the 99th percentile of the requests between two readings
    falls in (None: no requests)."""
    grown = {le: n - before.get(le, 0.0) for le, n in after.items()}
    total = grown.get(float("inf"), 0.0)
    if total <= 0 or min(grown.values()) < 0:
        return None  # nothing between them, or not the same process's histogram
    return next((1e3 * le for le in sorted(grown) if grown[le] >= 0.99 * total), None)


def _vs(value: float | None, nginx: float | None, digits: int) -> str:
    """`value (ratio to nginx)`."""
    return f"{c.fmt(value, digits)} ({c.ratio(value, nginx)})" if value is not None else "-"


def _span(values: list[float], form: str = "{:.2f}x") -> str:
    """`lo-hi` of `values` (one value when they agree to the shown digits)."""
    if not values:
        return "-"
    lo, hi = form.format(min(values)), form.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


@dataclass
class Bench:
    tools: dict[str, str]
    plan: Plan
    tmp: Path
    cores: c.Cores
    ports: list[int] = field(default_factory=list)
    upstream: c.Proc | None = None
    lanes: Lanes = field(default_factory=dict)

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
        # Which wa_router runs is PYTHONPATH's say alone: `python -P` keeps the working
        # directory (the repo, `Proc`'s cwd) off the front of sys.path, where it shadowed
        # a baseline tree (so `wa-base` once ran the working tree), and PYTHONPATH comes
        # before the editable install's finder.
        env["PYTHONPATH"] = str(setup.tree or c.REPO)
        if setup.proxy == "nginx":
            proc = self._nginx(
                "proxy", cores, port=str(port), upstream=first.removeprefix("http://")
            )
        else:
            if setup.proxy in ("naive", "floor"):
                code = {
                    "naive": "from bench.throughput import naive_proxy as run",
                    "floor": "from bench.floor import floor_proxy as run",
                }[setup.proxy]
                argv = [sys.executable, "-P", "-c", f"import sys; {code}; run(sys.argv)"]
                argv += [str(port), first]
            else:
                conf = self._wa_conf(port, setup.front)
                argv = [sys.executable, "-P", "-m", "wa_router.cli", "serve", "-c", conf]
                argv += ["--loop", setup.loop, "--workers", str(setup.workers)]
            proc = c.Proc(setup.key, [*c.pinned(cores, self.cores.taskset), *argv], self.tmp, env)
        url = f"http://127.0.0.1:{port}"
        try:
            c.wait_http(f"{url}/api/sessions/s0/status?api_key={API_KEY}", proc=proc)
            yield url, proc.pid
        finally:
            proc.stop()

    def _wa_conf(self, port: int, front: str) -> str:
        instances = [{"name": f"node-{p}", "url": f"http://127.0.0.1:{p}"} for p in self.ports[:-1]]
        server = {"host": "127.0.0.1", "port": port, "shutdown_grace_s": 1, "front": front}
        doc = {"server": server,
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
                            # One worker: with more, each /metrics is one worker's.
                            own = setup.proxy == "wa" and setup.workers == 1
                            s = self.one(url, pid, kind, n, wa=own)
                            samples.setdefault((setup.key, kind.key, n), []).append(s)
                            where = f"round {rnd + 1}/{self.plan.rounds} {setup.key:<10}"
                            print(f"{where} {kind.key:<4} c={n:<3} {s.line()}", flush=True)
                    if setup.proxy == "wa" and setup.workers == 1:  # one /metrics to read
                        self.lanes.setdefault(setup.key, []).append(lane_counts(url))
        return samples

    def one(self, url: str, pid: int | None, kind: Kind, conns: int, wa: bool = False) -> Sample:
        buckets = duration_buckets(url) if wa else {}
        before = c.tree_cpu_split_s(pid) if pid else (0.0, 0.0)
        res = self.wrk(url, kind, conns, self.plan.duration_s)
        errors = res.socket_errors + res.non_2xx
        if not pid or not res.requests:
            return Sample(res.rps, res.p50_ms, res.p99_ms, None, None, errors)
        user, system = (b - a for a, b in zip(before, c.tree_cpu_split_s(pid), strict=True))
        per = 1e6 / res.requests
        inside = bucket_p99_ms(buckets, duration_buckets(url)) if wa else None
        cpu, sys_us = (user + system) * per, system * per
        return Sample(res.rps, res.p50_ms, res.p99_ms, cpu, sys_us, errors, inside)

    def profile(self) -> Profile:
        """py-spy on the lean wa-router process (`PRIMARY`) during one extra c=32 run per
        request kind, not in the tables; the speedscope files go beside the report."""
        setup = next(s for s in SETUPS if s.key == PRIMARY)
        runs: list[tuple[Kind, Path, str]] = []
        failed: list[str] = []
        with self.proxy(setup) as (url, pid):
            assert pid is not None
            self.warm(url)
            prefix = c.pinned(self.cores.load, self.cores.taskset)
            for kind in KINDS:
                out = profile_path(self.plan.out, kind)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.unlink(missing_ok=True)
                try:
                    spy = c.pyspy_record(pid, self.plan.duration_s, out, self.tmp, prefix)
                except FileNotFoundError as exc:
                    return Profile(f"No profile: {exc}.", None)
                try:
                    time.sleep(0.5)  # let py-spy attach before the load starts
                    words = self.one(url, pid, kind, PROFILE_CONNS).line().split()
                    spy.popen.wait(timeout=30)
                finally:
                    spy.stop()
                if out.exists():
                    runs.append((kind, out, " ".join(words[:-2])))
                else:
                    failed.append(f"{kind.key}: py-spy wrote none: {spy.tail(300)}")
        if not runs:
            return Profile("No profile: " + "; ".join(failed), None)
        head = (
            f"py-spy record (200 Hz) of the `{PRIMARY}` process (wa-router, lean front, "
            f"uvloop) during one extra {self.plan.duration_s} s run per request kind at "
            f"c={PROFILE_CONNS}, not in the tables (sampling slows it). Python frames only: "
            "time in C code (uvloop, httptools, orjson, the socket calls) is the own time of "
            "the Python function that called it, and so is the kernel's time in a system call "
            "(a line with `transport.write` carries the send; `serve`, whose line runs the "
            "loop, carries uvloop's own work: epoll, the socket reads, the callbacks); time "
            "waiting in the event loop is left out (py-spy's idle filter). The user / system "
            "split in the tables says how much of the CPU is the kernel's."
        )
        full, short = [head, ""], [head, ""]
        for kind, out, got in runs:
            top = c.speedscope_top(out, 15)
            where = f"`{_shown(out)}`"
            full += [f"**{kind.key}** ({got}; speedscope: {where}):", "", c.profile_table(top), ""]
            short += [f"**{kind.key}** ({got}; {where}):", "", c.profile_table(top[:8]), ""]
        full += failed
        return Profile("\n".join(full).strip(), "\n".join(short).strip())


@dataclass(frozen=True, slots=True)
class Profile:
    text: str  # the report's profile section
    short: str | None  # the short copy for <report>-profile.md; None: nothing recorded


def profile_path(report: Path, kind: Kind) -> Path:
    return report.with_name(f"{report.stem}-profile-{kind.key.lower()}.speedscope.json")


def _shown(path: Path) -> str:
    return str(path.relative_to(c.REPO)) if path.is_relative_to(c.REPO) else str(path)


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
    lanes: Lanes = field(default_factory=dict)

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
                rows[-1] += [c.fmt_spread(v("cpu_us"), 1), c.fmt(c.median(v("sys_us")), 1)]
                rows[-1] += [str(int(sum(v("errors"))))]
        cols = ["proxy CPU us/req median (min-max)", "of it system us/req", "errors"]
        return c.md_table([*head.split("|"), *cols], rows)

    def summary(self) -> str:
        """Every proxy against nginx: the issue's four figures, each with its ratio."""
        nginx = functools.partial(self.med, "nginx")
        head = ["configuration", "request"]
        head += [f"CPU us/req c={n} (/ nginx)" for n in CPU_CONNS]
        head += [f"req/s c={RPS_CONNS} (/ nginx)", "p50 ms c=1 (- nginx)"]
        head += [f"p99 ms c={P99_CONNS} (/ nginx)"]
        rows = []
        for kind in KINDS:
            for s in SETUPS[1:]:
                med = functools.partial(self.med, s.key, kind)
                row = [s.label, kind.key]
                for n in CPU_CONNS:
                    row.append(_vs(med(n, "cpu_us"), nginx(kind, n, "cpu_us"), 1))
                row.append(_vs(med(RPS_CONNS, "rps"), nginx(kind, RPS_CONNS, "rps"), 0))
                p50, ng = med(1, "p50_ms"), nginx(kind, 1, "p50_ms")
                diff = f" ({p50 - ng:+.3f})" if p50 is not None and ng is not None else ""
                row.append(c.fmt(p50, 3) + diff)
                row.append(_vs(med(P99_CONNS, "p99_ms"), nginx(kind, P99_CONNS, "p99_ms"), 2))
                rows.append(row)
        return c.md_table(head, rows)

    def fronts(self) -> list[str]:
        """The lean front (`PRIMARY`) against the aiohttp front and the naive proxy."""
        cols = [("cpu_us", AIOHTTP_FRONT), ("rps", AIOHTTP_FRONT), ("p50_ms", AIOHTTP_FRONT)]
        cols += [("p99_ms", AIOHTTP_FRONT), ("cpu_us", "naive")]
        names = {"cpu_us": "CPU/req", "rps": "req/s", "p50_ms": "p50", "p99_ms": "p99"}
        head = ["request", "c"] + [f"{names[a]} / {o}" for a, o in cols]
        rows, added = [], []
        for kind in KINDS:
            for n in self.plan.connections:
                med = functools.partial(self.med, kind=kind, n=n)
                ratios = [c.ratio(med(PRIMARY, attr=a), med(o, attr=a)) for a, o in cols]
                rows.append([kind.key, str(n), *ratios])
            direct, parts = self.med("direct", kind, 1, "p99_ms"), []
            for s in ("nginx", *(w.key for w in WA_SETUPS)):
                p99 = self.med(s, kind, 1, "p99_ms")
                if p99 is not None and direct is not None:
                    parts.append(f"{s} {p99 - direct:+.3f} ms ({p99:.3f} - {direct:.3f})")
            if parts:
                added.append(f"- added p99 at c=1, {kind.key} (p99 - direct): {'; '.join(parts)}")
        return [c.md_table(head, rows), "", *added]

    def against_baseline(self) -> str:
        """`PRIMARY` / `BASELINE`, each figure, each request kind and c."""
        attrs = [("cpu_us", "CPU/req"), ("sys_us", "of it system"), ("rps", "req/s")]
        attrs += [("p50_ms", "p50"), ("p99_ms", "p99")]
        head = ["request", "c", *(f"{name} / {BASELINE}" for _, name in attrs)]
        head += [f"CPU us/req {BASELINE} -> {PRIMARY}"]
        rows = []
        for kind in KINDS:
            for n in self.plan.connections:
                med = functools.partial(self.med, kind=kind, n=n)
                row = [kind.key, str(n)]
                row += [c.ratio(med(PRIMARY, attr=a), med(BASELINE, attr=a)) for a, _ in attrs]
                row.append(f"{c.fmt(med(BASELINE, attr='cpu_us'), 1)} -> "
                           f"{c.fmt(med(PRIMARY, attr='cpu_us'), 1)}")  # fmt: skip
                rows.append(row)
        return c.md_table(head, rows)

    def targets(self) -> str:
        """The issue's targets for the lean front; the aiohttp front's figure beside it."""
        rows: list[list[str]] = []
        checks: list[tuple[str, Kind, int]] = []
        for kind in KINDS:
            checks += [("cpu", kind, n) for n in CPU_CONNS]
            checks += [("rps", kind, RPS_CONNS), ("p50", kind, 1), ("p99", kind, P99_CONNS)]
        checks += [("naive", kind, n) for kind in KINDS for n in self.plan.connections]
        for what, kind, n in checks:
            wa, ref = self.check(what, PRIMARY, kind, n), self.check(what, AIOHTTP_FRONT, kind, n)
            if wa is not None:
                other = "-" if ref is None else f"{ref[0]}: {ref[2].split(' (')[0]}"
                rows.append([TARGETS[what], kind.key, str(n), *wa, other])
        head = ["target", "request", "c", "measured (lean front)", "target", "verdict"]
        return c.md_table([*head, "aiohttp front (for comparison)"], rows)

    def check(self, what: str, key: str, kind: Kind, n: int) -> tuple[str, str, str] | None:
        """One target for one configuration: (measured, target, verdict); None: no data."""
        attr = {"rps": "rps", "p50": "p50_ms", "p99": "p99_ms"}.get(what, "cpu_us")
        ref_key = "naive" if what == "naive" else "nginx"
        wa, ref = self.med(key, kind, n, attr), self.med(ref_key, kind, n, attr)
        if wa is None or not ref:
            return None
        if what == "cpu":
            goal = CPU_TARGET * ref
            return (f"{wa:.1f} us = {wa / ref:.2f}x", f"<= {goal:.1f} us ({CPU_TARGET} x "
                    f"{ref:.1f})", c.verdict(wa, goal, "us"))  # fmt: skip
        if what == "rps":
            goal = RPS_TARGET * ref
            return (f"{wa:,.0f} req/s = {wa / ref:.2f}x", f">= {goal:,.0f} ({RPS_TARGET} x "
                    f"{ref:,.0f})", c.verdict_at_least(wa, goal, "req/s", 0))  # fmt: skip
        if what == "p50":
            goal = ref + P50_TARGET_MS
            missed = c.verdict(wa - ref, P50_TARGET_MS, "ms", digits=3)
            return (f"{wa:.3f} ms = {wa - ref:+.3f}", f"<= {goal:.3f} ms ({ref:.3f} + "
                    f"{P50_TARGET_MS})", missed)  # fmt: skip
        if what == "p99":
            goal = P99_TARGET * ref
            return (f"{wa:.2f} ms = {wa / ref:.2f}x", f"<= {goal:.2f} ms ({P99_TARGET} x "
                    f"{ref:.2f})", c.verdict(wa, goal, "ms"))  # fmt: skip
        return f"{wa:.1f} us", f"< {ref:.1f} us", c.verdict(wa, ref, "us", strict=True)

    def notes(self) -> list[str]:
        """What the numbers mean, from the numbers (each line only when its rows exist)."""
        out: list[str] = []
        med, conns = self.med, self.plan.connections
        cpu_conns = tuple(n for n in CPU_CONNS if n in conns)

        def cells(a: str, b: str, attr: str, ns: tuple[int, ...]) -> list[float]:
            pairs = [(med(a, k, n, attr), med(b, k, n, attr)) for k in KINDS for n in ns]
            return [x / y for x, y in pairs if x is not None and y]

        if saved := cells(PRIMARY, AIOHTTP_FRONT, "cpu_us", conns):
            out.append(
                f"- The lean front takes {1 - max(saved):.0%}-{1 - min(saved):.0%} less proxy "
                f"CPU per request than the aiohttp front (the same router and upstream client; "
                f"GET and POST at c={', '.join(map(str, conns))}); its throughput at "
                f"c={RPS_CONNS} is {_span(cells(PRIMARY, AIOHTTP_FRONT, 'rps', (RPS_CONNS,)))} "
                "the aiohttp front's."
            )
        if vs := cells(PRIMARY, "nginx", "cpu_us", cpu_conns):
            out.append(
                f"- Against nginx the lean front still takes {_span(vs)} nginx's CPU per "
                f"request at c={' and c='.join(map(str, cpu_conns))} (target {CPU_TARGET}x); "
                f"the aiohttp front {_span(cells(AIOHTTP_FRONT, 'nginx', 'cpu_us', cpu_conns))}."
            )
        busy = []
        for key in ("nginx", AIOHTTP_FRONT, PRIMARY):
            shares = []
            for k in KINDS:
                rps, cpu = med(key, k, RPS_CONNS, "rps"), med(key, k, RPS_CONNS, "cpu_us")
                if rps is not None and cpu is not None:
                    shares.append(f"{k.key} {rps * cpu / 1e6:.0%}")
            if shares:
                busy.append(f"{key} {', '.join(shares)}")
        if busy:
            out.append(
                f"- The proxy's core at c={RPS_CONNS} (req/s x CPU per request): "
                f"{'; '.join(busy)}. Near 100 % the proxy is CPU bound and its throughput is "
                "about 1 / (CPU per request): when both fill their core, 0.6x nginx's throughput "
                f"means about {1 / RPS_TARGET:.2f}x its CPU per request, so the throughput "
                "target is the CPU target seen from the other side."
            )
            pairs = [[med(k, kd, RPS_CONNS, "rps") for k in ("nginx", "direct")] for kd in KINDS]
            if share := [x / y for x, y in pairs if x is not None and y]:
                load = self.cores.load or "(unpinned)"
                out[-1] += (f" For scale: nginx reached {_span(share, '{:.0%}')} of the req/s "
                            f"of direct to the upstream (wrk and the upstream alone on core "
                            f"{load}).")  # fmt: skip
        little = []
        for kind in KINDS:
            rps, p50 = med(PRIMARY, kind, P99_CONNS, "rps"), med(PRIMARY, kind, P99_CONNS, "p50_ms")
            if rps and p50 is not None:
                little.append(f"{kind.key} {P99_CONNS / rps * 1e3:.2f} ms vs {p50:.2f} ms")
        if little:
            out.append(
                f"- At c={P99_CONNS} the closed loop keeps {P99_CONNS} requests waiting in line: "
                f"the lean front's p50 is about c / throughput (Little's law; {'; '.join(little)} "
                "measured), so its latency there follows its CPU per request."
            )
        split, parts = [], {}
        for key in ("nginx", "floor", AIOHTTP_FRONT, PRIMARY):
            for k in KINDS:
                cpu, system = (med(key, k, RPS_CONNS, a) for a in ("cpu_us", "sys_us"))
                if cpu is not None and system is not None:
                    split.append(f"{key} {k.key} {cpu - system:.1f} + {system:.1f}")
                    parts[key, k.key] = (cpu - system, system)
        if split:
            out.append(
                f"- Where the CPU per request goes at c={RPS_CONNS}, user + system (kernel) us: "
                f"{'; '.join(split)}. The system part is the socket calls (reads, writes, "
                "epoll) and the kernel's loopback TCP behind them; the user part is the "
                "proxy's own code (for wa-router: Python, uvloop, httptools)."
            )
            user_x, sys_x = [], []
            for k in KINDS:
                lean, ng = parts.get((PRIMARY, k.key)), parts.get(("nginx", k.key))
                if lean and ng and ng[0] and ng[1]:
                    user_x.append(lean[0] / ng[0])
                    sys_x.append(lean[1] / ng[1])
            if user_x:
                users, systems = _span(user_x, "{:.0f}x"), _span(sys_x, "{:.1f}x")
                out[-1] += f" The lean front's user part is {users} nginx's, "
                out[-1] += f"its system part {systems}."
        floor, room = [], True
        for k in KINDS:
            lean, bare, ng = (parts.get((key, k.key)) for key in (PRIMARY, "floor", "nginx"))
            if lean and bare and ng:
                room = room and sum(bare) <= CPU_TARGET * sum(ng)
                floor.append(
                    f"{k.key}: floor {sum(bare):.1f} us = {sum(bare) / sum(ng):.2f}x nginx, "
                    f"wa-router {sum(lean) - sum(bare):.1f} us more, {lean[0] - bare[0]:.1f} "
                    f"of it user"
                )
        if floor:
            out.append(
                "- The floor of a Python proxy here (`floor`, `bench/floor.py`: uvloop, "
                "httptools both ways, bytes passed through, no routing) against what "
                f"wa-router's features add on top at c={RPS_CONNS}: {'; '.join(floor)}. "
                + (
                    f"The floor is within {CPU_TARGET}x nginx's: uvloop, httptools and the "
                    "kernel leave room for the target, and what misses it is wa-router's own "
                    "Python, spread over the request path (see Profile)."
                    if room
                    else f"Even the floor is over {CPU_TARGET}x nginx's here."
                )
            )
        spread = []
        for s in ("nginx", *(w.key for w in WA_SETUPS)):
            for kind in KINDS:
                for n in cpu_conns:
                    v = self.values(s, kind, n, "cpu_us")
                    if len(v) > 1 and (m := c.median(v)):
                        spread.append(((max(v) - min(v)) / m, f"{s} {kind.key} c={n}"))
        if spread:
            worst = max(spread)
            out.append(
                f"- Noise: over rounds the CPU per request of the nginx and wa-router rows at "
                f"c >= 32 varied by up to {worst[0]:.0%} of its median ({worst[1]}); "
                "differences below that between two rows of one run are not findings."
            )
        inside = []
        for kind in KINDS:
            wrk_p99 = med(PRIMARY, kind, P99_CONNS, "p99_ms")
            own = self.values(PRIMARY, kind, P99_CONNS, "inside_p99_ms")
            if wrk_p99 is not None and own:
                inside.append(f"{kind.key} {wrk_p99:.1f} ms against <= {max(own):g} ms")
        if inside:
            out.append(
                f"- p99 at c={P99_CONNS} as wrk sees it against {PRIMARY}'s own (its "
                "`wa_router_request_duration_seconds`, from the request read to its answer "
                "written; the bound of the bucket, the worst round): "
                f"{'; '.join(inside)}. Where wrk's is far above the router's, the time was "
                "spent before the router read the request or after it wrote the answer, not "
                "in its handling of the request."
            )
        p99 = []
        for s in ("nginx", *(w.key for w in WA_SETUPS)):
            for kind in KINDS:
                for n in conns:
                    v = self.values(s, kind, n, "p99_ms")
                    if len(v) > 1 and min(v) > 0:
                        p99.append((max(v) / min(v), f"{s} {kind.key} c={n}"))
        if p99:
            worst = max(p99)
            out.append(
                f"- p99 is the noisiest figure: between rounds it varied by up to {worst[0]:.1f}x "
                f"(max / min, {worst[1]}); other work on the machine (see Machine) lands there "
                "first."
            )
        lean_fronts = {s.key for s in WA_SETUPS if s.front == "lean"}
        for key, rounds in sorted(self.lanes.items()):
            relayed, handed, session = (sum(r[i] for r in rounds) for i in range(3))
            if session and key in lean_fronts:
                out.append(
                    f"- The express lane (`wa_router/express.py`) in `{key}`: "
                    f"{relayed / session:.1%} of its {session:,.0f} session requests were sent "
                    "and answered there, "
                    f"{handed:,.0f} handed over to the full path; the rest took it from the "
                    "start (the first request of each session, found by rediscovery, and those "
                    "that found no idle upstream connection)."
                )
        if errors := sum(s.errors for v in self.samples.values() for s in v):
            out.append(f"- {errors} errors in all: the rows with errors are not comparable.")
        return out

    def method(self) -> str:
        p, cores = self.plan, self.cores
        pin = "- Pinning: none (taskset missing or fewer than 2 usable cores)."
        if cores.taskset:
            pin = (f"- Pinning (`taskset -c`): upstream nginx, wrk and py-spy on core "
                   f"{cores.load}; the proxy under test (its process tree) on core {cores.proxy}; "
                   "`--workers 2` gets both cores, one of them shared with the load.")  # fmt: skip
        return f"""\
- Upstream: one nginx `return 200` (75-byte JSON, `worker_processes 1`) on {INSTANCES} ports = \
the {INSTANCES} instances of the pool. wa-router knows all {INSTANCES}; the nginx, naive \
and floor proxies forward to the first one (they do no routing).
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
ticks of 10 ms); "of it system" is the stime part. It includes wa-router's background work \
(health checks every 2 s).
- wa-router: memory store, `upstream.api_key: {API_KEY}`, health every 2 s, sync every 3600 s, \
log level warning. Each session is found by rediscovery on first use (nginx answers \
`connected` for every session on every port), then served from the directory cache.
- Configurations: {", ".join(f"`{s.key}`" for s in SETUPS)}. The wa-router rows differ only in \
`server.front` (`lean`: proxied routes parsed by httptools on a bare asyncio Protocol, \
`wa_router/lean.py`, most of them on its express lane, `wa_router/express.py`; `aiohttp`: \
every request through aiohttp, the old path), `--loop` and \
`--workers`; all use the lean upstream client (`upstream.client: lean`). `{PRIMARY}` (lean \
front, uvloop, one worker) is the one the targets are about; `{AIOHTTP_FRONT}` is the same \
with `server.front: aiohttp`. `floor` (`bench/floor.py`) is the least a Python proxy does: \
uvloop, httptools both ways, one upstream connection per caller, bytes passed through, no \
routing. The run takes about {p.expected_s() / 60:.0f} min. The routers run the working \
tree's `wa_router/` as it is when each one starts (`{BASELINE}`, with `--baseline REV`: that \
revision's).
- `errors`: socket errors + non-2xx answers, all rounds: a row with errors is not comparable."""

    def render(self, machine: dict[str, str], elapsed_s: float, profile: str) -> str:
        out = ["## Throughput: wa-router next to the alternatives", ""]
        if self.plan.smoke:
            out += ["> **Smoke run** (1 round, 1 s runs, no warm-up): it checks that the bench "
                    "works; its numbers mean nothing.", ""]  # fmt: skip
        p, when = self.plan, time.strftime("%Y-%m-%d %H:%M %Z")
        opts = "--smoke" if p.smoke else f"--rounds {p.rounds} --duration {p.duration_s}"
        opts += f" --baseline {p.baseline}" if p.baseline else ""
        out += [f"`python -m bench throughput {opts}`, {when}, {elapsed_s / 60:.1f} min.", ""]
        for title, table in (("Machine", machine), ("Versions", c.versions())):
            out += [f"### {title}", "", c.md_table(["", ""], table.items()), ""]
        out += ["### Method", "", self.method(), ""]
        out += ["### Summary: every proxy against nginx (medians of this run)", ""]
        out += ["Each cell: the median, in parentheses its ratio to nginx's (for p50 at c=1 "
                "the difference in ms).", "", self.summary(), ""]  # fmt: skip
        out += [f"### Targets (`{PRIMARY}`: lean front, uvloop, one core; reported, not "
                "asserted)", "", self.targets(), ""]  # fmt: skip
        out += ["### What it means", "", *self.notes(), ""]
        if any(key[0] == BASELINE for key in self.samples):
            base = next(s for s in SETUPS if s.key == BASELINE)
            out += [f"### The lean front (`{PRIMARY}`) / itself at an earlier revision", ""]
            out += [f"`{BASELINE}` is {base.label.split(': ', 1)[1]}, started from that "
                    "revision's `wa_router/` in the same rounds (same upstream, load and "
                    "pinning): the change in between, measured in one run.", ""]  # fmt: skip
            out += [self.against_baseline(), ""]
        out += [f"### The lean front (`{PRIMARY}`) / the aiohttp front and the naive proxy", ""]
        out += [*self.fronts(), ""]
        for kind in KINDS:
            out += [f"### {kind.title}", "", self.table(kind), ""]
        out += ["### Profile: where the lean front's CPU goes", "", profile, ""]
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
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help=f"also run {PRIMARY} as it was at git revision REV (`{BASELINE}`), interleaved",
    )
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
    started, machine = time.monotonic(), c.machine_info()
    ticks = c.cpu_ticks()
    cores = c.Cores.pick()
    with TemporaryDirectory(prefix="wa-bench-") as tmp:
        if args.baseline:
            rev = export_rev(args.baseline, Path(tmp) / "baseline")
            with_baseline(rev, Path(tmp) / "baseline")
            plan = dataclasses.replace(plan, baseline=rev)
        print(f"bench throughput: {len(SETUPS)} configurations x {len(KINDS)} request kinds "
              f"x c={conns}, {plan.rounds} round(s) of {plan.duration_s} s runs: expect about "
              f"{plan.expected_s() / 60:.1f} min", flush=True)  # fmt: skip
        bench = Bench(tools, plan, Path(tmp), cores)
        try:
            bench.start_upstream()
            samples = bench.measure()
            skipped = Profile("Skipped (--smoke or --no-profile).", None)
            prof = bench.profile() if plan.profile else skipped
        finally:
            if bench.upstream is not None:
                bench.upstream.stop()
    elapsed = time.monotonic() - started
    machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    machine["busy processes at end (not the bench)"] = c.busy_others()
    machine["stolen by the VM's host during the run"] = c.stolen_share(ticks, c.cpu_ticks())
    print(text := Report(plan, cores, samples, bench.lanes).render(machine, elapsed, prof.text))
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    plan.out.write_text(text)
    if prof.short is not None:
        short = plan.out.with_name(f"{plan.out.stem}-profile.md")
        when = time.strftime("%Y-%m-%d %H:%M %Z")
        head = f"## Throughput: profile of the lean front\n\nFrom the run of {when} "
        short.write_text(f"{head}(`{_shown(plan.out)}`, which has the top 15).\n\n{prof.short}\n")
    errors = sum(s.errors for v in samples.values() for s in v)
    print(f"bench throughput: wrote {plan.out} ({elapsed:.0f} s, {errors} errors)", flush=True)
    return 1 if errors else 0
