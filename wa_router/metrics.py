"""Prometheus metrics at `/metrics`, from a registry of the router's own.

A Node instance is the label `upstream`: Prometheus adds `instance` (the scraped target,
the router itself) to every series, and a label of that name would become
`exported_instance`.

The hot path only bumps plain counters in the parts' `stats` objects (a dict increment);
they are turned into Prometheus families when scraped (a custom collector), so counting a
request costs no label lookup. The one histogram (upstream latency) keeps one child per
instance, looked up once.
"""

from __future__ import annotations

import importlib.metadata
import platform
from bisect import bisect_left
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .bearer import bearer_token, token_matches
from .errors import RequestRejected
from .httpio import json_error
from .parking import ABANDONED, FULL, SHUTDOWN, TIMEOUT, WOKEN
from .pool import State
from .views import RouterView

try:
    _VERSION = importlib.metadata.version("wa-router")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
    _VERSION = "unknown"

# Loopback to Node answers in ~1 ms; sends through WhatsApp take seconds.
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


# A restore takes seconds; the wait is bounded by parking.max_wait_s (20 s by default).
PARK_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)


class RouterCollector(Collector):
    def __init__(self, view: RouterView) -> None:
        self._view = view
        # Filled by Metrics.refresh() before each scrape: these need the (async) store.
        self.sessions: dict[str, int] = {}
        self.backlog: int | None = None
        self.scrape: object = None  # the request being answered (it is in flight too)

    def collect(self) -> Iterator[Metric]:
        v = self._view
        build = GaugeMetricFamily(
            "wa_router_build_info", "Always 1: the version running", labels=["version", "python"]
        )
        build.add_metric([_VERSION, platform.python_version()], 1.0)
        yield build
        me = 1 if self.scrape in v.inflight else 0  # not counting the scrape itself
        yield _gauge(
            "wa_router_requests_in_flight",
            "Requests being handled now (waiting ones included)",
            len(v.inflight) - me,
        )
        requests = CounterMetricFamily(
            "wa_router_requests",
            "Caller requests by route kind, instance and status class",
            labels=["route_kind", "upstream", "status_class"],
        )
        for (kind, inst, cls), n in sorted(v.proxy.outcomes.items()):
            requests.add_metric([kind, inst, cls], n)
        yield requests

        d = v.directory
        lookups = CounterMetricFamily(
            "wa_router_directory_lookups",
            "Directory lookups by tier and result",
            labels=["tier", "result"],
        )
        lookups.add_metric(["cache", "hit"], d.cache_hits)
        lookups.add_metric(["store", "hit"], d.store_hits)
        lookups.add_metric(["store", "miss"], d.misses)
        yield lookups
        stale = CounterMetricFamily(
            "wa_router_directory_stale_observations",
            "Observations refused because a newer one was stored",
        )
        stale.add_metric([], d.stale_writes)
        yield stale

        s = v.discovery
        redisc = CounterMetricFamily(
            "wa_router_rediscoveries", "Rediscoveries by outcome", labels=["outcome"]
        )
        redisc.add_metric(["found"], s.found)
        redisc.add_metric(["not_found"], s.not_found)
        redisc.add_metric(["negative_cache"], s.negative_hits)
        yield redisc
        probes = CounterMetricFamily("wa_router_discovery_probes", "Status probes sent")
        probes.add_metric([], s.probes)
        yield probes

        retries = CounterMetricFamily(
            "wa_router_retries", "Requests sent a second time, by outcome", labels=["outcome"]
        )
        for outcome in ("answered", "failed"):
            retries.add_metric([outcome], v.proxy.retry_outcomes.get(outcome, 0))
        yield retries
        express = CounterMetricFamily(
            "wa_router_express_requests",
            "Proxied requests sent on the lean front's express lane, by what became of them: "
            "relayed (answered there), handed_over (to the full path: a not-here answer, an "
            "error, a timeout, a large or streamed body)",
            labels=["outcome"],
        )
        for outcome in ("relayed", "handed_over"):
            express.add_metric([outcome], v.proxy.express.get(outcome, 0))
        yield express
        dropped = CounterMetricFamily(
            "wa_router_requests_dropped",
            "Requests taken no further because their caller had gone, by where: caller_gone "
            "(a send not made, or not made elsewhere), caller_gone_while_waiting (its wait for "
            "the session ended)",
            labels=["reason"],
        )
        for reason in ("caller_gone", "caller_gone_while_waiting"):
            dropped.add_metric([reason], v.proxy.dropped.get(reason, 0))
        yield dropped
        placements = CounterMetricFamily(
            "wa_router_placements", "New sessions placed on an instance"
        )
        placements.add_metric([], v.placements())
        yield placements

        up = GaugeMetricFamily(
            "wa_router_instance_up", "1 when the instance is healthy, else 0", labels=["upstream"]
        )
        state = GaugeMetricFamily(
            "wa_router_instance_state",
            "The instance's state (1 for the current one)",
            labels=["upstream", "state"],
        )
        draining = GaugeMetricFamily(
            "wa_router_instance_draining",
            "1 while the instance takes no new sessions",
            labels=["upstream"],
        )
        sessions = GaugeMetricFamily(
            "wa_router_instance_sessions",
            "Sessions the directory places on the instance",
            labels=["upstream"],
        )
        for member in v.pool.instances:
            name, current = member.name, member.state
            up.add_metric([name], 1.0 if current is State.HEALTHY else 0.0)
            for st in State:
                state.add_metric([name, st.value], 1.0 if current is st else 0.0)
            draining.add_metric([name], 1.0 if member.draining else 0.0)
            sessions.add_metric([name], float(self.sessions.get(name, 0)))
        yield from (up, state, draining, sessions)

        w = v.webhooks
        hooks = CounterMetricFamily(
            "wa_router_webhooks", "Webhooks by event and result", labels=["event", "result"]
        )
        for (event, result), n in sorted(w.events.items()):
            hooks.add_metric([event, result], n)
        yield hooks
        if self.backlog is not None:
            yield _gauge(
                "wa_router_webhook_backlog",
                "Webhooks waiting to be relayed to Laravel",
                self.backlog,
            )
        delivery = v.delivery()
        if delivery is not None:
            later = CounterMetricFamily(
                "wa_router_webhook_deliveries",
                "Backlog delivery attempts by outcome",
                labels=["outcome"],
            )
            later.add_metric(["delivered"], delivery.delivered)
            later.add_metric(["failed"], delivery.failed)
            later.add_metric(["refused"], delivery.refused)
            yield later
            limit = CounterMetricFamily(
                "wa_router_laravel_limit",
                "Laravel's webhook limiter: its 429s (throttled), and times a send was held "
                "back to stay under it (held_back: a waiting webhook counts at every try)",
                labels=["event"],
            )
            limit.add_metric(["throttled"], delivery.throttled)
            limit.add_metric(["held_back"], delivery.held_back)
            yield limit
            if delivery.shards_held is not None:
                yield _gauge(
                    "wa_router_webhook_shards_held",
                    "Webhook stream shards this router delivers now (Redis backlog)",
                    delivery.shards_held,
                )
            if delivery.spooled is not None:
                yield _gauge(
                    "wa_router_webhook_spooled",
                    "Webhooks kept in the local spool until Redis answers again",
                    delivery.spooled,
                )

        yield _gauge(
            "wa_router_parked_requests",
            "Requests waiting now for their session to be back",
            v.parked(),
        )
        left = CounterMetricFamily(
            "wa_router_parked",
            "Requests that waited for their session, by how the wait ended",
            labels=["outcome"],
        )
        for outcome in (WOKEN, TIMEOUT, FULL, SHUTDOWN, ABANDONED):
            left.add_metric([outcome], v.parking.outcomes.get(outcome, 0))
        yield left
        unavailable = CounterMetricFamily(
            "wa_router_session_unavailable",
            "503 session_unavailable answers, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(v.proxy.unavailable.items()):
            unavailable.add_metric([reason], n)
        yield unavailable
        cands = CounterMetricFamily(
            "wa_router_directory_candidates",
            "Login-stage claims kept as candidates: the session was connected elsewhere",
        )
        cands.add_metric([], d.candidates)
        yield cands

        syncs = CounterMetricFamily("wa_router_syncs", "Sync runs")
        syncs.add_metric([], v.sync_runs())
        yield syncs


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    """A gauge of one unlabelled value."""
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], float(value))
    return family


class _Counts:
    """One label value's buckets: observing is a bisect and two adds, no lock (one event
    loop per process), where prometheus-client's Histogram takes a lock per bucket walk."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


class PlainHistogram(Collector):
    """A histogram of the hot path (observed per request), exposed as prometheus-client's
    would be: `_bucket{le=...}` cumulative, `_sum`, `_count`."""

    def __init__(self, name: str, doc: str, label: str, bounds: tuple[float, ...]) -> None:
        self._name, self._doc, self._label, self._bounds = name, doc, label, bounds
        self._children: dict[str, _Counts] = {}

    def labels(self, value: str) -> _Counts:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = _Counts(self._bounds)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=[self._label])
        for value, child in sorted(self._children.items()):
            running, buckets = 0, []
            for bound, n in zip((*self._bounds, float("inf")), child.counts, strict=True):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
            family.add_metric([value], buckets, child.total)
        yield family


class Metrics:
    """The registry and the three histograms. The parts report into the histograms through
    `observe_upstream`, `observe_park` and `observe_request` (app.py hands them over)."""

    def __init__(self, view: RouterView) -> None:
        self._view = view
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = RouterCollector(view)
        self.registry.register(self._collector)
        self._latency = PlainHistogram(
            "wa_router_upstream_latency_seconds",
            "Time from sending a request to an instance to its response head",
            "upstream",
            LATENCY_BUCKETS_S,
        )
        self.registry.register(self._latency)
        self._children = {i.name: self._latency.labels(i.name) for i in view.pool.instances}
        self._parked = Histogram(
            "wa_router_park_wait_seconds",
            "How long requests waited for their session, by how the wait ended",
            ["outcome"],
            buckets=PARK_BUCKETS_S,
            registry=self.registry,
        )
        self._requests = PlainHistogram(
            "wa_router_request_duration_seconds",
            "Caller's side: from a request's arrival to its answer's head, by route kind",
            "route_kind",
            LATENCY_BUCKETS_S,
        )
        self.registry.register(self._requests)
        self._kinds: dict[str, _Counts] = {}
        self.token = view.config().metrics.token

    def authorized(self, request: web.Request) -> bool:
        """`metrics.token` set: scrapes must bring it (`Authorization: Bearer ...`)."""
        if self.token is None:
            return True
        presented = bearer_token(request.headers.get("Authorization"))
        return presented is not None and token_matches(presented, self.token)

    def observe_upstream(self, instance: str, seconds: float) -> None:
        child = self._children.get(instance)
        if child is None:  # a member added by a reload
            child = self._children[instance] = self._latency.labels(instance)
        # `_Counts.observe`, inline: this runs for every request.
        child.counts[bisect_left(child.bounds, seconds)] += 1
        child.total += seconds

    def observe_park(self, outcome: str, seconds: float) -> None:
        self._parked.labels(outcome).observe(seconds)

    def observe_request(self, kind: str, seconds: float) -> None:
        child = self._kinds.get(kind)
        if child is None:
            child = self._kinds[kind] = self._requests.labels(kind)
        child.counts[bisect_left(child.bounds, seconds)] += 1  # as observe_upstream's
        child.total += seconds

    async def refresh(self) -> None:
        self._collector.sessions = await self._view.counts()
        size = self._view.backlog_size
        self._collector.backlog = await size() if size is not None else None

    async def handle(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return json_error(
                RequestRejected(
                    401, "unauthorized", "/metrics needs Authorization: Bearer <metrics.token>"
                )
            )
        await self.refresh()
        self._collector.scrape = request.task
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
