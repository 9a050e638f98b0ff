"""What the engine hands to stages: micro-batch descriptors and per-stage stats (data-plane wire types)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SegmentSpec:
    """One stream's part of a micro-batch."""

    stream_id: str
    frames: int
    block_frames: int
    commit_frames: int = 0
    reset_cache: bool = False
    steps: tuple[int, ...] = ()
    independent: bool = False
    """Entries attend to the cache and themselves only (see Segment.independent)."""
    offsets: tuple[int, ...] | None = None
    """Independent segments: each entry's first position in frames after the cache (see Segment.offsets)."""
    """Denoising step index of each chunk-sized entry, -1 for context entries (routes step-split plans)."""


@dataclass
class MicroBatch:
    """One forward through the pipeline: segments of several streams, frames concatenated in order."""

    seq: int
    segments: list[SegmentSpec]
    grid: tuple[int, int]
    latents: torch.Tensor
    """[F, C, h, w] float32, stage 0's input."""
    t: torch.Tensor
    """[F] per-frame timesteps."""
    texts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Text-encoder output [L, text_dim] of streams whose prompt changes with this micro-batch."""
    profile: bool = False
    """Stages time each block (feeds the block scheduler)."""

    @property
    def frames(self) -> int:
        return sum(s.frames for s in self.segments)

    @property
    def tokens(self) -> int:
        return self.frames * self.grid[0] * self.grid[1]


@dataclass
class StageStats:
    """What one stage reports per micro-batch."""

    stage: int
    compute_s: float
    idle_s: float
    """Time between the end of this stage's previous forward and the start of this one."""
    bytes_sent: int
    """Activation bytes handed to the next stage (0 on the last)."""
    cache_bytes: int
    """KV + cross-attention cache bytes this stage holds, all streams."""
    tokens: int
    block_s: dict[int, float] = field(default_factory=dict)
    """Per-block seconds, on profiled micro-batches only."""
