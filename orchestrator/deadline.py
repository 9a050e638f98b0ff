"""Per-stream output pacing and deadlines (monotonic clock).

Frame k of a text-to-video stream is due at t_first + k / fps, where t_first is when the first frame
was ready. A frame ready before its due time is sent at it; a late one is dropped or sent flagged
(late policy). When a frame is later than ``stall_frames`` intervals, the schedule re-anchors so the
next frame is due one interval after now: output resumes at fps, never in a burst.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.types import FrameOutcome, LatePolicy


@dataclass(frozen=True)
class Placement:
    send_at: float | None
    """Monotonic time to send; None = drop."""
    due: float
    deadline_met: bool
    outcome: FrameOutcome
    reanchored: bool = False
    lost: int = 0
    """Frame slots that passed with nothing to show (a stall): counted as lost frames."""


class Pacer:
    def __init__(self, fps: float, late_policy: LatePolicy, stall_frames: float = 1.0):
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.interval = 1.0 / fps
        self.policy = late_policy
        self.stall = stall_frames * self.interval
        self.anchor: float | None = None  # due time of frame `anchor_index`
        self.anchor_index = 0
        self.reanchors = 0

    def due(self, index: int) -> float:
        return self.anchor + (index - self.anchor_index) * self.interval

    def place(self, index: int, ready_at: float) -> Placement:
        """Decide when (or whether) frame ``index``, ready at ``ready_at``, goes out. ``index`` counts
        every generated frame, dropped ones included (a dropped frame's slot is not reused)."""
        if self.anchor is None:  # the first frame defines t_first
            self.anchor, self.anchor_index = ready_at, index
        due = self.due(index)
        if ready_at <= due:
            return Placement(due, due, True, FrameOutcome.DELIVERED)
        reanchored = ready_at - due > self.stall
        lost = 0
        if reanchored:  # a stall: later frames are due from now on, one interval apart
            lost = int((ready_at - due) / self.interval)
            self.anchor, self.anchor_index = ready_at + self.interval, index + 1
            self.reanchors += 1
        if self.policy is LatePolicy.DROP:
            return Placement(None, due, False, FrameOutcome.DROPPED_DEADLINE, reanchored, lost)
        return Placement(ready_at, due, False, FrameOutcome.LATE, reanchored, lost)

    def resume(self, index: int, now: float) -> None:
        """After a pause: frame ``index`` is due one interval from now (no burst)."""
        self.anchor, self.anchor_index = now + self.interval, index


class PlayoutPacer:
    """Video-to-video output timing: frame k restyles an input that arrived at a_k and is due at a_k + budget.
    It goes out at a_k + D, D the playout delay: the most any frame so far needed (ready - arrival), eased
    back by ``decay`` of an interval per frame, so output keeps the input's cadence (subsampled to the
    stream's fps at ingress) without bursts, and a late frame is dropped or flagged (late policy)."""

    def __init__(self, fps: float, budget_s: float, late_policy: LatePolicy, decay: float = 0.01):
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.interval, self.budget, self.policy = 1.0 / fps, budget_s, late_policy
        self.decay = decay * self.interval
        self.delay: float | None = None
        self.last_send = float("-inf")

    def place(self, arrival: float, ready_at: float) -> Placement:
        due = arrival + self.budget
        if ready_at > due:
            if self.policy is LatePolicy.DROP:
                return Placement(None, due, False, FrameOutcome.DROPPED_DEADLINE)
            self.last_send = ready_at
            return Placement(ready_at, due, False, FrameOutcome.LATE)
        need = ready_at - arrival
        self.delay = need if self.delay is None else max(need, self.delay - self.decay)
        send = max(ready_at, arrival + min(self.delay, self.budget), self.last_send)
        self.last_send = send
        return Placement(send, due, True, FrameOutcome.DELIVERED)
