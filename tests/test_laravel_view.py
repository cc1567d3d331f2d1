"""What Laravel hears, as tables: which lifecycle events go on, wait, or are dropped; the
headers a relayed webhook carries; held events expiring."""

from __future__ import annotations

import pytest

from wa_router.laravel_view import (
    DROP,
    HOLD,
    ORIGIN_INSTANCE,
    ORIGIN_INSTANCE_URL,
    RELAY,
    Held,
    Holding,
    relayed_headers,
    verdict,
)
from wa_router.stores.base import Entry, Source, Status

ON_A = Entry("node-a", 1.0, Source.WEBHOOK, Status.CONNECTED)
LOGGING_IN_ON_A = Entry("node-a", 1.0, Source.WEBHOOK, Status.AUTHENTICATED)


@pytest.mark.parametrize(
    ("event", "sender", "owner", "logout", "hold", "want"),
    [
        # A restorer logging in a session connected on its owner: held, not told.
        ("session_authenticated", "node-b", ON_A, False, True, HOLD),
        ("qr_code_generated", "node-b", ON_A, False, True, HOLD),
        ("session_authenticated", "node-b", ON_A, False, False, RELAY),  # holding off
        # The owner's own news, or a session not connected anywhere: as it came.
        ("session_authenticated", "node-a", ON_A, False, True, RELAY),
        ("session_authenticated", "node-b", LOGGING_IN_ON_A, False, True, RELAY),
        ("session_authenticated", "node-b", None, False, True, RELAY),
        ("session_ready", "node-b", ON_A, False, True, RELAY),
        # A copy that lost the race drops with CONFLICT: not the account's news.
        ("session_disconnected", "node-b", ON_A, False, True, DROP),
        ("session_disconnected", "node-a", ON_A, False, True, RELAY),
        ("session_disconnected", "node-b", ON_A, True, True, RELAY),  # a logout always goes
        ("message_received", "node-b", ON_A, False, True, RELAY),
        ("session_authenticated", None, ON_A, False, True, RELAY),  # unknown sender
    ],
)
def test_verdict(
    event: str, sender: str | None, owner: Entry | None, logout: bool, hold: bool, want: str
) -> None:
    assert verdict(event, sender, owner, logout=logout, hold=hold) == want


def test_relayed_headers_name_the_router_and_keep_the_origin() -> None:
    given = [
        ("Content-Type", "application/json"),
        ("X-Timestamp", "1700000000"),
        ("X-HMAC-Signature", "ab" * 32),
        ("x-instance-url", "http://localhost:3002"),
    ]
    out = relayed_headers(
        given, instance_url_header="X-Instance-Url", advertise_url="http://r:8080", origin="n2"
    )
    assert out == [
        ("Content-Type", "application/json"),
        ("X-Timestamp", "1700000000"),
        ("X-HMAC-Signature", "ab" * 32),
        ("X-Instance-Url", "http://r:8080"),
        (ORIGIN_INSTANCE_URL, "http://localhost:3002"),
        (ORIGIN_INSTANCE, "n2"),
    ]
    kept = relayed_headers(
        given, instance_url_header="X-Instance-Url", advertise_url=None, origin="n2"
    )
    assert kept == given


def test_held_events_are_released_in_order_or_expire() -> None:
    now = [0.0]
    holding = Holding(10.0, clock=lambda: now[0])

    def held(event: str) -> Held:
        return Held(event, "/p", b"{}", (), 1, now[0])

    holding.hold("s1", "node-b", held("qr_code_generated"))
    now[0] = 1.0
    holding.hold("s1", "node-b", held("session_authenticated"))
    holding.hold("s2", "node-c", held("session_authenticated"))
    assert len(holding) == 3
    assert [h.event for h in holding.release("s1", "node-b")] == [
        "qr_code_generated",
        "session_authenticated",
    ]
    assert holding.release("s1", "node-b") == []
    now[0] = 11.5  # s2's hold is over: dropped, counted
    gone = holding.expire()
    assert [(s, sender, h.event) for s, sender, h in gone] == [
        ("s2", "node-c", "session_authenticated")
    ]
    assert holding.dropped == 1 and len(holding) == 0


def test_a_restorer_refreshing_its_qr_does_not_pile_up_held_events() -> None:
    now = [0.0]
    holding = Holding(10.0, clock=lambda: now[0])
    for n in range(1000):  # a QR every 20 s for 5.5 h: the key itself stays fresh
        now[0] = n * 20.0
        holding.hold("s1", "node-b", Held("qr_code_generated", "/p", b"{}", (), n, now[0]))
    released = holding.release("s1", "node-b")
    assert len(released) == 1 and released[0].timestamp == 999  # only the live one
    for n in range(20):  # a burst within the hold: the latest few are kept
        holding.hold("s2", "node-b", Held("qr_code_generated", "/p", b"{}", (), n, now[0]))
    assert [h.timestamp for h in holding.release("s2", "node-b")] == list(range(12, 20))
