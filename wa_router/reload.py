"""SIGHUP: read the config file again and apply what can change while serving.

logrotate and `systemctl reload` send SIGHUP; its default action ends the process with
requests in flight. Here it re-reads the file the router was started with (and the
environment), validates it, and applies the keys in `LIVE` to the running parts: an
instance added is health-checked and synced at once, one removed is no longer used (its
sessions are found again where they are), one whose `drain` changed is drained or undrained
for every router sharing the store. A config
that does not validate is logged and the running one kept. Every other change is named in
the log as needing a restart (the parts built from it are not rebuilt under traffic).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any

import structlog

from .apikeys import KeyPolicy
from .config import Config, InstanceConfig, load_config
from .errors import ConfigError
from .logging import setup_logging
from .runtime import Router

log = structlog.get_logger("wa_router.reload")

# Dotted keys applied to the running router (a prefix covers what is under it).
LIVE = (
    "instances",
    "log.level",
    "webhooks.secrets",
    "webhooks.relay_timeout_s",
    "webhooks.hold_login_events",
    "webhooks.hold_login_events_s",
    "upstream.client_keys",
    "admin.token",
)


def changed_keys(old: Any, new: Any, prefix: str = "") -> Iterator[str]:
    """Dotted paths where two configs differ (whole lists and tuples compared as values)."""
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new):
        for f in dataclasses.fields(old):
            key = f"{prefix}.{f.name}" if prefix else f.name
            yield from changed_keys(getattr(old, f.name), getattr(new, f.name), key)
    elif old != new:
        yield prefix


def is_live(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in LIVE)


def drain_changes(
    old: Sequence[InstanceConfig], new: Sequence[InstanceConfig], added: Sequence[str]
) -> list[tuple[str, bool]]:
    """The drains a reload applies: where the file's `drain` changed, and members that
    come (back) drained. An unchanged `drain: false` leaves an operator's drain alone."""
    before = {c.name: c.drain for c in old}
    changes = []
    for c in new:
        fresh = c.name in added  # new, or its URL changed (it keeps its name's drain)
        if (fresh and c.drain) or (c.name in before and before[c.name] != c.drain):
            changes.append((c.name, c.drain))
    return changes


def apply(router: Router, new: Config) -> tuple[list[str], list[str]]:
    """Apply `new`'s live keys to `router`; returns (applied, needing a restart)."""
    old = router.config
    changed = list(changed_keys(old, new))
    # The admin routes exist or not from the start: only a token's change is live.
    switched = (old.admin.token is None) != (new.admin.token is None)
    applied = [k for k in changed if is_live(k) and not (k == "admin.token" and switched)]
    later = [k for k in changed if k not in applied]
    if not applied:
        return applied, later
    wh = router.webhooks
    wh.cfg = dataclasses.replace(
        wh.cfg,
        secrets=new.webhooks.secrets,
        relay_timeout_s=new.webhooks.relay_timeout_s,
        hold_login_events=new.webhooks.hold_login_events,
        hold_login_events_s=new.webhooks.hold_login_events_s,
    )
    wh.holding.hold_s = new.webhooks.hold_login_events_s
    relay = wh.deliverer.relay if wh.deliverer is not None else None
    if relay is not None:
        relay.secret = new.webhooks.secrets[0] if new.webhooks.secrets else ""
        relay.timeout_s = new.webhooks.relay_timeout_s
    router.proxy.keys = KeyPolicy(router.profile, old.upstream.api_key, new.upstream.client_keys)
    instances = old.instances
    if "instances" in applied:
        instances = new.instances
        added, removed = router.pool.set_instances(new.instances)
        router.health.members_changed()  # watches for the new, none for the gone
        for name in added:
            inst = router.pool.get(name)
            if inst is not None:  # learn its sessions now, not at the next sync
                _later(router.syncer.run(only=inst))
        router.drain.pinned = frozenset(c.name for c in new.instances if c.drain)
        for name, draining in drain_changes(old.instances, new.instances, added):
            _later(router.drain.set(name, draining))
        log.warning("instances_changed", added=added, removed=removed)
    upstream = dataclasses.replace(old.upstream, client_keys=new.upstream.client_keys)
    admin = old.admin if switched else dataclasses.replace(old.admin, token=new.admin.token)
    webhooks = wh.cfg
    log_cfg = dataclasses.replace(old.log, level=new.log.level)
    router.config = dataclasses.replace(
        old, instances=instances, upstream=upstream, admin=admin, webhooks=webhooks, log=log_cfg
    )
    return applied, later


_background: set[asyncio.Future[Any]] = set()


def _later(work: Coroutine[Any, Any, Any]) -> None:
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


def reload(router: Router, path: str | None) -> bool:
    """Re-read and apply; False (logged, nothing changed) when the new config is refused."""
    try:
        new = load_config(path, os.environ)
    except ConfigError as exc:
        log.error("config_reload_refused", error=str(exc), kept="the running config")
        return False
    applied, later = apply(router, new)
    log.info("config_reloaded", applied=applied, needs_restart=later)
    if "log.level" in applied:  # last: the line above is written at the old level
        setup_logging(router.config.log)
    return True
