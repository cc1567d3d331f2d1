"""What a verified webhook says: its event and session, what the directory learns from
it, and the memory that tells a replay or Node's retry from a new event."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import RequestRejected
from .stores.base import Status

# Events that say which instance holds a session, and the status they mean. Not
# `session_reconnected`: AutoReconnect sends it although the session may stay disconnected
# (node-pool-api.md, "Reconnect that is not"): it is a hint to check, not proof.
ASSIGNING = {
    "session_ready": Status.CONNECTED,
    "session_authenticated": Status.AUTHENTICATED,
    "qr_code_generated": Status.QR_SCANNING,
}
ASSIGN, FORGET, DEMOTE, CHECK = "assign", "forget", "demote", "check"
# Events whose bodies carry no timestamp of their own: the same bytes again can be a new
# event (node-pool-api.md, "Identical bodies").
LIFECYCLE = frozenset(
    {
        "qr_code_generated",
        "session_authenticated",
        "session_ready",
        "session_disconnected",
        "session_reconnected",
        "session_reconnect_failed",
        "session_error",
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    session: str | None
    data: dict[str, Any]


def parse_event(body: bytes) -> Event:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestRejected(400, "bad_request", "the webhook body is not JSON") from None
    except RecursionError:
        # Signed, yet no event Laravel could read either (PHP's json_decode stops at 512).
        raise RequestRejected(
            400, "bad_request", "the webhook body is JSON nested too deeply"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("event"), str):
        raise RequestRejected(400, "bad_request", 'the webhook body has no "event"')
    data = doc.get("data")
    data = data if isinstance(data, dict) else {}
    session = data.get("session_id")
    return Event(doc["event"], session if isinstance(session, str) and session else None, data)


def learning(event: Event, forget_reasons: tuple[str, ...]) -> tuple[str, Status | None] | None:
    """What the directory learns from `event`: (ASSIGN, status) the sender holds it so;
    (FORGET, None) logged out everywhere; (DEMOTE, DISCONNECTED) the sender lost it (a
    conflict, a network drop: it may come back, so it is not forgotten); (CHECK, None) worth
    a look; None: nothing."""
    if event.session is None:
        return None
    if event.name in ASSIGNING:
        return (ASSIGN, ASSIGNING[event.name])
    if event.name == "session_disconnected":
        reason = event.data.get("reason")
        if isinstance(reason, str) and reason.upper() in {r.upper() for r in forget_reasons}:
            return (FORGET, None)
        return (DEMOTE, Status.DISCONNECTED)
    if event.name == "session_reconnected":
        return (CHECK, None)
    return None
