"""The pool: instances, their health state, load and draining.

State machine:

    healthy --a failure (health check, or connect on live traffic)--> suspect
    suspect --`fall` consecutive failures--> down
    suspect/down --`rise` consecutive successes (or any answer to live traffic)--> healthy

A suspect instance is skipped by discovery and placement during its cool-down, so one dead
instance costs each request at most one failed connect, not one per scan. A down one gets
nothing until a health check sees it answer again.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import structlog
from yarl import URL

from .config import InstanceConfig, normalize_url
from .errors import ConfigError

log = structlog.get_logger("wa_router.pool")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class State(StrEnum):
    HEALTHY = "healthy"
    SUSPECT = "suspect"
    DOWN = "down"


@dataclass(eq=False, slots=True)
class Instance:
    name: str
    url: URL
    base: str  # `scheme://host:port`, no trailing slash: the prefix of every upstream URL
    state: State = State.HEALTHY
    draining: bool = False
    suspect_until: float = 0.0
    inflight: int = 0
    last_error: str | None = None
    state_changed_at: float = field(default_factory=time.time)
    failures: int = 0  # consecutive
    successes: int = 0  # consecutive
    latency_s: float | None = None  # of the last health check
    last_check_at: float | None = None  # Unix seconds
    reported_sessions: int | None = None  # what its own /health said
    uptime_s: float | None = None  # what its own /health said last
    back_at: float | None = None  # monotonic: when it last came back or restarted


class Pool:
    def __init__(
        self,
        instances: Sequence[InstanceConfig],
        *,
        suspect_cooldown_s: float = 5.0,
        fall: int = 2,
        rise: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._cooldown_s = suspect_cooldown_s
        self._fall = fall
        self._rise = rise
        self.instances: tuple[Instance, ...] = ()
        self._by_name: dict[str, Instance] = {}
        self._by_url: dict[str, Instance] = {}
        self.set_instances(instances)
        # Called when an instance comes back from down (any path: a check, live traffic, a
        # signed webhook); health.py sets it to sync the instance at once.
        self.on_back: Callable[[Instance], None] | None = None

    def set_instances(self, configs: Sequence[InstanceConfig]) -> tuple[list[str], list[str]]:
        """The members `configs` name, in their order; returns (added, removed) names. A
        member whose name and URL stay is kept as it is (state, load, drain)."""
        members: list[Instance] = []
        for c in configs:
            inst = old = self._by_name.get(c.name)
            if inst is None or inst.url != URL(c.url):
                inst = Instance(c.name, URL(c.url), str(URL(c.url).origin()).rstrip("/"))
                # Moved, not replaced: a drain is an operator's word about the name.
                inst.draining = old is not None and old.draining
            members.append(inst)
        before = set(self._by_name.items())
        by_url: dict[str, Instance] = {}
        for cfg, inst in zip(configs, members, strict=True):
            for u in (cfg.url, *cfg.aliases):
                for spelling in _spellings(normalize_url(u, "")):
                    by_url.setdefault(spelling, inst)
        self.instances = tuple(members)
        self._by_name = {i.name: i for i in members}
        self._by_url = by_url
        self._rr = itertools.cycle(self.instances)
        after = set(self._by_name.items())
        added = [name for name, _ in sorted(after - before)]
        removed = [name for name, _ in sorted(before - after)]
        return added, removed

    def get(self, name: str) -> Instance | None:
        return self._by_name.get(name)

    def by_url(self, url: str) -> Instance | None:
        """The pool member a URL names (`X-Instance-Url: http://localhost:3002`): its URL or
        an alias, loopback spellings unified; else the one loopback member on that port.
        Never used as a destination, only to name a member."""
        try:
            norm = normalize_url(url, "")
        except ConfigError:
            return None
        inst = self._by_url.get(norm)
        if inst is not None:
            return inst
        port = URL(url).port
        on_port = [i for i in self.instances if i.url.port == port]
        return on_port[0] if len(on_port) == 1 else None

    def routable(self, inst: Instance) -> bool:
        """May live traffic and discovery probes go to `inst` now?"""
        if inst.state is State.HEALTHY:
            return True
        return inst.state is State.SUSPECT and self._clock() >= inst.suspect_until

    def discoverable(self) -> list[Instance]:
        return [i for i in self.instances if self.routable(i)]

    def for_placement(self, counts: Mapping[str, int]) -> Instance | None:
        """The least-loaded routable, non-draining instance (sessions, then requests)."""
        usable = [i for i in self.instances if not i.draining and self.routable(i)]
        if not usable:
            return None
        return min(usable, key=lambda i: (counts.get(i.name, 0), i.inflight, i.name))

    def any_routable(self) -> Instance | None:
        for _ in range(len(self.instances)):
            inst = next(self._rr)
            if self.routable(inst):
                return inst
        return None

    def mark_suspect(self, inst: Instance, reason: str) -> None:
        """A failure: suspect at once, down after `fall` in a row."""
        inst.suspect_until = self._clock() + self._cooldown_s
        inst.last_error = reason
        inst.failures += 1
        inst.successes = 0
        if inst.failures >= self._fall:
            self.mark_down(inst, reason)
        elif inst.state is State.HEALTHY:
            self._set(inst, State.SUSPECT, reason)

    def record_success(self, inst: Instance) -> bool:
        """A health check answered; True when this brought a down instance back."""
        inst.failures = 0
        inst.successes += 1
        if inst.state is State.HEALTHY or inst.successes < self._rise:
            return False
        return self._set(inst, State.HEALTHY, "health check answered")

    def mark_healthy(self, inst: Instance, reason: str = "answered") -> bool:
        """Live traffic (or a signed webhook) got through: whatever the checks said, it is
        serving. True when this brought a down instance back."""
        inst.failures = 0
        if inst.state is State.HEALTHY:
            return False
        return self._set(inst, State.HEALTHY, reason)

    def mark_back(self, inst: Instance, reason: str) -> None:
        """It came back from down, or restarted: it restores its accounts for a while, so
        what the directory says of its sessions is re-checked, not trusted."""
        inst.back_at = self._clock()
        # Its next uptime starts the count afresh: the same restart is not seen twice.
        inst.uptime_s = None
        log.info("instance_back", instance=inst.name, reason=reason)

    def note_uptime(self, inst: Instance, uptime_s: float) -> None:
        """The instance's own uptime, the first the router sees of it: a router started
        while the instance restores (both restarted at once) knows it came back then, not
        never, and waits for its restoring sessions as a router that saw it go would."""
        if inst.back_at is None and uptime_s >= 0:  # a negative one says nothing
            inst.back_at = self._clock() - uptime_s

    def recently_back(self, inst: Instance, window_s: float) -> bool:
        return inst.back_at is not None and self._clock() - inst.back_at <= window_s

    def mark_down(self, inst: Instance, reason: str) -> None:
        inst.last_error = reason
        if inst.state is not State.DOWN:
            self._set(inst, State.DOWN, reason)

    def _set(self, inst: Instance, state: State, reason: str) -> bool:
        """Change state; True when this brought a down instance back."""
        log.warning(
            "instance_state_changed",
            instance=inst.name,
            old=inst.state.value,
            new=state.value,
            reason=reason,
        )
        back = inst.state is State.DOWN and state is State.HEALTHY
        inst.state = state
        inst.state_changed_at = time.time()
        if back:
            self.mark_back(inst, reason)
            if self.on_back is not None:
                self.on_back(inst)
        return back


def _spellings(norm: str) -> list[str]:
    """`http://127.0.0.1:3001` is also `http://localhost:3001` and `http://[::1]:3001`."""
    url = URL(norm)
    host = url.host or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        return [norm]
    out = [norm]
    for name in LOOPBACK_NAMES:
        out.append(normalize_url(str(URL.build(scheme=url.scheme, host=name, port=url.port)), ""))
    return out
