"""The outbox's events on their own: a relay pass coalesces a packet's redundant ``sent``
states and never a money event (node/outbox.py ``coalesce``). No stores: the relay's
delivery of what is kept is tested through nodes in test_history.py."""

from __future__ import annotations

from typing import Any

from redpacket.node.outbox import RECEIVED, SENT, Event, coalesce


def _sent(opened: int, refunded: int = 0, uid: int = 7, pid: int = 100) -> Event:
    payload: dict[str, Any] = {"opened_packet": opened, "refunded_amount": refunded}
    if refunded:
        payload["credit"] = True
    return (uid, SENT, pid, payload)


def _received(uid: int, pid: int = 100) -> Event:
    return (uid, RECEIVED, pid, {"amount": 5, "time": 1, "credit": True})


def test_the_most_advanced_sent_state_of_a_packet_stands_for_the_others() -> None:
    events = {1: _sent(1), 2: _received(11), 3: _sent(3), 4: _received(12), 5: _sent(2)}
    kept, stands_for = coalesce(events)
    assert sorted(kept) == [2, 3, 4]  # every share, and the packet's latest state
    assert sorted(stands_for[3]) == [1, 5]


def test_each_packet_and_sender_keeps_its_own_latest_state() -> None:
    events = {1: _sent(1, pid=100), 2: _sent(1, pid=200), 3: _sent(2, pid=100)}
    kept, stands_for = coalesce(events)
    assert sorted(kept) == [2, 3]
    assert stands_for == {3: [1]}


def test_a_refund_is_never_coalesced_away() -> None:
    events = {1: _sent(4, refunded=60), 2: _sent(4, refunded=60), 3: _sent(2)}
    kept, stands_for = coalesce(events)
    assert sorted(kept) == [1, 2]  # both money events go (the wallet posts one, by reference)
    assert stands_for == {2: [3]}


def test_a_malformed_sent_event_is_kept_for_its_destination_to_refuse() -> None:
    events: dict[int, Event] = {1: (7, SENT, 100, {"opened_packet": "x"}), 2: _sent(1)}
    kept, stands_for = coalesce(events)
    assert sorted(kept) == [1, 2]
    assert stands_for == {}
