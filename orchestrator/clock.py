"""Clocks: monotonic time for deadlines, wall time only for display. Tests inject FakeClock."""

from __future__ import annotations

import time


class Clock:
    def now(self) -> float:
        """Monotonic seconds."""
        return time.monotonic()

    def wall_ns(self, at: float | None = None) -> int:
        """Wall-clock ns for display; ``at`` converts a monotonic instant."""
        offset = time.time_ns() - int(time.monotonic() * 1e9)
        return offset + int((self.now() if at is None else at) * 1e9)


class FakeClock(Clock):
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0):
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def wall_ns(self, at: float | None = None) -> int:
        return int((self.t if at is None else at) * 1e9)
