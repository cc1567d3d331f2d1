"""Failover, restarts: what one run's sends say (`analyse`), and the Markdown (`render`).

A run's facts come from three places: the sends as the load saw them (due time, answer,
cause), the sims' lifecycle as it happened (`failover.watch`: the moment each copy of a
session became connected on an instance, or stopped being so, kills included), and the
arrivals the sims recorded (which instance a send reached, when). From them: when each
session was connected nowhere, which sends waited through that, and how soon after its
return they were answered.
"""

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
    from .failover import Req, RestartPlan, RestartRun

TARGET_WAIT_S = 0.1  # a waiting send is answered within this of its session's return
PARK_OUTCOMES = ("woken", "timeout", "full", "shutdown")
NO_ANSWER = "no answer by the end of the run"


@dataclass(frozen=True, slots=True)
class RestartScenario:
    kind: str  # "restart-one" | "restart-all"
    gap_s: float  # kill -> start

    @property
    def label(self) -> str:
        who = "node-2 killed" if self.kind == "restart-one" else "all 4 killed"
        return f"{self.kind}: {who}, down {self.gap_s:g} s"


# (count, p50, p99, max) of a list of seconds; infinity: never, within the run
Dist = tuple[int, float | None, float | None, float | None]


def dist(values: Sequence[float]) -> Dist:
    return (len(values), h.percentile(values, 50), h.percentile(values, 99),
            max(values, default=None))  # fmt: skip


@dataclass(slots=True)
class RestartOutcome:
    scenario: RestartScenario
    sessions: int
    seed_problem: str
    sends: int = 0
    rate: float = 0.0
    duration_s: float = 0.0
    failed: int = 0
    in_flight_failed: int = 0  # of the failed: in flight to an instance when it was killed
    steady_failed: int = 0  # failed and answered before the first kill: a harness problem
    causes: Counter[tuple[str, bool]] = field(default_factory=Counter)  # (cause, in flight)
    failures: list[str] = field(default_factory=list)  # each failed send, timed
    parked: dict[str, float] = field(default_factory=dict)  # router: outcome -> requests
    park_wait_mean: dict[str, float | None] = field(default_factory=dict)  # router: s
    waited: Dist = (0, None, None, None)  # sends in flight while connected nowhere: latency
    waited_failed: int = 0
    down_sessions: int = 0  # sessions connected nowhere for a while after the kill
    down_for: Dist = (0, None, None, None)  # how long (s), per down period
    never_back: int = 0
    at_return: Dist = (0, None, None, None)  # sends waiting at the return: return -> answer
    at_return_failed: int = 0
    moved: int = 0  # sessions whose final instance is not the one they were added to
    first_served: Dist = (0, None, None, None)  # per session: final connect -> first 200 there
    unserved: int = 0  # sessions with no 200 from their final instance by the end
    old_copy_200s: int = 0  # 200s from an older copy after the final one connected
    at_final: Dist = (0, None, None, None)  # sends waiting at the final connect: -> answer
    heard_other_last: int = 0  # sessions whose last session_ready the router relayed was
    # from another copy than the final one
    settled: bool = False
    settle_s: float | None = None  # first kill -> last connect or drop
    restored: int = 0  # accounts restored by the started instances, together
    restore_s: float | None = None  # start -> restore loop over (the slowest instance)
    router_cpu_s: float = 0.0
    deleted_logins: int = 0
    log_copy: Path | None = None

    def line(self) -> str:
        _, _, w99, wmax = self.waited
        _, _, r99, rmax = self.at_return
        _, f50, f99, _ = self.first_served
        causes = ", ".join(f"{n} {cause}" for (cause, _), n in self.causes.most_common())
        settle = "never" if self.settle_s is None else f"{self.settle_s:.1f} s"
        return (f"{self.sends} sends ({self.rate:.0f}/s), failed {self.failed}"
                f"{f' ({causes})' if causes else ''}; parked {self.parked.get('woken', 0):g} "
                f"woken, {self.parked.get('timeout', 0):g} timeout; waiting sends "
                f"{self.waited[0]} p99 {_fmt_ms(w99)} max {_fmt_ms(wmax)} ms; at return -> "
                f"answer p99 {_fmt_ms(r99)} max {_fmt_ms(rmax)} ms; connected -> first 200 "
                f"p50 {_fmt_ms(f50)} p99 {_fmt_ms(f99)} ms (last session_ready relayed from "
                f"an older copy: {self.heard_other_last}); settled {settle} after the kill; "
                f"router CPU {self.router_cpu_s:.2f} s")  # fmt: skip


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _fmt_ms(seconds: float | None) -> str:
    if seconds is not None and math.isinf(seconds):
        return "never"
    return c.fmt(_ms(seconds), 1)


def in_flight_at_kill(run: RestartRun, r: Req) -> bool:
    """The send was at an instance when it was killed (it may have been processed there)."""
    end = r.t_end or math.inf
    for t, inst in run.arrivals.get(r.rid, ()):
        killed = run.t_kill.get(inst)
        if killed is not None and t <= killed <= end:
            return True
    return r.sent and r.instance in run.t_kill


def cause_of(r: Req) -> str:
    """HTTP status and the router's `error`, the instance's error, or the client's exception."""
    if not r.t_end:
        return NO_ANSWER
    if r.status and "HTTP" not in r.cause:
        return f"HTTP {r.status} {r.cause}"
    return r.cause


def describe_failure(run: RestartRun, r: Req, t_event: float) -> str:
    """`cause`: due at, answered at, and where it went, in ms from the first kill."""

    def at(t: float) -> str:
        return f"{(t - t_event) * 1000:+,.1f}"

    hops = "; ".join(f"{inst} at {at(t)}" + (f" (killed at {at(run.t_kill[inst])})"
                                              if inst in run.t_kill else "")
                     for t, inst in run.arrivals.get(r.rid, ()))  # fmt: skip
    end = at(r.t_end) if r.t_end else "never"
    sent = f"; the router says it left for {r.instance}" if r.sent and r.instance else ""
    return (f"`{cause_of(r)}` for {r.session}: due at {at(r.t_sched)} ms, answered at {end} "
            f"ms; reached {hops or 'no instance (none recorded it)'}{sent}")  # fmt: skip


def analyse(run: RestartRun) -> RestartOutcome:
    o = RestartOutcome(run.scenario, len(run.sessions), run.seed_problem)
    t_event = min(run.t_kill.values(), default=run.t0)
    o.sends = len(run.reqs)
    o.duration_s = run.t_load_end - run.t0
    span = run.reqs[-1].t_sched - run.t0 if run.reqs else 0.0
    o.rate = o.sends / span if span else 0.0
    for r in run.reqs:
        if r.status == 200:
            continue
        o.failed += 1
        flying = in_flight_at_kill(run, r)
        o.in_flight_failed += flying
        o.causes[(cause_of(r), flying)] += 1
        o.failures.append(describe_failure(run, r, t_event))
        o.steady_failed += 0 < r.t_end < t_event

    # Who holds a connected copy of each session, through the run.
    holders: dict[str, set[str]] = defaultdict(set)
    down_since: dict[str, float] = {}
    down: dict[str, list[tuple[float, float]]] = defaultdict(list)  # [connected nowhere)
    final: dict[str, tuple[float, str]] = {}  # the last copy to connect after the kill
    for f in sorted(run.flips, key=lambda f: f.t):
        held = holders[f.session]
        was = bool(held)
        if f.up:
            held.add(f.instance)
        else:
            held.discard(f.instance)
        if f.t < t_event:
            continue
        if was and not held:
            down_since[f.session] = f.t
        elif held and not was and f.session in down_since:
            down[f.session].append((down_since.pop(f.session), f.t))
        if f.up:
            final[f.session] = (f.t, f.instance)
    for sid, since in down_since.items():
        down[sid].append((since, math.inf))
    o.down_sessions = len(down)
    o.never_back = len(down_since)
    o.down_for = dist([b - a for periods in down.values() for a, b in periods])

    by_session: dict[str, list[Req]] = defaultdict(list)
    for r in run.reqs:
        by_session[r.session].append(r)
    waited: list[float] = []
    at_return: list[float] = []
    for sid, periods in down.items():
        for r in by_session[sid]:
            end = r.t_end or math.inf
            if any(r.t_sched < b and end > a for a, b in periods):
                waited.append(end - r.t_sched)
                o.waited_failed += r.status != 200
            back = next((b for _, b in periods if r.t_sched < b < end), None)
            if back is not None:
                at_return.append(end - back)
                o.at_return_failed += r.status != 200
    o.waited, o.at_return = dist(waited), dist(at_return)

    first: list[float] = []
    at_final: list[float] = []
    for sid, (t_final, inst) in final.items():
        o.moved += inst != run.seeded[sid]
        o.heard_other_last += run.last_ready.get(sid, inst) != inst
        at_final += [(r.t_end or math.inf) - t_final for r in by_session[sid]
                     if r.t_sched < t_final < (r.t_end or math.inf)]  # fmt: skip
        served = math.inf
        for r in by_session[sid]:
            hops = run.arrivals.get(r.rid)
            if r.status != 200 or not hops:
                continue
            t_at, last = hops[-1]  # the instance that answered the 200
            if last == inst and t_at >= t_final:
                served = min(served, r.t_end - t_final)
            elif last != inst and t_at > t_final:
                o.old_copy_200s += 1
        o.unserved += math.isinf(served)
        first.append(served)
    o.first_served, o.at_final = dist(first), dist(at_final)

    o.settled = run.t_settled is not None
    last_flip = max((f.t for f in run.flips), default=t_event)
    o.settle_s = last_flip - t_event if o.settled else None
    o.restored = sum(run.restored.values())
    restores = [run.t_restored[i] - run.t_start[i] for i in run.t_start if i in run.t_restored]
    o.restore_s = max(restores, default=None)
    o.router_cpu_s = run.router_cpu_s
    o.deleted_logins = run.deleted_logins
    before, after = run.metrics_before, run.metrics_after
    for k in PARK_OUTCOMES:
        key = f'{{outcome="{k}"}}'
        o.parked[k] = after.get(f"wa_router_parked_total{key}", 0.0) - before.get(
            f"wa_router_parked_total{key}", 0.0)  # fmt: skip
        n = after.get(f"wa_router_park_wait_seconds_count{key}", 0.0) - before.get(
            f"wa_router_park_wait_seconds_count{key}", 0.0)  # fmt: skip
        total = after.get(f"wa_router_park_wait_seconds_sum{key}", 0.0) - before.get(
            f"wa_router_park_wait_seconds_sum{key}", 0.0)  # fmt: skip
        o.park_wait_mean[k] = total / n if n else None
    return o


# -- the report ------------------------------------------------------------------------------


def _groups(outcomes: Sequence[RestartOutcome]) -> dict[RestartScenario, list[RestartOutcome]]:
    groups: dict[RestartScenario, list[RestartOutcome]] = {}
    for o in outcomes:
        groups.setdefault(o.scenario, []).append(o)
    return groups


def _col(g: Sequence[RestartOutcome], get: Callable[[RestartOutcome], float | None],
         digits: int = 1) -> str:  # fmt: skip
    return h.spread([get(o) for o in g], digits)


def method(rp: RestartPlan, cores: h.Cores) -> str:
    per = rp.sessions / rp.rate
    one = next((s.gap_s for s in rp.scenarios if s.kind == "restart-one"), None)
    every = next((s.gap_s for s in rp.scenarios if s.kind == "restart-all"), None)
    return f"""\
- Per run: a `SimLaravel` (Blazz's Laravel side: account table, `accounts/active`, HMAC \
check), 4 simulated instances whose `LARAVEL_URL` is the router (webhooks and \
`accounts/active` go through it; the router's `webhooks.laravel_url` is the SimLaravel), one \
shared `SessionFolder` (saved logins; the older copy of a session drops with CONFLICT \
{rp.conflict_delay_s:g} s after a newer one connected), connect {rp.connect_delay_s:g} s, \
`authenticated` -> `connected` {rp.ready_delay_s:g} s (sends answer 400 *Session not \
connected* meanwhile), restore step {rp.restore_step_s:g} s; a fresh router subprocess (memory \
store, health checks every 2 s, every 0.5 s while down, parking on, max wait 20 s; log level \
warning). The sims start empty (their start-up restore finds no account), then \
{rp.sessions} sessions are added round-robin, each an account in Laravel and a \
`session_ready` relayed through the router; the run starts once Laravel and the router's \
directory have them all.
- Pinning: {cores.describe()}.
- Load: open loop, {rp.rate:g} `POST /api/messages/send` per second, each for a random \
session (one send per session every {per:.1f} s on average), due times fixed in advance, \
latency from when due; client timeout 30 s (Laravel's for a send). It runs {rp.steady_s:g} s \
before the kill (plus a random fraction of a send interval, so that the kill does not fall \
on a due time) and until {rp.tail_s:g} s after the pool has settled (every instance running, \
no restore or login under way, every session connected on exactly one instance; checked every \
50 ms), and on until every session has been answered 200 for a send due after that (so \
that each was asked for on its last copy), at most {rp.max_s:g} s.
- **restart-one**: node-2 is killed (`SimInstance.stop()`: listener closed, connections \
aborted, its sessions gone) and started again {_gap(one)} later; **restart-all**: the 4 are \
killed one after the other (no wait between them) and started again {_gap(every)} after the \
first kill. A started instance asks Laravel for the active accounts and restores every one \
(sessions live elsewhere included), one every {rp.restore_step_s:g} s, each logging in from \
the folder: `session_authenticated`, then `session_ready`; the last `session_ready` wins.
- Timestamps: every `session_ready` / `session_disconnected` a sim queues is timestamped in \
the bench process at the moment the sim changes the session's status (`notify`/`emit` \
wrapped), kills at the call. A session is *connected nowhere* from the moment its last \
connected copy went (killed or dropped) to the next `session_ready` anywhere (its *return*). \
Which instance answered a 200: the last one the send reached (the sims record arrivals, by \
`X-Bench-Id`).
- Runs: {rp.repeats} per scenario, interleaved with the crash scenarios; tables give the \
median over runs (min-max)."""


def _gap(gap: float | None) -> str:
    return "-" if gap is None else f"{gap:g} s"


def _parked(outcome: str) -> Callable[[RestartOutcome], float | None]:
    return lambda o: o.parked.get(outcome, 0.0)


def tables(groups: dict[RestartScenario, list[RestartOutcome]]) -> list[str]:
    out = ["### Restarts: sends (per run; median (min-max))", ""]
    rows = [[s.label, _col(g, lambda o: o.sends, 0), _col(g, lambda o: o.rate, 0),
             _col(g, lambda o: o.duration_s), _col(g, lambda o: o.failed, 0),
             _col(g, lambda o: o.in_flight_failed, 0), _col(g, lambda o: o.router_cpu_s, 2)]
            for s, g in groups.items()]  # fmt: skip
    head = ["scenario", "sends", "per s", "load ran (s)", "failed (target 0)",
            "of which in flight at a kill", "router CPU (s)"]  # fmt: skip
    out += [c.md_table(head, rows), ""]
    out += ["### Restarts: failed sends by cause (sum over the runs of a scenario)", ""]
    rows = []
    for s, g in groups.items():
        total: Counter[tuple[str, bool]] = Counter()
        for o in g:
            total.update(o.causes)
        for (cause, flying), n in sorted(total.items()):
            rows.append([s.label, f"`{cause}`", "yes" if flying else "no", str(n)])
    out += [c.md_table(["scenario", "cause (HTTP status and `error`, or client exception)",
                        "in flight at a kill", "sends"], rows)
            if rows else "No failed send.", ""]  # fmt: skip
    out += ["### Restarts: parked sends (per run; median (min-max))", ""]
    rows = [[s.label, *(_col(g, _parked(k), 0) for k in PARK_OUTCOMES),
             _col(g, lambda o: _ms(o.park_wait_mean.get("woken")), 0),
             _col(g, lambda o: o.waited[0], 0), _col(g, lambda o: _ms(o.waited[1]), 0),
             _col(g, lambda o: _ms(o.waited[2]), 0), _col(g, lambda o: _ms(o.waited[3]), 0),
             _col(g, lambda o: o.waited_failed, 0)]
            for s, g in groups.items()]  # fmt: skip
    head = ["scenario", "router: woken", "timeout", "full", "shutdown",
            "router: mean wait of the woken (ms)",
            "client: sends in flight while their session was connected nowhere",
            "their latency p50 (ms)", "p99", "max", "of them failed"]  # fmt: skip
    out += [c.md_table(head, rows), ""]
    out += ["### Restarts: sessions coming back (ms unless said; median over runs (min-max))",
            ""]  # fmt: skip
    rows = [[s.label, _col(g, lambda o: o.down_sessions, 0),
             _col(g, lambda o: o.down_for[1], 2), _col(g, lambda o: o.down_for[3], 2),
             _col(g, lambda o: o.never_back, 0), _col(g, lambda o: o.at_return[0], 0),
             _col(g, lambda o: _ms(o.at_return[1])), _col(g, lambda o: _ms(o.at_return[2])),
             _col(g, lambda o: _ms(o.at_return[3])), _col(g, lambda o: o.at_return_failed, 0)]
            for s, g in groups.items()]  # fmt: skip
    head = ["scenario", "sessions connected nowhere for a while", "for p50 (s)", "max (s)",
            "never back", "sends waiting at their session's return", "return -> answer p50",
            "p99 (target <= 100)", "max", "of them failed"]  # fmt: skip
    out += [c.md_table(head, rows), ""]
    out += ["### Restarts: from `connected` on the final instance to the first send served "
            "there (ms; median over runs (min-max))", ""]  # fmt: skip
    rows = [[s.label, _col(g, lambda o: o.first_served[0], 0), _col(g, lambda o: o.moved, 0),
             _col(g, lambda o: _ms(o.first_served[1]), 0),
             _col(g, lambda o: _ms(o.first_served[2]), 0),
             _col(g, lambda o: _ms(o.first_served[3]), 0), _col(g, lambda o: o.unserved, 0),
             _col(g, lambda o: o.at_final[0], 0), _col(g, lambda o: _ms(o.at_final[1])),
             _col(g, lambda o: _ms(o.at_final[2])), _col(g, lambda o: _ms(o.at_final[3]))]
            for s, g in groups.items()]  # fmt: skip
    head = ["scenario", "sessions connected again after the kill",
            "of them on another instance than before", "connected -> first 200 there p50",
            "p99", "max", "no 200 there by the end", "sends waiting when it connected there",
            "connected -> their answer p50", "p99", "max"]  # fmt: skip
    out += [c.md_table(head, rows), ""]
    out += ["### Restarts: the pool's own timeline (median over runs (min-max))", ""]
    rows = [[s.label, _col(g, lambda o: o.restored, 0), _col(g, lambda o: o.restore_s, 2),
             _col(g, lambda o: o.settle_s, 2), _col(g, lambda o: o.old_copy_200s, 0),
             _col(g, lambda o: o.heard_other_last, 0)]
            for s, g in groups.items()]  # fmt: skip
    head = ["scenario", "accounts restored", "restore loop (s)", "settled after the kill (s)",
            "200s from an older copy after the final one connected",
            "sessions whose last `session_ready` relayed came from an older copy"]  # fmt: skip
    out += [c.md_table(head, rows), ""]
    return out


def targets(groups: dict[RestartScenario, list[RestartOutcome]]) -> list[str]:
    rows = []
    for s, g in groups.items():
        failed = c.median([o.failed for o in g]) or 0.0
        worst = max(o.failed for o in g)
        verdict = ("met" if failed == 0 and worst == 0 else
                   f"**missed** by {failed:g} sends per run (median; worst {worst})")  # fmt: skip
        rows.append([s.label, "0 failed sends", f"{failed:g} (max {worst})", verdict])
        p99s = [o.at_return[2] for o in g if o.at_return[2] is not None]
        p99 = c.median(p99s)
        if p99 is None:
            rows.append([s.label, "waiting sends answered <= 0.1 s after their session's "
                         "return (p99)", "no send waited", "-"])  # fmt: skip
            continue
        verdict = ("**missed**: a send waiting at its session's return had no answer by the "
                   "end" if math.isinf(p99) else c.verdict(p99, TARGET_WAIT_S, "s"))  # fmt: skip
        rows.append(
            [
                s.label,
                "waiting sends answered <= 0.1 s after their session's return (p99)",
                f"{p99:.3f} s (max over runs {max(p99s):.3f} s)",
                verdict,
            ]
        )
    return [c.md_table(["scenario", "target", "measured (median of runs)", "verdict"], rows)]


def notes(rp: RestartPlan, groups: dict[RestartScenario, list[RestartOutcome]]) -> list[str]:
    out = []
    for s, g in groups.items():
        if any(o.failed for o in g):
            logs = [str(o.log_copy.relative_to(c.REPO)) for o in g if o.log_copy is not None]
            each = "; ".join(f for o in g for f in o.failures[:5])
            out.append(f"- {s.label}: failed sends in {sum(1 for o in g if o.failed)} of {len(g)} "
                       f"runs (times in ms from the first kill): {each}. Router logs of those "
                       f"runs: {', '.join(f'`{p}`' for p in logs) or '(not kept)'}.")  # fmt: skip
        if any(o.deleted_logins for o in g):
            out.append(f"- {s.label}: **a DELETE reached an instance that did not hold the "
                       f"session** (it erases the owner's saved login): "
                       f"{sum(o.deleted_logins for o in g)} over {len(g)} runs.")  # fmt: skip
        if not all(o.settled for o in g):
            out.append(f"- {s.label}: the pool did not settle within {rp.max_s:g} s in "
                       f"{sum(1 for o in g if not o.settled)} run(s).")  # fmt: skip
    out += [
        "- The real pool moves sessions on a restart: the restarted instance restores every "
        "active account, and its `session_ready` is the newest, so after **restart-one** the "
        "sessions live on the other three end up on node-2 as well (*of them on another "
        "instance than before*); the router has to follow each newest `session_ready` while "
        "the older copy still answers, then the CONFLICT drop. After **restart-all** each "
        "session connects on all 4 within milliseconds and the last one wins: a send woken by "
        "the first `session_ready` goes to a copy that drops "
        f"{rp.conflict_delay_s:g} s later.",
        "- *Sends in flight while their session was connected nowhere* are the ones the "
        "router parked (or should have); their latency counts from when they were due, so "
        "it is mostly the outage itself (gap + restore position + login). *Return -> answer* "
        "is the router's part: from the `session_ready` that ended the outage to the answer.",
        f"- *Connected -> first 200 there* includes waiting for the load to ask for that "
        f"session at all (one send per session every {rp.sessions / rp.rate:.1f} s on "
        "average, random): it measures the load more than the router, and a send answered "
        "by the older copy in the meantime is not a failure (*200s from an older copy*: both "
        "copies are connected until the CONFLICT drop).",
        "- *In flight at a kill*: the send had reached the instance when it was killed; a "
        "POST there may have been processed, so the router answers it `502 "
        'upstream_unreachable` with `"retried": false` and never re-sends it. Against real '
        "Node instances (sends take seconds through WhatsApp) there are more of these.",
        "- Parking counts and the mean wait are the router's own (`wa_router_parked_total`, "
        "`wa_router_park_wait_seconds`); the percentiles are client-side.",
    ]
    return out


def render(rp: RestartPlan, cores: h.Cores, outcomes: Sequence[RestartOutcome]) -> str:
    groups = _groups(outcomes)
    out = ["### Restarts with the real-pool simulator: method", "", method(rp, cores), ""]
    out += tables(groups)
    out += ["### Restarts: targets (reported, not asserted)", "", *targets(groups), ""]
    out += ["### Restarts: notes", "", *notes(rp, groups), ""]
    return "\n".join(out)
