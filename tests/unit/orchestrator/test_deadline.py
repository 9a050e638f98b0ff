"""Pacing and deadlines with a fake clock."""

import pytest

from orchestrator.clock import FakeClock
from orchestrator.deadline import Pacer
from orchestrator.types import FrameOutcome, LatePolicy


def test_frames_due_at_t_first_plus_k_over_fps():
    clock = FakeClock()
    p = Pacer(10.0, LatePolicy.DROP)
    first = p.place(0, clock.now())
    assert first.send_at == clock.now() and first.deadline_met
    for k in range(1, 5):  # a chunk's frames all ready now: sent one interval apart, never in a burst
        placed = p.place(k, clock.now())
        assert placed.send_at == pytest.approx(clock.now() + k * 0.1)
        assert placed.deadline_met and placed.outcome is FrameOutcome.DELIVERED


@pytest.mark.parametrize("policy,outcome,sent", [(LatePolicy.DROP, FrameOutcome.DROPPED_DEADLINE, False),
                                                 (LatePolicy.DELIVER_FLAGGED, FrameOutcome.LATE, True)])
def test_late_frames_follow_the_policy_and_stalls_re_anchor(policy, outcome, sent):
    clock = FakeClock()
    p = Pacer(10.0, policy)
    p.place(0, clock.now())
    clock.advance(0.15)  # frame 1 was due at +0.1: late by half an interval, no re-anchor
    late = p.place(1, clock.now())
    assert late.outcome is outcome and not late.deadline_met and not late.reanchored
    assert (late.send_at is not None) == sent
    clock.advance(0.5)  # frame 2 was due at +0.2, now +0.65: a stall
    stalled = p.place(2, clock.now())
    assert stalled.reanchored and stalled.outcome is outcome
    assert stalled.lost == 4  # due at +0.2, ready at +0.65: four whole intervals passed
    # after the stall frames are due one interval apart from now: no burst
    nxt = [p.place(k, clock.now()) for k in (3, 4, 5)]
    assert [n.send_at for n in nxt] == pytest.approx([clock.now() + 0.1 * i for i in (1, 2, 3)])
    assert all(n.deadline_met for n in nxt)


def test_resume_after_pause_does_not_burst():
    clock = FakeClock()
    p = Pacer(20.0, LatePolicy.DROP)
    p.place(0, clock.now())
    clock.advance(5.0)  # paused for 5 s
    p.resume(1, clock.now())
    a, b = p.place(1, clock.now()), p.place(2, clock.now())
    assert a.deadline_met and b.send_at - a.send_at == pytest.approx(0.05)


def test_wall_clock_is_not_used_for_deadlines(monkeypatch):
    import time

    clock = FakeClock()
    p = Pacer(10.0, LatePolicy.DROP)
    p.place(0, clock.now())
    monkeypatch.setattr(time, "time", lambda: 1e12)  # a wall-clock jump changes nothing
    assert p.place(1, clock.now()).send_at == pytest.approx(clock.now() + 0.1)
