"""Per-stream state machine (torch-free): admitted -> running <-> paused -> ended, exactly one end reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from orchestrator.types import EndReason, FrameOutcome, StreamSpec


class State(str, Enum):
    ADMITTED = "admitted"
    RUNNING = "running"
    PAUSED = "paused"
    ENDED = "ended"


@dataclass
class Session:
    stream_id: str
    spec: StreamSpec
    replica: int
    utilisation: float
    started: float
    state: State = State.ADMITTED
    end_reason: EndReason | None = None
    next_index: int = 0
    prompt_revision: int = 0
    first_frame_at: float | None = None
    last_frame_at: float | None = None
    outcomes: dict[FrameOutcome, int] = field(default_factory=dict)

    def count(self, outcome: FrameOutcome, n: int = 1) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + n

    def on_frame(self, now: float) -> None:
        if self.state is State.ADMITTED:
            self.state = State.RUNNING
            self.first_frame_at = now
        self.last_frame_at = now
        self.next_index += 1

    def pause(self) -> None:
        if self.state in (State.ADMITTED, State.RUNNING):
            self.state = State.PAUSED

    def resume(self) -> None:
        if self.state is State.PAUSED:
            self.state = State.RUNNING if self.first_frame_at is not None else State.ADMITTED

    def end(self, reason: EndReason) -> bool:
        """Record the end; False if it had already ended (the first reason stands)."""
        if self.state is State.ENDED:
            return False
        self.state, self.end_reason = State.ENDED, reason
        return True

    @property
    def done(self) -> bool:
        return self.spec.max_frames > 0 and self.next_index >= self.spec.max_frames
