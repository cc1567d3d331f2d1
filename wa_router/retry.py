"""What to do after one upstream attempt. Pure policy, no I/O (tested with tables).

The rule (DESIGN.md, "Decide by what is known"):

- not processed: the request never reached the instance, or the instance said the session
  is not here or not usable here (Blazz: 404 `Session not found`, 400 `Session not
  connected`; the profile lists them) -> look for the connected owner and send there,
  whatever the method;
- nobody has it now but it is expected back (`expected_back`) -> park: wait, bounded, and
  go the moment it is connected somewhere; past the bound 503 `session_unavailable`;
- sent but no answer -> may have been processed: never parked, and re-sent only when that
  cannot do harm: the method is idempotent (RFC 9110 9.2.2) or the caller gave an
  `Idempotency-Key`;
- nobody has it and nobody expects it -> 404 naming the instances asked.

`decide` is the whole table; `proxy.py` is the I/O around it: it sends, and when `look_again`
says so, asks the directory and the pool what is known before calling `decide`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from .errors import NotReached, ReadTimeout, RequestRejected, SentNoAnswer, UpstreamError
from .pool import State

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
IDEMPOTENCY_KEY = "Idempotency-Key"


def may_resend(method: str, headers: Mapping[str, str]) -> bool:
    return method in IDEMPOTENT_METHODS or bool(headers.get(IDEMPOTENCY_KEY))


class Outcome(StrEnum):
    """What one attempt at an instance came to."""

    ANSWERED = "answered"  # an answer to relay
    NOT_HERE = "not_here"  # "session not found" there: not processed
    NOT_USABLE = "not_usable"  # "session not connected" there: checked first, not processed
    NOT_REACHED = "not_reached"  # nothing was sent
    NO_ANSWER = "no_answer"  # sent, no (complete) answer: may have been processed


NOT_PROCESSED = frozenset({Outcome.NOT_HERE, Outcome.NOT_USABLE, Outcome.NOT_REACHED})


def outcome_of(exc: UpstreamError) -> Outcome:
    return Outcome.NOT_REACHED if isinstance(exc, NotReached) else Outcome.NO_ANSWER


class Action(StrEnum):
    SEND = "send"  # to `Step.target`
    PARK = "park"  # wait for the session to be connected somewhere
    RELAY = "relay"  # the instance's own answer goes back as it is
    FAIL = "fail"  # the attempt's failure (502/504, saying whether it was re-sent)
    NOT_FOUND = "not_found"  # 404 naming the instances asked (or what the probes said)
    UNAVAILABLE = "unavailable"  # 503 session_unavailable, Retry-After


@dataclass(frozen=True, slots=True)
class Known:
    """What the directory and the pool say after a look: where to send now (a routable
    instance holding the session, connected when it must be), and whether it is
    expected back when nobody has it."""

    owner: str | None = None
    expected_back: bool = False


@dataclass(frozen=True, slots=True)
class Step:
    action: Action
    target: str | None = None


def look_again(outcome: Outcome | None, *, may_resend: bool, sends_left: int) -> bool:
    """Whether to ask the directory and the pool (I/O) before `decide`. `outcome` None:
    nothing sent yet and no routable owner known."""
    if outcome is None:
        return True
    if sends_left <= 0:
        return False
    return outcome in NOT_PROCESSED or (outcome is Outcome.NO_ANSWER and may_resend)


def decide(
    outcome: Outcome | None,
    known: Known | None,
    *,
    may_resend: bool,
    sends_left: int,
    can_park: bool,
) -> Step:
    """The next step after `outcome` (None: before the first send), given `known` (None when
    `look_again` said there was nothing to look at). `may_resend`: a second delivery would
    do no harm; `sends_left`: attempts the request may still make; `can_park`: its wait
    is neither used up nor refused (`Prefer: wait=0`) and it was never maybe-processed."""
    if outcome is Outcome.ANSWERED:
        return Step(Action.RELAY)
    if outcome is Outcome.NO_ANSWER:
        # May have been processed: never parked; re-sent only where that cannot harm.
        if may_resend and sends_left > 0 and known is not None and known.owner is not None:
            return Step(Action.SEND, known.owner)
        return Step(Action.FAIL)
    if sends_left <= 0:
        # It moved on every attempt (a restore race): it lives, so never a 404; and a
        # request that never reached anyone gets that failure said as it is.
        return Step(Action.FAIL if outcome is Outcome.NOT_REACHED else Action.UNAVAILABLE)
    if known is not None:
        if known.owner is not None:
            return Step(Action.SEND, known.owner)
        if known.expected_back:
            return Step(Action.PARK if can_park else Action.UNAVAILABLE)
    # Nobody has it, nobody expects it: say what the last answer said.
    if outcome is Outcome.NOT_USABLE:
        return Step(Action.RELAY)  # the instance's own "not connected" is the truth
    if outcome is Outcome.NOT_REACHED and known is None:
        return Step(Action.FAIL)
    return Step(Action.NOT_FOUND)


def expected_back(
    *,
    known: bool,
    owner_state: State | None,
    owner_answered: bool,
    owner_restarted: bool,
    logging_in: bool,
) -> bool:
    """Whether a session nobody serves now will be back soon enough to wait for it.

    `known`: the directory has it (an owner or a candidate); `owner_state`: the pool state
    of the instance it names (None: none named); `owner_answered`: that instance answered
    the probe; `owner_restarted`: it came back or restarted lately (it restores its
    accounts); `logging_in`: an instance reports it `authenticated` (restoring)."""
    if logging_in:
        return True
    if not known or owner_state is None:
        return False
    return owner_state is not State.HEALTHY or not owner_answered or owner_restarted


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
