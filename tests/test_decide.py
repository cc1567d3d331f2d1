"""The forward loop's policy as tables: `retry.decide`, `retry.expected_back`, the
ownership rule every store applies (`may_replace`), and `Prefer: wait`."""

from __future__ import annotations

import pytest

from wa_router.parking import prefer_wait_s
from wa_router.pool import State
from wa_router.retry import Action, Known, Outcome, Step, decide, expected_back, look_again
from wa_router.stores.base import Entry, Source, Status, may_replace

A, B = "node-a", "node-b"
OWNER_B = Known(owner=B)
BACK = Known(expected_back=True)
NOBODY = Known()

# outcome, known, may_resend, sends_left, can_park -> step
DECISIONS = [
    # An answer goes back as it is.
    (Outcome.ANSWERED, None, False, 3, True, Step(Action.RELAY)),
    # Not processed: to the owner found, whatever the method.
    (Outcome.NOT_HERE, OWNER_B, False, 3, True, Step(Action.SEND, B)),
    (Outcome.NOT_USABLE, OWNER_B, False, 3, True, Step(Action.SEND, B)),
    (Outcome.NOT_REACHED, OWNER_B, False, 3, True, Step(Action.SEND, B)),
    # ...or park when nobody has it now but it is expected back.
    (Outcome.NOT_HERE, BACK, False, 3, True, Step(Action.PARK)),
    (Outcome.NOT_USABLE, BACK, False, 3, True, Step(Action.PARK)),
    (Outcome.NOT_REACHED, BACK, False, 3, True, Step(Action.PARK)),
    (None, BACK, False, 4, True, Step(Action.PARK)),
    # ...a 503 when it may not wait (Prefer: wait=0, wait used up).
    (Outcome.NOT_REACHED, BACK, False, 3, False, Step(Action.UNAVAILABLE)),
    (None, BACK, False, 4, False, Step(Action.UNAVAILABLE)),
    # ...and when nobody expects it: what is true.
    (None, NOBODY, False, 4, True, Step(Action.NOT_FOUND)),
    (Outcome.NOT_HERE, NOBODY, False, 3, True, Step(Action.NOT_FOUND)),
    (Outcome.NOT_USABLE, NOBODY, False, 3, True, Step(Action.RELAY)),  # Node's own 400
    (Outcome.NOT_REACHED, NOBODY, False, 3, True, Step(Action.NOT_FOUND)),
    # Sent, no answer: may have been processed. Never parked, re-sent only if harmless.
    (Outcome.NO_ANSWER, None, False, 3, True, Step(Action.FAIL)),
    (Outcome.NO_ANSWER, BACK, True, 3, True, Step(Action.FAIL)),
    (Outcome.NO_ANSWER, OWNER_B, True, 3, True, Step(Action.SEND, B)),
    (Outcome.NO_ANSWER, OWNER_B, True, 0, True, Step(Action.FAIL)),
    # Out of sends (it moved on every attempt): it lives, so 503 with Retry-After, never a
    # 404; a request that never reached anyone says so.
    (Outcome.NOT_HERE, None, False, 0, True, Step(Action.UNAVAILABLE)),
    (Outcome.NOT_USABLE, None, False, 0, True, Step(Action.UNAVAILABLE)),
    (Outcome.NOT_REACHED, None, False, 0, True, Step(Action.FAIL)),
    (Outcome.NOT_REACHED, BACK, False, 0, True, Step(Action.FAIL)),
]


@pytest.mark.parametrize(
    ("outcome", "known", "may_resend", "sends_left", "can_park", "step"), DECISIONS
)
def test_decide(
    outcome: Outcome | None,
    known: Known | None,
    may_resend: bool,
    sends_left: int,
    can_park: bool,
    step: Step,
) -> None:
    assert (
        decide(outcome, known, may_resend=may_resend, sends_left=sends_left, can_park=can_park)
        == step
    )


@pytest.mark.parametrize(
    ("outcome", "may_resend", "sends_left", "look"),
    [
        (None, False, 4, True),
        (Outcome.NOT_HERE, False, 3, True),
        (Outcome.NOT_USABLE, False, 3, True),
        (Outcome.NOT_REACHED, False, 3, True),
        (Outcome.NO_ANSWER, False, 3, False),  # nothing to look for: it is answered
        (Outcome.NO_ANSWER, True, 3, True),
        (Outcome.NOT_HERE, False, 0, False),
        (Outcome.ANSWERED, False, 3, False),
    ],
)
def test_look_again(outcome: Outcome | None, may_resend: bool, sends_left: int, look: bool) -> None:
    assert look_again(outcome, may_resend=may_resend, sends_left=sends_left) is look


@pytest.mark.parametrize(
    ("known", "state", "answered", "restarted", "logging_in", "back"),
    [
        # A session nobody knows and nobody logs in: not waited for (a fast 404).
        (False, None, False, False, False, False),
        (False, None, False, False, True, True),  # logging in somewhere: seconds away
        # Known, its owner healthy, answering, not restarted: it really is gone.
        (True, State.HEALTHY, True, False, False, False),
        (True, State.HEALTHY, True, True, False, True),  # ...unless it is restoring
        (True, State.HEALTHY, False, False, False, True),  # slow or stopped: no answer
        (True, State.SUSPECT, False, False, False, True),
        (True, State.DOWN, False, False, False, True),
        (True, None, False, False, False, False),  # names an instance no longer in the pool
    ],
)
def test_expected_back(
    known: bool,
    state: State | None,
    answered: bool,
    restarted: bool,
    logging_in: bool,
    back: bool,
) -> None:
    assert (
        expected_back(
            known=known,
            owner_state=state,
            owner_answered=answered,
            owner_restarted=restarted,
            logging_in=logging_in,
        )
        is back
    )


def e(instance: str | None, at: float, status: Status | None = None) -> Entry:
    return Entry(instance, at, Source.WEBHOOK, status)


C, AU, QR, GONE = Status.CONNECTED, Status.AUTHENTICATED, Status.QR_SCANNING, Status.GONE

# candidate, existing -> stored?
OWNERSHIP = [
    (e(A, 1.0, C), None, True),
    (e(A, 1.0, C), e(B, 2.0, C), False),  # older never wins
    (e(A, 2.0, C), e(B, 1.0, C), True),  # newer connected elsewhere: the last ready wins
    (e(A, 1.0, C), e(B, 1.0, C), True),  # same time: the later arrival
    # A restorer's login stages do not take a connected session (candidates).
    (e(A, 2.0, AU), e(B, 1.0, C), False),
    (e(A, 2.0, QR), e(B, 1.0, C), False),
    (e(A, 2.0, None), e(B, 1.0, C), False),
    # ...but do take one that is not connected anywhere known.
    (e(A, 2.0, AU), e(B, 1.0, AU), True),
    (e(A, 2.0, AU), e(B, 1.0, GONE), True),
    (e(A, 2.0, AU), e(B, 1.0, Status.DISCONNECTED), True),
    (e(A, 2.0, AU), e(B, 1.0, None), True),
    # News of the owner's own instance always counts (it says it lost it, or restores it).
    (e(B, 2.0, GONE), e(B, 1.0, C), True),
    (e(B, 2.0, AU), e(B, 1.0, C), True),
    (e(B, 0.5, GONE), e(B, 1.0, C), False),
    # Tombstones: a newer logout forgets; an older claim cannot revive.
    (e(None, 2.0), e(B, 1.0, C), True),
    (e(A, 1.5, C), e(None, 2.0), False),
    (e(A, 2.5, AU), e(None, 2.0), True),
]


@pytest.mark.parametrize(("candidate", "existing", "stored"), OWNERSHIP)
def test_ownership_rule(candidate: Entry, existing: Entry | None, stored: bool) -> None:
    assert may_replace(candidate, existing) is stored


@pytest.mark.parametrize(
    ("header", "wait_s"),
    [
        (None, None),
        ("", None),
        ("wait=0", 0.0),
        ("wait=5", 5.0),
        ("respond-async, wait=10", 10.0),
        ("Wait = 3", 3.0),
        ("wait=7; x=y", 7.0),
        ("wait=-1", None),
        ("wait=abc", None),
        ("return=minimal", None),
    ],
)
def test_prefer_wait(header: str | None, wait_s: float | None) -> None:
    assert prefer_wait_s(header) == wait_s
