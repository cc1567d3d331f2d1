"""What to do after one upstream attempt failed. Pure policy, no I/O (tested with tables).

The rule (DESIGN.md, "On failure"): a request that never reached the instance, or that the
instance refused with "session not here", was not processed: find the owner again and retry
once, whatever the method. A request that was sent but got no answer may have been
processed: it is re-sent only when re-sending cannot do harm, i.e. its method is idempotent
(RFC 9110 9.2.2) or the caller gave an `Idempotency-Key`.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import NotReached, ReadTimeout, RequestRejected, SentNoAnswer, UpstreamError

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
IDEMPOTENCY_KEY = "Idempotency-Key"


def may_resend(method: str, headers: Mapping[str, str]) -> bool:
    return method in IDEMPOTENT_METHODS or bool(headers.get(IDEMPOTENCY_KEY))


def should_retry(exc: UpstreamError, method: str, headers: Mapping[str, str]) -> bool:
    """Retry (once, on the rediscovered owner) after `exc`?"""
    if isinstance(exc, NotReached):
        return True
    if isinstance(exc, SentNoAnswer):
        return may_resend(method, headers)
    return False


def failure_answer(exc: UpstreamError, session: str | None, *, retried: bool) -> RequestRejected:
    """The caller's answer when `exc` ends the request."""
    if isinstance(exc, ReadTimeout):
        return RequestRejected(
            504,
            "upstream_timeout",
            f"instance {exc.instance} did not answer in time; the request may have been "
            "processed" + ("" if retried else " and was not re-sent"),
            session=session,
            instance=exc.instance,
            retried=retried,
        )
    if isinstance(exc, SentNoAnswer):
        return RequestRejected(
            502,
            "upstream_unreachable",
            f"the connection to instance {exc.instance} broke before it answered; the request "
            "may have been processed" + ("" if retried else " and was not re-sent"),
            session=session,
            instance=exc.instance,
            retried=retried,
        )
    return RequestRejected(
        502,
        "upstream_unreachable",
        f"instance {exc.instance} could not be reached ({exc.detail}); nothing was sent",
        session=session,
        instance=exc.instance,
        retried=retried,
    )
