"""What Laravel hears: one consistent story per session, told through the router.

Blazz's Laravel keeps its own copy of each account's status, set from the lifecycle
webhooks, refuses to send for an account that is not `connected`, and sends to the
`X-Instance-Url` of the last `session_ready` (node-pool-api.md, "Around restarts"). Relayed
as they come, a restoring instance's `session_authenticated` would flip an account that is
connected on its owner to `authenticated` (Laravel then refuses the sends itself), the
displaced copy's CONFLICT `session_disconnected` would flip it to `disconnected`, and every
`session_ready` would point Laravel straight at an instance, past the router.

So, while the directory says a session is connected on its owner:

- a login-stage event from another instance is *held*: relayed, in order, just before that
  instance's own `session_ready` if it becomes the owner, dropped (counted) if it does not
  within `webhooks.hold_login_events_s`;
- a `session_disconnected` that is not a logout, from an instance that is not the owner, is
  *dropped*: it is about a copy that no longer serves;
- a `session_disconnected` that is not a logout from the owner itself is relayed only if
  no other instance has the session connected when the pool is asked (webhooks.py): after
  a restore race, which copy's `session_ready` reached the router last is a race too;
- everything else is relayed as it came, except that `X-Instance-Url` (not signed) names the
  router (`webhooks.advertise_url`); the instance it came from goes along in `ORIGIN_*`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .stores.base import Entry

RELAY, HOLD, DROP = "relay", "hold", "drop"
_PER_KEY = 8  # held events kept per (session, sender)
LOGIN_EVENTS = frozenset({"session_authenticated", "qr_code_generated"})
ORIGIN_INSTANCE = "X-Wa-Router-Instance"  # the pool member a relayed webhook came from
ORIGIN_INSTANCE_URL = "X-Wa-Router-Instance-Url"  # ...and its own X-Instance-Url


def verdict(
    event: str, sender: str | None, owner: Entry | None, *, logout: bool, hold: bool
) -> str:
    """RELAY, HOLD or DROP `event` from `sender`, given the directory's entry after
    learning from it. Pure (tested with a table)."""
    if sender is None or owner is None or not owner.connected or owner.instance == sender:
        return RELAY
    if event in LOGIN_EVENTS:
        return HOLD if hold else RELAY
    if event == "session_disconnected" and not logout:
        return DROP
    return RELAY


def relayed_headers(
    headers: Sequence[tuple[str, str]],
    *,
    instance_url_header: str,
    advertise_url: str | None,
    origin: str | None,
) -> list[tuple[str, str]]:
    """The headers a webhook goes on to Laravel with: the router in `X-Instance-Url`."""
    if advertise_url is None:
        return list(headers)
    low = instance_url_header.lower()
    out = [(k, v) for k, v in headers if k.lower() != low]
    original = next((v for k, v in headers if k.lower() == low), None)
    out.append((instance_url_header, advertise_url))
    if original is not None:
        out.append((ORIGIN_INSTANCE_URL, original))
    if origin is not None:
        out.append((ORIGIN_INSTANCE, origin))
    return out


@dataclass(frozen=True, slots=True)
class Held:
    event: str
    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...]
    timestamp: int
    held_at: float


class Holding:
    """Held login-stage events per (session, sender), oldest first; expired ones go when
    anything is held or released (no timer)."""

    def __init__(self, hold_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self._clock = clock
        self._held: OrderedDict[tuple[str, str], list[Held]] = OrderedDict()
        self.dropped = 0  # expired without their sender becoming the owner

    def __len__(self) -> int:
        return sum(len(v) for v in self._held.values())

    def hold(self, session: str, sender: str, item: Held) -> None:
        self.expire()
        key = (session, sender)
        items = self._held.setdefault(key, [])
        limit = self._clock() - self.hold_s
        # Each item by its own age (a restorer refreshing its QR keeps the key fresh), and
        # a few per key at most: only the latest login stages matter to Laravel.
        fresh = [i for i in items if i.held_at > limit][-(_PER_KEY - 1) :]
        self.dropped += len(items) - len(fresh)
        items[:] = [*fresh, item]
        self._held.move_to_end(key)

    def release(self, session: str, sender: str) -> list[Held]:
        """What `sender` said of `session` while it was not the owner, in order."""
        self.expire()
        return self._held.pop((session, sender), [])

    def expire(self) -> list[tuple[str, str, Held]]:
        limit = self._clock() - self.hold_s
        gone: list[tuple[str, str, Held]] = []
        while self._held:
            key, items = next(iter(self._held.items()))
            if items[-1].held_at > limit:
                break  # the newest item of the oldest key is fresh: stop here
            del self._held[key]
            gone += [(key[0], key[1], i) for i in items]
        self.dropped += len(gone)
        return gone
