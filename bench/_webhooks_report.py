"""Webhooks: the Markdown report of `bench.webhooks`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import _harness as h
from . import common as c

if TYPE_CHECKING:
    from .webhooks import IntakeRun, OutageRun, Plan, Results

ROUTER_DEFAULTS = (
    "relay_timeout_s 10, inflight_s 60, backlog_max_items 100,000, shards 16, claim_after_s 20"
)


def pct(values: Sequence[float], q: float, digits: int = 1) -> str:
    return c.fmt(h.percentile(values, q), digits)


def crossing_ceiling(base_s: float, max_s: float, horizon_s: float) -> tuple[float, float]:
    """A session failing from time 0: attempt n waits between half and all of
    min(max, base * 2^(n-1)) (`delivery.backoff_s`). The (least, greatest) ceiling of the
    wait that spans `horizon_s`: its next attempt comes up to that long after it."""

    def ceiling(n: int) -> float:
        return min(max_s, base_s * 2.0 ** (n - 1))

    def spanning(share: float) -> int:
        t, n = 0.0, 1
        while t + share * ceiling(n) <= horizon_s:
            t, n = t + share * ceiling(n), n + 1
        return n

    return ceiling(spanning(1.0)), ceiling(spanning(0.5))


def method(plan: Plan, cores: h.Cores, res: Results) -> list[str]:
    m = res.machine
    redis = res.redis_version.split(" sha=")[0] or "redis-server"
    smoke_leases = (
        f" (smoke only: relay_timeout_s {plan.relay_timeout_s:g}, claim_after_s "
        f"{plan.claim_after_s:g}, so two routers split the shards within a second)"
        if plan.claim_after_s is not None
        else ""
    )
    return [
        f"""\
- Machine: {m.get("CPU", "?")}, {m.get("cores", "?")}; {m.get("kernel", "?")}; busy \
processes at start (not the bench): {m.get("busy processes at start (not the bench)", "?")}.
- Pinning: {cores.describe("the router subprocess(es) and redis-server")}.
- Routers: a fresh `python -m wa_router.cli serve` (uvloop, log level warning) per run, \
with a fresh `state.dir` (a temp dir on the root filesystem, where SQLite's fsyncs go) and, \
for Redis, a fresh `store.key_prefix`; ready and warm before the load (its start-up sync \
learned every session from the one simulated instance, so each webhook finds its session's \
owner in the directory cache). `webhooks: {{secrets: [...], laravel_url: <stand-in>, \
retry_base_s: {plan.retry_base_s:g}, retry_max_s: <row>}}`, everything else the defaults \
({ROUTER_DEFAULTS}){smoke_leases}.
- **sqlite**: memory store, `webhooks.backlog: auto` = the SQLite backlog (WAL, \
synchronous=FULL; the replay and retry memory in the same file). With Laravel up the intake \
relays before it answers Node (the backlog only when the relay fails or the session has \
items waiting). **redis**: `store.kind: redis` on a redis-server of the bench's own \
({redis}, a free loopback port, `--save '' --appendonly no`: nothing of it reaches the \
disk), `auto` = the Redis Stream backlog: every event is XADDed and answered \
`202 queued`, and the shards' holders relay it.
- Laravel stand-in: an aiohttp app in the bench's loop on the webhook path; it verifies \
each relay's HMAC as `VerifyWhatsAppHmac` does (300 s window), answers 200 \
`{{"status":"success"}}` while up and 503 while down, and keeps the first arrival \
(`perf_counter`) of each event, the X-Webhook-Ids seen and each session's order.
- Webhooks: distinct `message_received` bodies (compact JSON, ~400 B, the event's session \
and a per-session sequence number in `data`), each signed when sent (X-Timestamp now, \
X-HMAC-Signature) naming the simulated instance in `X-Instance-Url: http://localhost:PORT`; \
one keep-alive connection per poster.
- **Intake**: {plan.posters} posters in a closed loop over {plan.sessions} sessions, each \
poster its own {plan.sessions // plan.posters}-{-(-plan.sessions // plan.posters)} \
sessions in turn (so one session's events go one after another, as Node sends them); \
{plan.warm_s:g} s warm-up, then {plan.duration_s:g} s measured, retry_max_s \
{plan.retry_max[0]:g}; {plan.repeats} run(s) per row, rows interleaved (the order rotates), \
median (min-max) over runs. events/s = answers \
completed in the window / its length; intake latency = request written -> answer read, at \
the poster; delivery lag = request written -> its first arrival at the stand-in (one \
process, one clock); after the window the run waits until every accepted event has \
arrived. CPU per event: utime + stime of the router process(es) and of redis-server over \
the window, divided by the events; router core busy = the same CPU over the window's \
length; bench CPU = the bench process's CPU time over the \
window (posters, stand-in and simulated instance share one core: near 100 % it, not the \
router, was the limit).
- **Outage**: Laravel down (503) from the start; an open loop of {plan.outage_rate:g} \
events/s over {plan.outage_sessions} sessions (event k due at k / rate, sessions in turn; \
a session's event waits for its previous answer) for {plan.outage_s:g} s; the load stops, \
then the stand-in answers 200 again (**Laravel back**). *All delivered* = from Laravel's \
return to the first arrival of the last queued event; *wait after return* = the same per \
event. Then {0.5 if plan.smoke else 2:g} s more for late duplicates. With 2 routers both \
share one Redis and key prefix, a session's events alternate between them, and the 16 \
shard leases are split 8/8 before the load starts. Duplicates = a delivery whose \
X-Webhook-Id was delivered before; order violation = an event arriving after a later event \
of its session had arrived; lost = accepted (202) but never arrived within \
2 x retry_max_s + {plan.drain_timeout_s:g} s. One run per row.""",
        "",
    ]


def intake_table(res: Results) -> list[str]:
    rows = []
    for backlog in ("sqlite", "redis"):
        for up in (True, False):
            runs = [r for r in res.intake if r.setup.backlog == backlog and r.laravel_up == up]
            if not runs:
                continue
            answers: Counter[str] = Counter()
            for r in runs:
                answers.update(r.answers)

            def per_event(cpu: Sequence[float], runs: list[IntakeRun] = runs) -> str:
                return h.spread([1e6 * s / r.events for s, r in zip(cpu, runs, strict=True)
                                 if r.events], 0)  # fmt: skip

            lag50 = [h.percentile(r.lag_ms, 50) for r in runs] if up else []
            lag99 = [h.percentile(r.lag_ms, 99) for r in runs] if up else []
            lost = sum(r.lost for r in runs)
            rows.append([
                f"**{backlog}**", "up (200)" if up else "down (503)",
                h.spread([r.rate for r in runs], 0),
                h.spread([h.percentile(r.latency_ms, 50) for r in runs], 1),
                h.spread([h.percentile(r.latency_ms, 99) for r in runs], 1),
                h.spread(lag50, 1) if up else "-", h.spread(lag99, 1) if up else "-",
                per_event([r.router_cpu_s for r in runs]),
                per_event([r.redis_cpu_s for r in runs]) if backlog == "redis" else "-",
                h.spread([r.core_busy for r in runs], 0),
                h.spread([100 * r.bench_cpu_s / r.duration_s for r in runs], 0),
                "; ".join(f"{k}: {v:,}" for k, v in answers.most_common())
                + (f"; **lost {lost}**" if lost else ""),
            ])  # fmt: skip
    head = ["backlog", "Laravel", "events/s", "intake p50 ms", "intake p99 ms",
            "delivery lag p50 ms", "delivery lag p99 ms", "router CPU µs/event",
            "redis CPU µs/event", "router core busy %", "bench CPU %",
            "answers (all runs)"]  # fmt: skip
    return [c.md_table(head, rows), ""]


def outage_table(res: Results) -> list[str]:
    rows = []
    for o in res.outage:
        drain = "**never**" if o.drain_s is None else f"**{o.drain_s:.2f}**"
        first = "never" if o.first_s is None else f"{o.first_s:.2f}"
        holders = "/".join(map(str, o.holders_at_return)) if o.holders_at_return else "-"
        rows.append([
            f"{o.setup.backlog}", str(o.setup.routers), f"{o.retry_max_s:g}",
            f"{o.sent:,} ({o.queued:,})",
            f"{pct(o.intake_ms, 50)} / {pct(o.intake_ms, 99)}",
            f"{o.refused:,}", "-" if o.backlog_at_return is None else f"{o.backlog_at_return:,}",
            holders, first, drain,
            f"{pct(o.waits_s, 50, 2)} / {pct(o.waits_s, 99, 2)}",
            str(o.dup_ids), str(o.dup_other_id), str(o.order_violations), str(o.lost),
        ])  # fmt: skip
    head = ["backlog", "routers", "retry_max_s", "events (queued)", "intake p50 / p99 ms",
            "503s during the outage", "backlog at return", "shards held per router",
            "Laravel back -> first delivered s", "Laravel back -> all delivered s",
            "wait after return p50 / p99 s",
            "duplicates (same X-Webhook-Id)", "same event, another id", "order violations",
            "lost"]  # fmt: skip
    return [c.md_table(head, rows), ""]


def warnings_list(res: Results) -> list[str]:
    lines = []
    for r in res.intake:
        if r.warnings:
            what = ", ".join(f"`{k}` {v:,}" for k, v in r.warnings.most_common(4))
            lines.append(f"intake {r.setup.backlog} Laravel {'up' if r.laravel_up else 'down'} "
                         f"run {r.rep + 1}: {what}")  # fmt: skip
    for o in res.outage:
        if o.warnings:
            what = ", ".join(f"`{k}` {v:,}" for k, v in o.warnings.most_common(4))
            lines.append(f"outage {o.setup.label}, retry_max_s {o.retry_max_s:g}: {what}")
    return lines


def notes(plan: Plan, res: Results) -> list[str]:
    out: list[str] = []

    def med(backlog: str, up: bool, what: str) -> float | None:
        runs = [r for r in res.intake if r.setup.backlog == backlog and r.laravel_up == up]
        if what == "rate":
            return c.median([r.rate for r in runs])
        if what == "bench":
            return c.median([100 * r.bench_cpu_s / r.duration_s for r in runs])
        q = 50 if what.endswith("50") else 99
        values = [r.latency_ms if what.startswith("in") else r.lag_ms for r in runs]
        found = [p for v in values if (p := h.percentile(v, q)) is not None]
        return c.median(found)

    busiest = max((med(b, u, "bench") or 0.0 for b in ("sqlite", "redis") for u in (True, False)),
                  default=0.0)  # fmt: skip
    if res.intake:
        out.append(
            f"- The bench process (posters, stand-in, simulated instance) used up to "
            f"{busiest:.0f} % of its core: "
            + ("close to saturation, so the highest rates above are partly the load "
               "generator's limit, not only the router's." if busiest >= 85 else
               "below saturation: the rates are the router's (and its backlog's).")
        )  # fmt: skip
    if res.intake:
        busy = c.median([r.core_busy for r in res.intake]) or 0.0
        row = [
            r
            for r in res.intake
            if (r.setup, r.laravel_up) == (res.intake[0].setup, res.intake[0].laravel_up)
        ]
        first = sorted(row, key=lambda r: r.rate)[len(row) // 2]  # the row's median run
        out.append(
            f"- The router's core was {busy:.0f} % busy (median over all intake runs: routers "
            f"+ redis-server): the closed loop keeps {plan.posters} requests in flight, so the "
            f"intake latency there is mostly waiting in line, about posters / rate (Little's "
            f"law; e.g. {plan.posters} / {first.rate:,.0f} events/s = "
            f"{1000 * plan.posters / max(first.rate, 1e-9):.1f} ms for {first.setup.backlog}, "
            f"Laravel {'up' if first.laravel_up else 'down'}, run {first.rep + 1}). The outage "
            f"rows, at {plan.outage_rate:g} events/s, show the intake latency of a router with "
            f"room to spare."
        )
    if res.commit_us is not None:
        wall, cpu = res.commit_us
        out.append(
            f"- One single-row WAL commit with synchronous=FULL in the state dir's filesystem "
            f"costs {wall:.0f} µs ({cpu:.0f} µs of it CPU; measured before the runs). The "
            f"SQLite configuration commits twice per webhook even with Laravel up (the replay "
            f"and retry memory, `seen`), three times when it is queued (the append), all on "
            f"the backlog's one worker thread."
        )
    s_up, r_up = med("sqlite", True, "rate"), med("redis", True, "rate")
    if s_up and r_up:
        out.append(
            f"- Laravel up: the SQLite configuration answers Node only after Laravel has "
            f"answered (the relay is inside the intake, {c.fmt(med('sqlite', True, 'in50'), 1)}"
            f" ms p50), and a session's event is held by its lock until then; the Redis Stream "
            f"configuration answers `202 queued` after the XADD "
            f"({c.fmt(med('redis', True, 'in50'), 1)} ms p50) and relays from the stream: "
            f"delivery lag p50 {c.fmt(med('redis', True, 'lag50'), 1)} ms against "
            f"{c.fmt(med('sqlite', True, 'lag50'), 1)} ms. Throughput "
            f"{r_up:,.0f} against {s_up:,.0f} events/s."
        )
    s_dn, r_dn = med("sqlite", False, "rate"), med("redis", False, "rate")
    if s_dn and r_dn:
        out.append(
            f"- Laravel down, every event queued: SQLite {s_dn:,.0f} events/s (each append is "
            f"its own transaction, fsynced: synchronous=FULL, plus the replay memory's two "
            f"writes to the same file), Redis {r_dn:,.0f} events/s (an in-memory XADD script "
            f"here: this redis-server persists nothing, so the Redis rows buy their speed "
            f"with durability the SQLite rows pay for; with `appendonly yes` and "
            f"`appendfsync everysec` an acknowledged event can still be lost in the last "
            f"second of a crash). The routers keep retrying the heads of the sessions "
            f"meanwhile (the 503s), which costs CPU of the same core."
        )
    caps = sorted({o.retry_max_s for o in res.outage})
    if res.outage:
        by_cap = []
        for cap in caps:
            lo, hi = crossing_ceiling(plan.retry_base_s, cap, plan.outage_s)
            rows = [o for o in res.outage if o.retry_max_s == cap and o.drain_s is not None]
            if not rows:
                continue
            firsts = [o.first_s or 0.0 for o in rows]
            rests = [(o.drain_s or 0.0) - (o.first_s or 0.0) for o in rows]
            spans = f"{lo:g} s" if lo == hi else f"{lo:g}-{hi:g} s"
            text = (f"retry_max_s {cap:g} (ceiling of the wait under way at the return: "
                    f"{spans}): the first event got through {min(firsts):.1f}-"
                    f"{max(firsts):.1f} s after the return, the last {min(rests):.1f}-"
                    f"{max(rests):.1f} s after that")  # fmt: skip
            if max(rests) < max(1.5, lo / 4):
                text += ", so the first delivery woke the sessions still backing off"
            else:
                text += ": the sessions waited out their own backoff"
            by_cap.append(text)
        spread_s = plan.outage_sessions / plan.outage_rate
        out.append(
            "- After the outage: attempt n of a session waits between half and all of "
            f"min(retry_max_s, {plan.retry_base_s:g} s x 2^(n-1)) (`delivery.backoff_s`). "
            f"Every session started failing within the outage's first {spread_s:g} s, so "
            "their schedules run nearly in phase; when the first event gets through after "
            "the return is the earliest of the sessions' next tries, which chance decides "
            "(one run per row: another run can land anywhere up to about the ceiling). "
            + "; ".join(by_cap)
            + ". Once a session's head gets through, the rest of its queue follows at once."
        )
    if res.outage:
        late = max((max(o.behind_ms, default=0.0) for o in res.outage), default=0.0)
        out.append(
            f"- The outage load kept its schedule: the latest event left {late:,.1f} ms after "
            f"it was due (a session's event waits for the answer to its previous one)."
        )
    dups = sum(o.dup_ids + o.dup_other_id for o in res.outage)
    viol = sum(o.order_violations for o in res.outage) + sum(r.order_violations
                                                             for r in res.intake)  # fmt: skip
    lost = sum(o.lost for o in res.outage) + sum(r.lost for r in res.intake)
    bad_sig = sum(o.bad_signature for o in res.outage)
    out.append(
        f"- Over all runs: {dups} duplicate deliveries after the outages, {viol} order "
        f"violations, {lost} lost events, {bad_sig} relays failing the stand-in's signature "
        f"check."
    )
    for backlog in ("sqlite", "redis"):
        exits = [e for b, e in res.exits if b == backlog]
        if not exits:
            continue
        killed = sum(e.killed for e in exits)
        slow = (f"**{killed} of {len(exits)} did not exit within {plan.stop_grace_s:g} s** and "
                f"were killed" if killed else "all exited by themselves")  # fmt: skip
        out.append(
            f"- SIGTERM -> exit of the {backlog} routers at the end of each run (the bench's "
            f"grace {plan.stop_grace_s:g} s, then SIGKILL): "
            f"{h.spread([e.seconds for e in exits], 2)} s (median (min-max)); {slow}."
        )
    warned = warnings_list(res)
    if warned:
        out.append("- Router log lines at warning and above (event: count): " + "; ".join(warned)
                   + ".")  # fmt: skip
    out += [f"- {n}" for n in res.notes]
    return out


def render(plan: Plan, cores: h.Cores, res: Results, head: list[str]) -> str:
    out = list(head)
    start, end = res.code
    if res.at:
        out += [f"The routers ran `wa_router/` of commit **{res.at}** (`--at`: exported with "
                f"`git archive`, so edits to the working tree during the run do not reach "
                f"them; the version line above describes the working tree).", ""]  # fmt: skip
    elif start != end:
        out += [f"> **The router code changed during this run** (wa_router/ at {start} at the "
                f"start, {end} at the end; every run starts fresh router processes): the rows "
                f"may come from different code. Run it again on a quiet tree.", ""]  # fmt: skip
    elif start:
        out += [f"Router code (HEAD and a digest of wa_router/'s uncommitted files): {start}, "
                f"unchanged during the run.", ""]  # fmt: skip
    out += ["### Method", "", *method(plan, cores, res)]
    out += [
        f"### Intake: {plan.posters} posters, {plan.sessions} sessions, {plan.duration_s:g} s "
        f"per run (median (min-max) over {plan.repeats} run{'s' if plan.repeats > 1 else ''})",
        "",
        *intake_table(res),
    ]
    out += [
        f"### After a Laravel outage of {plan.outage_s:g} s ({plan.outage_rate:g} events/s "
        f"over {plan.outage_sessions} sessions; one run per row)",
        "",
        *outage_table(res),
    ]
    out += ["### Notes", "", *notes(plan, res), ""]
    return "\n".join(out)


__all__ = ["OutageRun", "render"]
