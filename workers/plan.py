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
from typing import Callable


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
    """Per-stage forward time vs micro-batch tokens (EWMA fit), decode time per chunk, and what follows.

    Decode workers either share the last stage's device (``decode_shared``: their time per forward adds
    to that stage's) or have their own (``decode_workers`` of them, each one chunk at a time). A
    video-to-video chunk's VAE encode runs on stage 0: it is its own fit, charged only where ``video`` is
    asked for, so a video stream that left does not keep lowering text-to-video capacity."""

    num_stages: int
    decode_workers: int = 0
    decode_shared: bool = True
    decay: float = 0.9
    fits: list[_Fit] = field(default_factory=list)
    decode: _Fit | None = None
    encode: _Fit | None = None

    def __post_init__(self) -> None:
        if not self.fits:
            self.fits = [_Fit(self.decay) for _ in range(self.num_stages)]
        if self.decode is None:
            self.decode = _Fit(self.decay)
        if self.encode is None:
            self.encode = _Fit(self.decay)

    def observe(self, stage: int, tokens: int, seconds: float) -> None:
        """One forward of ``tokens`` on ``stage`` (its video encode excluded: ``observe_encode``)."""
        self.fits[stage].add(float(tokens), float(seconds))

    def observe_decode(self, seconds: float) -> None:
        """One chunk's decode (plus encode) time on a decode worker."""
        self.decode.add(1.0, float(seconds))

    def observe_encode(self, seconds: float) -> None:
        """One video-to-video chunk's VAE encode on stage 0."""
        self.encode.add(1.0, float(seconds))

    @property
    def calibrated(self) -> bool:
        return all(f.n > 0 for f in self.fits)

    def decode_time(self) -> float:
        """Seconds one decode worker spends on a chunk (0 without decode workers)."""
        return self.decode.predict(1.0) if self.decode_workers else 0.0

    def encode_time(self) -> float:
        """Seconds stage 0 spends encoding one video-to-video chunk (0 until one was seen)."""
        return self.encode.predict(1.0)

    def stage_times(self, tokens: int, forwards_per_chunk: float = 1.0, video: bool = False) -> list[float]:
        """Per stage, one forward's time; a shared decode adds its share per forward to the last stage, and
        (``video``) the chunk's encode its share to stage 0."""
        times = [f.predict(tokens) for f in self.fits]
        if self.decode_shared:
            times[-1] += self.decode_time() / forwards_per_chunk
        if video:
            times[0] += self.encode_time() / forwards_per_chunk
        return times

    def tick(self, tokens: int, forwards_per_chunk: float = 1.0, video: bool = False) -> float:
        """Time between micro-batches leaving a full pipeline: the slowest stage."""
        return max(self.stage_times(tokens, forwards_per_chunk, video))

    def forward_latency(self, tokens: int) -> float:
        """One forward through every stage (DiT only)."""
        return sum(f.predict(tokens) for f in self.fits)

    def chunk_latency(self, forwards_per_chunk: float, tokens_per_forward: int, video: bool = False) -> float:
        """Predicted time from a chunk's first forward (its encode, for ``video``) to its frames, pipeline
        otherwise idle."""
        encode = self.encode_time() if video else 0.0
        return encode + forwards_per_chunk * self.forward_latency(tokens_per_forward) + self.decode_time()

    def frame_rate(self, video_frames_per_chunk: float, forwards_per_chunk: float, tokens_per_forward: int,
                   streams_per_batch: int = 1, video: bool = False) -> float:
        """Video frames per second the pipeline sustains over all its streams (all video-to-video for
        ``video``): one micro-batch (the forwards of ``streams_per_batch`` streams) leaves per tick, and
        dedicated decode workers take one chunk each per decode time."""
        size = max(1, streams_per_batch)
        # a micro-batch finishes size / forwards_per_chunk chunks: a shared decode adds theirs to the last stage
        # (and their encodes to stage 0)
        tick = self.tick(size * tokens_per_forward, forwards_per_chunk / size, video)
        if tick <= 0:
            return 0.0
        chunks_per_s = size / (forwards_per_chunk * tick)
        decode = self.decode_time()
        if decode > 0 and not self.decode_shared:
            chunks_per_s = min(chunks_per_s, self.decode_workers / decode)
        return chunks_per_s * video_frames_per_chunk

    def max_streams(self, fps: float, video_frames_per_chunk: float, forwards_per_chunk: float,
                    tokens_per_forward: int, max_batch_streams: int = 1, video: bool = False) -> int:
        """Streams the pipeline sustains at ``fps`` video frames/s each (video-to-video ones for ``video``). n
        streams share micro-batches of ``batch_streams(n, ...)`` streams (the engine's scheduler), which split
        the stages' fixed costs."""
        return streams_at(fps, lambda size: self.frame_rate(video_frames_per_chunk, forwards_per_chunk,
                                                            tokens_per_forward, size, video),
                          self.num_stages, max_batch_streams)


MAX_STREAMS = 4096
"""Most streams ``streams_at`` counts to."""


def streams_at(fps: float, rate: Callable[[int], float], stages: int, max_batch_streams: int) -> int:
    """Streams of ``fps`` video frames/s each a pipeline sustains, where ``rate(size)`` is its frame rate over
    all streams with micro-batches of ``size`` streams: n streams share micro-batches of ``batch_streams(n,
    ...)`` streams (the engine's scheduler), which split the stages' fixed costs."""
    if max_batch_streams <= 1:
        return int(rate(1) / fps)
    n = 0
    while n < MAX_STREAMS and rate(batch_streams(n + 1, stages, max_batch_streams)) >= (n + 1) * fps:
        n += 1
    return n


@dataclass(frozen=True)
class Capacity:
    """A replica's admission figures as plain data, for every step count and stream kind: what a Serve-hosted
    core sends the orchestrator at each probe, so both hosting modes admit by the same arithmetic."""

    frame_rates: dict[tuple[int, bool], tuple[float, ...]]
    """(steps, video-to-video) -> frames/s over all streams at micro-batches of 1..max_batch_streams streams."""
    chunk_latency: dict[tuple[int, bool], float]
    """(steps, video-to-video) -> predicted seconds from a chunk's first forward to its frames."""
    stages: int
    memory_streams: int | None = None
    """Streams whose caches fit on every slot (None: not bounded by memory)."""

    def max_streams(self, fps: float, steps: int, video: bool = False) -> int:
        rates = self.frame_rates.get((steps, video))
        if not rates:
            return 0
        by_time = streams_at(fps, lambda size: rates[size - 1], self.stages, len(rates))
        return by_time if self.memory_streams is None else min(by_time, self.memory_streams)

    def predicted_chunk_latency(self, steps: int, video: bool = False) -> float:
        return self.chunk_latency.get((steps, video), 0.0)


def batch_streams(streams: int, stages: int, max_batch_streams: int) -> int:
    """Streams per micro-batch the engine schedules: enough that P micro-batches in flight carry them all."""
    return max(1, min(max_batch_streams, math.ceil(streams / stages)))
