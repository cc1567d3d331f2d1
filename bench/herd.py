"""Herd: 1,000 concurrent requests for one session that moved: how many status probes?

Per herd: the router (a subprocess on its own core) knows the session on node-1 (one request
taught it); then the session moves silently to node-2 (`moved`: node-1 answers 404 `Session
not found`), or vanishes (`nowhere`: every instance answers 404; the negative cache must hold
the herd), or moves and node-1 crashes (`stopped`: connects to node-1 are refused). The sims'
counters are reset and N `POST /api/messages/send` for that session are fired at once over
N already-open keep-alive connections. The goal: one scan, one probe per instance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

import aiohttp

from wa_router.sim import SimInstance

from . import _harness as h
from . import common as c

VARIANTS = ("unmoved", "moved", "nowhere", "stopped", "moved-128")
SEND = "/api/messages/send"
DESCRIBE = {
    "unmoved": "baseline: the session stays on node-1 (cache hit, one upstream request each)",
    "moved": "moved silently node-1 -> node-2 (node-1 answers 404 Session not found)",
    "nowhere": "removed from node-1, on no instance (negative cache)",
    "stopped": "moved node-1 -> node-2, node-1 stopped (connect refused)",
    "moved-128": "as moved, but the instances listen with aiohttp's backlog of 128 instead of "
    "Node's 511 (what a burst of new upstream connections does)",
}


@dataclass(frozen=True, slots=True)
class Plan:
    requests: int
    repeats: int
    profile: bool
    smoke: bool
    out: Path


@dataclass(slots=True)
class Shot:
    variant: str
    probes: dict[str, int]  # instance -> status probes it received
    sends: dict[str, int]  # instance -> sends forwarded to it
    scans: int
    probes_router: int
    negative_hits: int
    latency_ms: list[float]
    probe_arrival_ms: list[float]  # after the herd was fired
    overflows: int  # listen queue overflows (SYNs dropped) in the namespace during the herd
    router_cpu_ms: float  # the router process's CPU over the herd
    bench_cpu_ms: float  # this process's (client and instances) over the herd
    answers: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        probes = " ".join(f"{k}={v}" for k, v in self.probes.items())
        return (f"scans {self.scans}, probes {probes}, p50 "
                f"{c.fmt(h.percentile(self.latency_ms, 50), 1)} ms p99 "
                f"{c.fmt(h.percentile(self.latency_ms, 99), 1)} ms, "
                f"answers {dict(self.answers)}")  # fmt: skip

    @property
    def one_round(self) -> bool:
        return self.scans == 1 and all(n <= 1 for n in self.probes.values())


def listen_overflows() -> int:
    """TcpExt ListenOverflows of this network namespace (every process's listeners)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for keys, values in zip(lines[::2], lines[1::2], strict=False):
        if keys.startswith("TcpExt:"):
            table = dict(zip(keys.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


class Herd:
    def __init__(self, http: aiohttp.ClientSession, router: h.RouterProc,
                 sims: list[SimInstance], plan: Plan) -> None:  # fmt: skip
        self.http, self.router, self.sims, self.plan = http, router, sims, plan
        self.seq = 0

    async def warm_connections(self) -> None:
        """Open N client connections to the router and keep them (keep-alive), so the herd
        measures the router, not N TCP handshakes into a listen backlog of 128."""

        async def one() -> None:
            async with self.http.get(f"{self.router.url}/healthz") as resp:
                await resp.read()

        for _ in range(2):
            await asyncio.gather(*(one() for _ in range(self.plan.requests)))

    async def send(self, sid: str, t0: float) -> tuple[float, str]:
        body = {"session_id": sid, "workspace_id": 1, "recipient_phone": "628123456789",
                "message": "herd", "type": "text", "api_key": h.API_KEY}  # fmt: skip
        try:
            async with self.http.post(
                self.router.url + SEND,
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            ) as resp:
                data = await resp.read()
                answer = str(resp.status)
                if resp.status != 200:
                    answer += " " + h.error_cause(resp.status, data)[0]
        except (aiohttp.ClientError, TimeoutError) as exc:
            answer = f"client: {type(exc).__name__}"
        return (time.perf_counter() - t0) * 1000, answer

    async def status(self, sid: str) -> int:
        url = f"{self.router.url}/api/sessions/{sid}/status?api_key={h.API_KEY}"
        async with self.http.get(url) as resp:
            await resp.read()
            return resp.status

    async def shot(self, variant: str, spy_to: Path | None = None) -> Shot:
        self.seq += 1
        sid = h.session_ids(self.seq, seed=7)[-1]
        a, b = self.sims[0], self.sims[1]
        a.add_session(sid)
        for _ in range(2):  # the first is found by a scan, the second is a cache hit
            if await self.status(sid) != 200:
                raise RuntimeError(f"the router did not learn {sid} on {a.name}")
        if variant == "nowhere":
            a.remove_session(sid)
        elif variant != "unmoved":
            await a.move_session(sid, b)
        if variant == "stopped":
            await a.stop()
        for sim in self.sims:
            sim.reset_counters()
            if variant == "moved-128" and sim.running:
                h.set_backlog(sim, 128)
        spy = None
        if spy_to is not None:
            prefix = c.pinned(
                None if self.router.cores.bench is None else str(self.router.cores.bench),
                self.router.cores.taskset,
            )
            spy = c.pyspy_record(self.router.pid, 2, spy_to, self.router.tmp, prefix)
            await asyncio.sleep(0.5)  # fmt: skip
        before = await self.router.discovery(self.http)
        overflows = listen_overflows()
        router_cpu, bench_cpu = c.tree_cpu_s(self.router.pid), time.process_time()
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self.send(sid, t0) for _ in range(self.plan.requests)))
        bench_cpu = time.process_time() - bench_cpu
        router_cpu = c.tree_cpu_s(self.router.pid) - router_cpu
        overflows = listen_overflows() - overflows
        after = await self.router.discovery(self.http)
        if spy is not None:
            await asyncio.to_thread(spy.popen.wait, 30)
        path = f"/api/sessions/{sid}/status"
        arrivals = [(t - t0) * 1000 for sim in self.sims for t, r in h.timed(sim).timed()
                    if r.method == "GET" and r.path == path]  # fmt: skip
        shot = Shot(
            variant,
            {sim.name: sim.count("GET", path) for sim in self.sims},
            {sim.name: sim.count("POST", SEND) for sim in self.sims},
            after["scans"] - before["scans"],
            after["probes"] - before["probes"],
            after["negative_hits"] - before["negative_hits"],
            [lat for lat, _ in results],
            sorted(arrivals),
            overflows,
            router_cpu * 1000,
            bench_cpu * 1000,
            Counter(answer for _, answer in results),
        )
        a.remove_session(sid)
        b.remove_session(sid)
        if variant == "stopped":
            await h.start_sim(a)
        for sim in self.sims:
            h.set_backlog(sim, h.NODE_BACKLOG)
        await self.wait_healthy()
        return shot

    async def wait_healthy(self, timeout_s: float = 15.0) -> None:
        """Until the router sees every instance healthy (no suspect left from a herd)."""
        deadline = time.monotonic() + timeout_s
        while set((await self.router.states(self.http)).values()) != {"healthy"}:
            if time.monotonic() > deadline:
                raise TimeoutError("the router did not see every instance healthy again")
            await asyncio.sleep(0.05)


async def measure(plan: Plan, cores: h.Cores, tmp: Path) -> tuple[list[Shot], Path | None]:
    router = h.RouterProc(tmp, cores)
    sims = await h.start_sims(4)
    # Health every 0.5 s: a restarted node-1 is healthy again quickly between herds.
    doc = h.router_config(router.port, sims, tmp / "state", health={"interval_s": 0.5})
    shots: list[Shot] = []
    profile = None
    try:
        async with h.client(limit=0) as http:
            await router.start(doc, http)
            herd = Herd(http, router, sims, plan)
            await herd.warm_connections()
            for rep in range(plan.repeats):
                for variant in VARIANTS:
                    shot = await herd.shot(variant)
                    shots.append(shot)
                    print(f"herd {rep + 1}/{plan.repeats} {variant:<8} {shot.line()}", flush=True)
            missed = [s for s in shots if s.variant != "unmoved" and not s.one_round]
            if plan.profile and missed:
                out = c.SCRATCH / "herd" / "router-herd.speedscope.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.unlink(missing_ok=True)
                try:
                    shot = await herd.shot(missed[0].variant, spy_to=out)
                    print(f"herd profile run {shot.variant}: {shot.line()}", flush=True)
                    profile = out if out.exists() else None
                except FileNotFoundError as exc:
                    print(f"herd: no profile: {exc}", file=sys.stderr)
    finally:
        await router.stop()
        await h.stop_sims(sims)
    return shots, profile


def render(plan: Plan, cores: h.Cores, shots: list[Shot], profile: Path | None,
           head: list[str]) -> str:  # fmt: skip
    names = [f"node-{i}" for i in range(1, 5)]
    out = [*head, "### Method", ""]
    out += [
        f"""\
- 4 simulated Blazz instances (real loopback sockets) in the bench's event loop, the router a \
subprocess (`python -m wa_router.cli serve`, uvloop, memory store; discovery probe timeout 1 s, \
negative cache 2 s; health checks every 0.5 s so a restarted node-1 is back between herds).
- Pinning: {cores.describe()}.
- Per herd: a fresh session id on node-1; two `GET .../status` through the router teach it the \
owner (a scan, then a cache hit); then the variant's change, the instances' counters reset, and \
{plan.requests:,} `POST /api/messages/send` for that session fired at once (`asyncio.gather`) \
over {plan.requests:,} keep-alive connections opened beforehand. Probes = `GET \
/api/sessions/<id>/status` each instance received; scans, probes and negative-cache hits = the \
deltas of the router's `/metrics` counters (`discovery.stats`). Latency: from the moment the \
herd was fired to each answer's end (the client writes {plan.requests:,} requests first, so the \
last ones leave later). Probe arrival: when each probe reached its instance, after the herd \
was fired (same clock: `perf_counter`, one process).
- {plan.repeats} herds per variant, variants interleaved; median (min-max) over herds.
- Variants: """
        + "; ".join(f"**{k}**: {v}" for k, v in DESCRIBE.items())
        + ".",
        "",
    ]
    rows = []
    for variant in VARIANTS:
        group = [s for s in shots if s.variant == variant]
        row = [variant, h.spread([s.scans for s in group], 0)]
        row += [h.spread([s.probes[n] for s in group], 0) for n in names]
        row += [h.spread([s.negative_hits for s in group], 0)]
        row += [h.spread([s.sends[n] for s in group], 0) for n in names[:2]]
        row += [h.spread([h.percentile(s.latency_ms, p) for s in group]) for p in (50, 99)]
        row += [h.spread([s.router_cpu_ms for s in group], 0),
                h.spread([s.bench_cpu_ms for s in group], 0)]  # fmt: skip
        row += [h.spread([min(s.probe_arrival_ms, default=None) for s in group]),
                h.spread([max(s.probe_arrival_ms, default=None) for s in group]),
                h.spread([s.overflows for s in group], 0)]  # fmt: skip
        answers: Counter[str] = Counter()
        for s in group:
            answers.update(s.answers)
        row += [", ".join(f"{k}: {v}" for k, v in answers.most_common())]
        rows.append(row)
    head_row = [
        "variant",
        "scans",
        *(f"probes {n}" for n in names),
        "negative-cache hits",
        "sends to node-1",
        "sends to node-2",
        "latency p50 ms",
        "latency p99 ms",
        "router CPU ms",
        "bench CPU ms (client + instances)",
        "first probe arrived ms",
        "last probe arrived ms",
        "listen overflows",
        "answers (all herds)",
    ]
    out += ["### Results (per herd: median (min-max))", "", c.md_table(head_row, rows), ""]
    out += ["### Target (reported, not asserted)", ""]
    rows = []
    for variant in VARIANTS[1:]:
        group = [s for s in shots if s.variant == variant]
        bad = [s for s in group if not s.one_round]
        worst = max((max(s.probes.values()) for s in group), default=0)
        verdict = (
            "met"
            if not bad
            else (
                f"**missed** in {len(bad)}/{len(group)} herds: up to "
                f"{max(s.scans for s in group)} scans, {worst} probes to one instance"
            )
        )
        rows.append([variant, "one probe round per herd (1 scan, <= 1 probe per instance)",
                     f"{c.median([s.scans for s in group])} scans", verdict])  # fmt: skip
    out += [c.md_table(["variant", "target", "measured (median)", "verdict"], rows), ""]
    out += ["### Notes", "", *notes(shots), ""]
    out += ["### Profile", ""]
    if profile is not None:
        out += [f"py-spy record (200 Hz, CPU only) of the router during one extra herd of the "
                f"first variant that missed; `{profile.relative_to(c.REPO)}`.", "",
                c.profile_table(c.speedscope_top(profile, 15)), ""]  # fmt: skip
    else:
        out += ["No profile run (target met, `--no-profile`, smoke run, or py-spy missing).", ""]
    return "\n".join(out)


def notes(shots: list[Shot]) -> list[str]:
    def med(variant: str, get: Callable[[Shot], float | None]) -> float:
        return c.median([v for s in shots if s.variant == variant
                         if (v := get(s)) is not None]) or 0.0  # fmt: skip

    wall = med("unmoved", lambda s: max(s.latency_ms, default=None))
    bench = med("unmoved", lambda s: s.bench_cpu_ms)
    router = med("unmoved", lambda s: s.router_cpu_ms)
    extra = med("moved", lambda s: s.router_cpu_ms) - router
    old = med("moved", lambda s: s.sends.get("node-1", 0))
    size = len(shots[0].latency_ms) if shots else 0
    first = med("moved", lambda s: min(s.probe_arrival_ms, default=None))
    return [
        f"- Latency is queueing behind CPU work, not waiting on probes: in `unmoved` (no "
        f"discovery at all) the last answer came {wall:,.0f} ms after the herd was fired, "
        f"while the bench process (the client and the 4 instances, one core) used "
        f"{bench:,.0f} ms of CPU and the router (the other core) {router:,.0f} ms. Both sides "
        f"of the harness are near their wall time, so compare the variants with `unmoved`; "
        f"the router's own cost of a herd is its CPU column.",
        f"- The herd's own cost to the router: `moved` used {extra:+,.0f} ms of router CPU "
        f"more than `unmoved` (median). Every request of the herd was first sent to the old "
        f"owner ({old:,.0f} of {size:,} sends reached node-1 and were answered 404, then "
        f"were retried on node-2). Here the first 404 comes back only after ~{first:,.0f} ms "
        f"(the instances share the bench core with the client), by when the requests had "
        f"resolved the old owner; the router does not look at the directory again between "
        f"resolving a request's owner and sending it.",
        "- `nowhere`: every request is forwarded to node-1 first (the directory still names it) "
        "and answered 404; those that come back after the one scan ended are answered from the "
        "negative cache, the others joined the scan.",
        "- `stopped`: node-1 is suspect after the first refused connect and gets no probe; the "
        "other probes are cancelled once node-2 answers `connected` (an instance not yet asked "
        "then receives none).",
        "- `listen overflows` counts SYNs dropped by full accept queues in the whole network "
        "namespace (other processes' too). With aiohttp's backlog of 128, a burst of 256 "
        "new upstream connections can overflow an instance's queue; the dropped SYN is "
        "retried after 1 s, exactly the router's connect timeout (`upstream.connect_timeout_s`).",
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=1000, help="requests per herd (1000)")
    parser.add_argument("--repeats", type=int, default=5, help="herds per variant (5)")
    parser.add_argument("--no-profile", action="store_true", help="no py-spy run on a miss")
    parser.add_argument("--smoke", action="store_true", help="CI: 100 requests, 1 herd each; "
                        "writes bench/out/herd-smoke.md unless --out")  # fmt: skip
    parser.add_argument("--out", type=Path, help="default: bench/results/herd.md")


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        plan = Plan(100, 1, False, True, args.out or c.SCRATCH / "herd-smoke.md")
    else:
        plan = Plan(args.requests, args.repeats, not args.no_profile, False,
                    args.out or c.RESULTS / "herd.md")  # fmt: skip
    print(
        f"bench herd: {len(VARIANTS)} variants x {plan.repeats} herds of {plan.requests}",
        flush=True,
    )
    load_at_start, cores, started = h.load_average(), h.Cores.split(), time.monotonic()
    with TemporaryDirectory(prefix="wa-bench-herd-") as tmp, h.affinity(cores.bench):
        shots, profile = h.run_loop(measure(plan, cores, Path(tmp)))
    command = " ".join(["python -m bench", *sys.argv[1:]])
    head = h.header("herd", command, time.monotonic() - started, plan.smoke, load_at_start)
    h.write_results(render(plan, cores, shots, profile, head), plan.out)
    return 0
