"""Replica autoscaling policy (torch-free, tested with a fake clock).

Scale on the admitted streams' utilisation (sum of 1 / max_streams per stream, per replica, from the
latency model) against a target: up when the fleet has stayed above it for ``upscale_delay_s`` or a
stream was refused for capacity; down when it has stayed below the target of one fewer replica for
``downscale_delay_s``. Scale-down picks the least loaded replica and drains it: it takes no new
streams and is removed once its last stream ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import AutoscalingConfig


@dataclass(frozen=True)
class ScaleDecision:
    delta: int  # +1, -1 or 0
    drain: int | None = None  # replica position to drain on -1


class AutoscalePolicy:
    def __init__(self, cfg: AutoscalingConfig):
        self.cfg = cfg
        self._above_since: float | None = None
        self._below_since: float | None = None

    def decide(self, now: float, loads: list[float], starting: int = 0, refused: bool = False) -> ScaleDecision:
        """``loads``: utilisation of each serving (not draining) replica; ``starting``: replicas being built."""
        n = len(loads) + starting
        total = sum(loads)
        target = self.cfg.target_utilisation
        if n < self.cfg.min_replicas:
            return ScaleDecision(+1)
        if starting:
            self._above_since = self._below_since = None
            return ScaleDecision(0)
        over = refused or (loads and total > target * n)
        self._above_since = (self._above_since if self._above_since is not None else now) if over else None
        under = n > self.cfg.min_replicas and total <= target * (n - 1)
        self._below_since = (self._below_since if self._below_since is not None else now) if under else None
        if over and n < self.cfg.max_replicas and (refused or now - self._above_since >= self.cfg.upscale_delay_s):
            self._above_since = None
            return ScaleDecision(+1)
        if under and now - self._below_since >= self.cfg.downscale_delay_s:
            self._below_since = None
            return ScaleDecision(-1, drain=min(range(len(loads)), key=lambda i: (loads[i], -i)))
        return ScaleDecision(0)
