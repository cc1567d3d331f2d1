"""Failover: what one run's requests say (`analyse`), and the Markdown report (`render`)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import _harness as h
from . import common as c

if TYPE_CHECKING:
    from .failover import Plan, Req, Run

TARGET_DELAY_S = 0.2
NOT_HERE = ("session_not_found", "no_healthy_instance")
EVENT_TAIL_S = 1.0  # the event window ends this long after the last session came back

CAT_A = "A: in flight to the stopped instance"
CAT_B = "B: session on no instance yet"
CAT_C = "C: never reached the stopped instance"


@dataclass(frozen=True, slots=True)
class Scenario:
    mode: str  # "rediscovery" | "webhooks"
    gap_s: float
    negative_ttl_s: float | None = None  # discovery.negative_ttl_s; None: the default (2 s)

    @property
    def label(self) -> str:
        how = "rediscovery only" if self.mode == "rediscovery" else "webhooks + rediscovery"
        ttl = "" if self.negative_ttl_s is None else f", negative cache {self.negative_ttl_s:g} s"
        return f"{how}, gap {self.gap_s:g} s{ttl}"


@dataclass(slots=True)
class Outcome:
    scenario: Scenario
    sessions: int
    directory_size: int
    requests: int = 0
    rate: float = 0.0
    failed: int = 0
    cat_a: int = 0
    cat_b: int = 0
    cat_c: int = 0
    steady_failed: int = 0
    causes: Counter[tuple[str, str]] = field(default_factory=Counter)
    c_after_back_ms: list[float] = field(default_factory=list)  # C requests: due - session back
    moved: int = 0
    back_p50: float | None = None  # s: session back -> its first 200 (waits for a request)
    back_p99: float | None = None
    delay_p50: float | None = None  # s: first request while back -> its first 200
    delay_p99: float | None = None
    delay_max: float | None = None
    first_failed: int = 0  # sessions whose first request while back failed
    unreached: int = 0  # sessions with no 200 after coming back, by the end of the run
    lat: dict[str, tuple[float | None, float | None, float | None]] = field(default_factory=dict)
    discovery: dict[str, int] = field(default_factory=dict)
    probes_seen: int = 0
    router_cpu_pct: float = 0.0
    stop_ms: float = 0.0

    def line(self) -> str:
        return (f"{self.requests} req ({self.rate:.0f}/s), failed {self.failed} "
                f"(A {self.cat_a}, B {self.cat_b}, C {self.cat_c}); back->200 router delay "
                f"p50 {c.fmt(_ms(self.delay_p50), 1)} p99 {c.fmt(_ms(self.delay_p99), 1)} ms; "
                f"event p99 {c.fmt(self.lat['event'][1], 1)} ms; "
                f"scans {self.discovery.get('scans', 0)}")  # fmt: skip


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def category(run: Run, r: Req) -> str:
    if r.rid in run.reached_victim or (r.sent and r.instance == run.victim):
        return CAT_A
    back = run.t_add.get(r.session)
    # The cause may carry " (unreachable: ...)": the router names the instance it could not
    # ask; the session was on no instance all the same.
    if back is not None and r.t_sched < back and r.cause.split(" (")[0] in NOT_HERE:
        return CAT_B
    return CAT_C


def analyse(run: Run, warm_s: float) -> Outcome:
    o = Outcome(run.scenario, run.sessions, run.directory_size)
    done = [r for r in run.reqs if r.t_end > 0]
    o.requests = len(run.reqs)
    span = run.reqs[-1].t_sched - run.t0 if run.reqs else 0.0
    o.rate = o.requests / span if span else 0.0
    for r in done:
        if r.status == 200:
            continue
        o.failed += 1
        cat = category(run, r)
        o.cat_a += cat == CAT_A
        o.cat_b += cat == CAT_B
        o.cat_c += cat == CAT_C
        o.causes[(cat, r.cause)] += 1
        if cat == CAT_C and r.session in run.t_add:
            o.c_after_back_ms.append((r.t_sched - run.t_add[r.session]) * 1000)
        o.steady_failed += r.t_end < run.t_stop
    back_last = max(run.t_add.values(), default=run.t_stop)
    windows: dict[str, Callable[[Req], bool]] = {
        "steady": lambda r: run.t0 + warm_s <= r.t_sched < run.t_stop,
        "event": lambda r: run.t_stop <= r.t_sched < back_last + EVENT_TAIL_S,
        "after": lambda r: r.t_sched >= back_last + EVENT_TAIL_S,
    }
    for name, inside in windows.items():
        lat = h.ms([r.t_end - r.t_sched for r in done if inside(r)])
        o.lat[name] = (h.percentile(lat, 50), h.percentile(lat, 99), max(lat, default=None))
    reachable(run, o)
    before, after = run.discovery_before, run.discovery_after
    o.discovery = {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in after}
    o.probes_seen = run.probes_seen
    end = max((r.t_end for r in done), default=run.t0)
    o.router_cpu_pct = 100 * run.router_cpu_s / (end - run.t0) if end > run.t0 else 0.0
    o.stop_ms = (run.t_stop_done - run.t_stop) * 1000
    return o


def reachable(run: Run, o: Outcome) -> None:
    """Per moved session: from coming back to its first 200 (`back`), and from the first
    request that asked for it while it was back to that 200 (`delay`: the router's part)."""
    by_session: dict[str, list[Req]] = defaultdict(list)
    moved = set(run.moved)
    for r in run.reqs:
        if r.session in moved and r.t_end > 0:
            by_session[r.session].append(r)
    back: list[float] = []
    delay: list[float] = []
    for sid in run.moved:
        t_add = run.t_add[sid]
        reqs = by_session[sid]
        wins = [r for r in reqs if r.status == 200 and r.t_end >= t_add]
        asked = [r for r in reqs if r.t_sched >= t_add]
        if asked and min(asked, key=lambda r: r.t_sched).status != 200:
            o.first_failed += 1
        if not wins:
            if asked:  # asked while back, never answered 200 within the run: censored
                o.unreached += 1
                back.append(math.inf)
                delay.append(math.inf)
            continue
        first = min(wins, key=lambda r: r.t_end)
        start = min(max(r.t_sched, t_add) for r in [*asked, first])
        back.append(first.t_end - t_add)
        delay.append(first.t_end - start)
    o.moved = len(run.moved)
    o.back_p50, o.back_p99 = h.percentile(back, 50), h.percentile(back, 99)
    o.delay_p50, o.delay_p99 = h.percentile(delay, 50), h.percentile(delay, 99)
    o.delay_max = max(delay, default=None)


# -- the report ------------------------------------------------------------------------------


def _by_scenario(outcomes: Sequence[Outcome]) -> dict[Scenario, list[Outcome]]:
    groups: dict[Scenario, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(o.scenario, []).append(o)
    return groups


def _col(group: Sequence[Outcome], get: Callable[[Outcome], float | None], digits: int = 1) -> str:
    return h.spread([get(o) for o in group], digits)


def method(plan: Plan, cores: h.Cores) -> str:
    return f"""\
- Per run: 4 simulated Blazz instances (`wa_router.sim`, real loopback sockets) holding \
{plan.sessions:,} sessions round-robin, and a fresh router subprocess (`python -m \
wa_router.cli serve`, uvloop, memory store, `upstream.api_key` so its start-up sync learns every \
owner: the run starts warm; health checks every 2 s, fall 2; discovery probe timeout 1 s, \
negative cache 2 s; log level warning).
- Pinning: {cores.describe()}.
- Load: open loop, {plan.rate:g} req/s for {plan.steady_s + plan.after_s:g} s, alternately \
`POST /api/messages/send` (JSON body) and `GET /api/sessions/{{id}}/status`, each for a random \
session; a request is sent when due whatever the others are doing, and its latency counts from \
when it was due (no coordinated omission). Client timeout 20 s.
- Event: at {plan.steady_s:g} s node-2 is stopped like a crash (listener closed, open \
connections aborted); `gap` seconds after the stop began its {plan.sessions // 4} sessions are \
added to the 3 others (round-robin), silently (**rediscovery only**: the router finds them \
when asked) or each with a signed `session_ready` webhook to the router (**webhooks**; there \
the instances also send `message_sent` webhooks for every send, as Node does).
- Runs: {plan.repeats} per scenario, scenarios interleaved; tables give the median over runs \
(min-max). Latency windows: steady = due in [{plan.warm_s:g} s, stop); event = due in [stop, \
last session back + {EVENT_TAIL_S:g} s); after = the rest.
- Failed requests by category: **A** reached the stopped instance before it died (the instance \
recorded it, or the router says the connection broke after sending: a POST there may have been \
processed and is never re-sent); **B** the session was on no instance when asked (due before \
its `add_session`, answered `session_not_found`/`no_healthy_instance`: true here, though the \
router cannot know it; its 404 names the stopped instance as unreachable when it is still \
suspect); \
**C** everything else: never reached the stopped instance and failed anyway (target 0).
- Reachable again, per moved session: *back -> first 200* is from its `add_session` to the end \
of its first successful request: it includes waiting for the load to ask for that session at \
all ({plan.sessions:,} sessions at {plan.rate:g} req/s: one request per session every \
{plan.sessions / plan.rate:.1f} s on average), so it measures the load, not the router. \
*Router delay* starts at the first request that asked for the session while it was back (or at \
`add_session` for a request already waiting then): 0 extra when the router got it right at \
once; a wrong answer (e.g. a negative-cache hit) makes it run to the next request that \
succeeds; a session asked for while back and not answered 200 by the end of the run counts as \
`never`. The 0.2 s target is checked against the router delay."""


def tables(plan: Plan, groups: dict[Scenario, list[Outcome]]) -> list[str]:
    out = ["### Failed requests (per run; median (min-max))", ""]
    rows = [[s.label, _col(g, lambda o: o.requests, 0), _col(g, lambda o: o.failed, 0),
             _col(g, lambda o: o.cat_a, 0), _col(g, lambda o: o.cat_b, 0),
             _col(g, lambda o: o.cat_c, 0)] for s, g in groups.items()]  # fmt: skip
    out += [c.md_table(["scenario", "requests", "failed", CAT_A, CAT_B, CAT_C + " (target 0)"],
                       rows), ""]  # fmt: skip
    out += ["### Failures by cause (sum over all runs of a scenario)", ""]
    rows = []
    for s, g in groups.items():
        total: Counter[tuple[str, str]] = Counter()
        for o in g:
            total.update(o.causes)
        for (cat, cause), n in sorted(total.items()):
            rows.append([s.label, cat.split(":")[0], f"`{cause}`", str(n)])
    out += [c.md_table(["scenario", "category", "cause (router `error`)", "requests"], rows)
            if rows else "No failed requests.", ""]  # fmt: skip
    out += ["### Reachable again (per moved session; ms; median over runs (min-max))", ""]
    rows = [[s.label, _col(g, lambda o: o.moved, 0), _col(g, lambda o: _ms(o.back_p50), 0),
             _col(g, lambda o: _ms(o.back_p99), 0), _col(g, lambda o: _ms(o.delay_p50)),
             _col(g, lambda o: _ms(o.delay_p99)), _col(g, lambda o: _ms(o.delay_max)),
             _col(g, lambda o: o.first_failed, 0), _col(g, lambda o: o.unreached, 0)]
            for s, g in groups.items()]  # fmt: skip
    head = [
        "scenario",
        "moved",
        "back -> first 200 p50",
        "p99",
        "router delay p50",
        "p99",
        "max",
        "sessions whose first request while back failed",
        "no 200 by the end",
    ]
    out += [c.md_table(head, rows), ""]
    out += ["### Latency of all requests (ms, from when due; median over runs (min-max))", ""]
    rows = []
    for s, g in groups.items():
        row = [s.label]
        for win in ("steady", "event", "after"):
            row += [h.spread([o.lat[win][0] for o in g]), h.spread([o.lat[win][1] for o in g])]
        rows.append([*row, _col(g, lambda o: o.lat["event"][2]), _col(g, lambda o: o.stop_ms)])
    head = [
        "scenario",
        "steady p50",
        "steady p99",
        "event p50",
        "event p99",
        "after p50",
        "after p99",
        "event max",
        "stop() took",
    ]
    out += [c.md_table(head, rows), ""]
    out += ["### The router's work during a run (median (min-max))", ""]
    rows = [[s.label] + [h.spread([o.discovery.get(k, 0) for o in g], 0)
                         for k in ("scans", "probes", "found", "not_found", "negative_hits")]
            + [_col(g, lambda o: o.probes_seen, 0), _col(g, lambda o: o.router_cpu_pct, 0)]
            for s, g in groups.items()]  # fmt: skip
    head = [
        "scenario",
        "scans",
        "probes",
        "found",
        "not found",
        "negative-cache hits",
        "probes the instances saw",
        "router CPU %",
    ]
    out += [c.md_table(head, rows), ""]
    return out


def targets(groups: dict[Scenario, list[Outcome]]) -> list[str]:
    rows = []
    for s, g in groups.items():
        delay = c.median([o.delay_p99 for o in g if o.delay_p99 is not None])
        if delay is not None:
            verdict = (c.verdict(delay, TARGET_DELAY_S, "s") if not math.isinf(delay) else
                       "**missed**: over 1% of the sessions asked for while back got no 200 "
                       "by the end of the run")  # fmt: skip
            rows.append(
                [
                    s.label,
                    "first success after a session is back <= 0.2 s (router delay p99)",
                    f"{delay:.3f} s",
                    verdict,
                ]
            )
        cat_c = c.median([o.cat_c for o in g]) or 0.0
        verdict = "met" if cat_c == 0 else f"**missed** by {cat_c:g} requests per run (median)"
        rows.append([s.label, "0 failed requests that never reached the stopped instance",
                     f"{cat_c:g}", verdict])  # fmt: skip
    return [c.md_table(["scenario", "target", "measured (median of runs)", "verdict"], rows)]


def notes(groups: dict[Scenario, list[Outcome]]) -> list[str]:
    out = []
    for s, g in groups.items():
        total: Counter[str] = Counter()
        for o in g:
            total.update({cause: n for (cat, cause), n in o.causes.items() if cat == CAT_C})
        if total:
            neg = c.median([o.discovery.get("negative_hits", 0) for o in g])
            causes = ", ".join(f"`{k}` x{v}" for k, v in total.most_common())
            after = [ms for o in g for ms in o.c_after_back_ms]
            when = (f"; they were due {min(after):,.0f} to {max(after):,.0f} ms after their "
                    f"session came back" if after else "")  # fmt: skip
            out.append(
                f"- {s.label}: the C failures were {causes} over {len(g)} runs{when}; "
                f"the router counted {neg:g} negative-cache hits per run (median)."
            )
    out += [
        "- A `session_not_found` for a session that is back is the negative cache (discovery."
        "negative_ttl_s, 2 s by default) answering for a scan made while the session was on no "
        "instance: without a webhook nothing tells the router that the session came back "
        "before the entry expires. With webhooks, `session_ready` clears it "
        "(`Discovery.forget_negative`). A profile cannot show this (the router is idle, not "
        "busy, while it answers from the cache); the scenario with a shorter negative cache, "
        "when run, shows the effect of the setting alone.",
        "- *back -> first 200* includes the wait for the load to ask for a session again (the "
        "load picks sessions at random); it is reported for completeness and says nothing "
        "about the router. The router delay is the figure the 0.2 s target is about.",
        "- Category A is small because the instances answer in well under a millisecond: "
        "few requests are in flight at any instant. Against real Node instances (sends take "
        "seconds through WhatsApp), A is about rate x share of the stopped instance x send "
        "time, and a POST among them is never re-sent (it may have been processed).",
    ]
    return out


def render(plan: Plan, cores: h.Cores, outcomes: Sequence[Outcome], profile: Path | None,
           head: list[str]) -> str:  # fmt: skip
    groups = _by_scenario(outcomes)
    out = [*head, "### Method", "", method(plan, cores), ""]
    out += tables(plan, groups)
    out += ["### Targets (reported, not asserted)", "", *targets(groups), ""]
    out += ["### Notes", "", *notes(groups), ""]
    out += ["### Profile", ""]
    if profile is not None:
        top = c.speedscope_top(profile, 15)
        out += [
            f"py-spy record (200 Hz, CPU samples only, idle left out) of the router process "
            f"from 0.5 s before the stop to ~4 s after, in one extra run of the worst "
            f"scenario; `{profile.relative_to(c.REPO)}`.",
            "",
            c.profile_table(top),
            "",
        ]
    else:
        out += ["No profile run (targets met, `--no-profile`, smoke run, or py-spy missing).", ""]
    return "\n".join(out)
