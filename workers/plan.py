"""Pipeline plans, the block scheduler and the latency model.

* ``balanced_split``: the exact minimiser of the slowest stage over contiguous block splits (dynamic
  programming, O(P N^2)), from measured per-block costs plus the embedding cost of the first stage and
  the head (+ decode) cost of the last.
* ``LatencyModel``: per-stage EWMA fit of forward time against micro-batch tokens; predicts per-chunk
  latency and the streams a pipeline sustains. Admission and the planner use the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def stage_costs(split: list[tuple[int, int]], block_costs: list[float], first_extra: float = 0.0,
                last_extra: float = 0.0) -> list[float]:
    costs = [sum(block_costs[a:b]) for a, b in split]
    costs[0] += first_extra
    costs[-1] += last_extra
    return costs


def balanced_split(block_costs: list[float], stages: int, first_extra: float = 0.0,
                   last_extra: float = 0.0) -> list[tuple[int, int]]:
    """Contiguous, non-empty block ranges [a, b) for ``stages`` stages minimising the slowest stage.

    Exact: dynamic programming over (stages used, blocks covered). Ties go to the split whose earlier
    stages are longest, so the result is deterministic.
    """
    n = len(block_costs)
    if stages < 1 or stages > n:
        raise ValueError(f"cannot split {n} blocks over {stages} stages (each stage needs a block)")
    if any(c < 0 or not math.isfinite(c) for c in block_costs):
        raise ValueError("block costs must be finite and non-negative")
    prefix = [0.0]
    for c in block_costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, a: int, b: int) -> float:
        c = prefix[b] - prefix[a]
        if stage == 0:
            c += first_extra
        if stage == stages - 1:
            c += last_extra
        return c

    inf = float("inf")
    # best[p][i]: minimal slowest-stage cost covering blocks [0, i) with stages 0..p-1
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for p in range(1, stages + 1):
        for i in range(p, n - (stages - p) + 1):
            for j in range(i - 1, p - 2, -1):  # stage p-1 holds [j, i)
                if best[p - 1][j] == inf:
                    continue
                value = max(best[p - 1][j], cost(p - 1, j, i))
                if value < best[p][i] - 1e-12:
                    best[p][i], cut[p][i] = value, j
    split, i = [], n
    for p in range(stages, 0, -1):
        j = cut[p][i]
        split.append((j, i))
        i = j
    return split[::-1]


def even_split(num_blocks: int, stages: int) -> list[tuple[int, int]]:
    """Block counts differing by at most one, larger first (the split used before any cost is measured)."""
    if stages < 1 or stages > num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks over {stages} stages (each stage needs a block)")
    base, extra = divmod(num_blocks, stages)
    bounds = [0]
    for s in range(stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass
class _Fit:
    """Exponentially weighted least squares of y = a + b x."""

    decay: float
    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.n = d * self.n + 1
        self.sx = d * self.sx + x
        self.sy = d * self.sy + y
        self.sxx = d * self.sxx + x * x
        self.sxy = d * self.sxy + x * y

    def predict(self, x: float) -> float:
        if self.n == 0:
            return 0.0
        mean_x, mean_y = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mean_x ** 2
        if var <= 1e-9 * max(1.0, mean_x ** 2):  # one batch size seen so far: proportional model
            return mean_y * (x / mean_x) if mean_x > 0 else mean_y
        slope = max(0.0, (self.sxy / self.n - mean_x * mean_y) / var)
        return max(0.0, mean_y + slope * (x - mean_x))


@dataclass
class LatencyModel:
    """Per-stage forward time vs micro-batch tokens (EWMA fit), and what follows from it."""

    num_stages: int
    decay: float = 0.9
    fits: list[_Fit] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.fits:
            self.fits = [_Fit(self.decay) for _ in range(self.num_stages)]

    def observe(self, stage: int, tokens: int, seconds: float) -> None:
        self.fits[stage].add(float(tokens), float(seconds))

    @property
    def calibrated(self) -> bool:
        return all(f.n > 0 for f in self.fits)

    def stage_times(self, tokens: int) -> list[float]:
        return [f.predict(tokens) for f in self.fits]

    def tick(self, tokens: int) -> float:
        """Time between micro-batches leaving a full pipeline: the slowest stage."""
        return max(self.stage_times(tokens))

    def forward_latency(self, tokens: int) -> float:
        """One forward through every stage."""
        return sum(self.stage_times(tokens))

    def chunk_latency(self, forwards_per_chunk: float, tokens_per_forward: int) -> float:
        """Predicted time from a chunk's first forward to its clean latents, pipeline otherwise idle."""
        return forwards_per_chunk * self.forward_latency(tokens_per_forward)

    def frame_rate(self, video_frames_per_chunk: float, forwards_per_chunk: float, tokens_per_forward: int) -> float:
        """Video frames per second the pipeline sustains over all its streams: one forward leaves per tick."""
        tick = self.tick(tokens_per_forward)
        if tick <= 0:
            return 0.0
        chunks_per_s = 1.0 / (forwards_per_chunk * tick)
        return chunks_per_s * video_frames_per_chunk

    def max_streams(self, fps: float, video_frames_per_chunk: float, forwards_per_chunk: float,
                    tokens_per_forward: int) -> int:
        """Streams the pipeline sustains at ``fps`` video frames/s each."""
        return int(self.frame_rate(video_frames_per_chunk, forwards_per_chunk, tokens_per_forward) / fps)
