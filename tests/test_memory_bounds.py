"""The in-memory caches of finished packets are bounded by winners held, not just packets:
a sold-out packet can carry a hundred winners, so a packet count alone bounds nothing."""

from __future__ import annotations

import time

from redpacket.gateway.finished import FinishedPackets
from redpacket.node.admission import Admission


def winners(n: int, base: int = 0) -> dict[int, int]:
    return {base + uid: 1 for uid in range(n)}


def test_the_gateway_forgets_the_oldest_finished_packets_past_its_winner_budget() -> None:
    memory = FinishedPackets(max_entries=1000, ttl_s=60, max_winners=250)
    for packet_id in range(1, 11):
        memory.remember(packet_id, "sold_out", winners(100))
    kept = [pid for pid in range(1, 11) if memory.get(pid) is not None]
    assert kept == [9, 10]
    memory.remember(10, "sold_out", winners(100))  # remembering again does not double-count
    memory.remember(11, "sold_out", winners(50))
    assert [pid for pid in range(1, 12) if memory.get(pid) is not None] == [9, 10, 11]


def test_the_gateway_forgets_expired_entries() -> None:
    memory = FinishedPackets(max_entries=10, ttl_s=-1, max_winners=100)
    memory.remember(1, "expired", winners(10))
    assert memory.get(1) is None


def test_expired_entries_leave_as_new_ones_come_even_if_nobody_asks_for_them() -> None:
    memory = FinishedPackets(max_entries=1000, ttl_s=0.05, max_winners=10_000)
    for packet_id in range(1, 101):  # the crowd's packets: sold out, never asked about again
        memory.remember(packet_id, "sold_out", winners(10))
    time.sleep(0.06)
    memory.remember(101, "sold_out", winners(10))
    assert len(memory) == 1  # the hundred expired ones are gone, not waiting for a read
    assert memory.get(101) is not None


def test_node_admission_evicts_idle_gates_past_its_winner_budget_but_never_busy_ones() -> None:
    admission = Admission(max_gates=1000, max_winners=250)
    busy = admission.gate(1)
    busy.inflight = 1  # an open is running on this packet
    admission.remember_winners(1, busy, winners(100))
    for packet_id in range(2, 7):
        admission.remember_winners(packet_id, admission.gate(packet_id), winners(100))
    assert admission.peek(1) is busy
    assert [pid for pid in range(2, 7) if admission.peek(pid) is not None] == [6]
    admission.forget(6)
    admission.remember_winners(7, admission.gate(7), winners(100))
    assert admission.peek(7) is not None and admission.peek(1) is busy
