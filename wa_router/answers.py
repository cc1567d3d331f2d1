"""The router's own answers about a session it could not serve: what is true, in JSON.

404 session_not_found    no instance has it; `asked`, and `unreachable` if any
401 unauthorized         the instances refused the key the probes carried
503 no_healthy_instance  nobody could be asked
503 session_unavailable  it is expected back but is not connected anywhere yet (or the
                         wait was refused): names the owner and its state, Retry-After
503 caller_gone          the caller's connection closed before the request was sent (no
                         one reads it: for the log line and the counters)
"""

from __future__ import annotations

from typing import Any

from .discovery import ERROR, Found
from .errors import RequestRejected


def no_healthy_instance(session: str | None) -> RequestRejected:
    return RequestRejected(
        503,
        "no_healthy_instance",
        "no instance of the pool can take this request now",
        session=session,
    )


def not_found_answer(session: str, found: Found) -> RequestRejected:
    if not found.probes or all(p.outcome == ERROR for p in found.probes):
        # Nobody answered: "not found" would be a guess. Say what is true.
        ans = no_healthy_instance(session)
        if found.probes:
            ans.extra["unreachable"] = found.unreachable
        return ans
    if found.unauthorized:
        return RequestRejected(
            401,
            "unauthorized",
            "the instances refused the api key, so the session could not be looked for",
            session=session,
            asked=found.asked,
        )
    extra: dict[str, Any] = {"session": session, "asked": found.asked}
    if found.unreachable:
        extra["unreachable"] = found.unreachable
    return RequestRejected(
        404,
        "session_not_found",
        f"session {session} is on none of the instances asked",
        **extra,
    )


def not_on_rediscovered(session: str, instance: str) -> RequestRejected:
    return RequestRejected(
        404,
        "session_not_found",
        f"session {session} is not on {instance}, the instance rediscovery found",
        session=session,
        asked=[instance],
    )


def caller_gone(session: str) -> RequestRejected:
    return RequestRejected(
        503,
        "caller_gone",
        "the caller's connection closed before the request was sent; nothing was sent",
        session=session,
    )


CALLER_CLOSED = "caller_closed"  # a session_unavailable reason
_REASONS = {
    CALLER_CLOSED: "the caller closed its side of the connection, so it is not kept waiting",
    "timeout": "did not come back within the wait",
    "full": "too many requests wait for sessions already",
    "shutdown": "the router is shutting down",
    "no_wait": "the caller asked not to wait (Prefer: wait=0)",
    "attempts": "it moved too often to follow",
}


def session_unavailable(
    session: str,
    *,
    owner: str | None,
    owner_state: str | None,
    status: str | None,
    waited_s: float,
    retry_after_s: int,
    reason: str,
) -> RequestRejected:
    """503 with Retry-After: the session is known and expected back, not usable now."""
    # As last known: an instance killed a moment ago may still read healthy here.
    where = f" (its owner {owner} was {owner_state} at its last check)" if owner else ""
    if owner and status:
        where = f" (last seen {status} on {owner}, which was {owner_state} at its last check)"
    why = _REASONS.get(reason, reason)
    ans = RequestRejected(
        503,
        "session_unavailable",
        f"session {session} is not connected on any instance now{where}; {why}. Nothing was sent.",
        session=session,
        owner=owner,
        owner_state=owner_state,
        session_status=status,
        reason=reason,
        waited_s=round(waited_s, 3),
        retry_after_s=retry_after_s,
    )
    ans.headers["Retry-After"] = str(retry_after_s)
    return ans
