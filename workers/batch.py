"""Data-plane wire types: what the engine hands to stages and what comes back. Struct-only module.

One descriptor, ``Work``, is one stream's part of a forward. The engine builds it, every stage reads it,
stage 0 turns it into latents and the last stage turns the flow into the next step's latents (the ring).
Tensors ride along only where the driver is their source (re-cache of recent clean latents).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CONTEXT = -1
"""Step index of a context (cache-writing) entry: a clean chunk at t=0."""


@dataclass(slots=True)
class ChunkInput:
    """A video-to-video chunk's input, for stage 0: its frames (encoded there, with the stream's causal VAE
    encoder) or, when the chunk starts over (a prompt change, a rebuild), the latents they were encoded to."""

    chunk: int
    noise_scale: float
    """s: the chunk enters step 0 as eps s + z (1 - s)."""
    pixels: torch.Tensor | None = None
    """uint8 frames [N, H, W, 3] at the stream's size (N = 1 + 4 (f - 1) for chunk 0, 4 f after)."""
    latents: torch.Tensor | None = None
    """z [f, C, h, w], float32, once stage 0 has encoded the pixels."""


@dataclass(slots=True)
class Work:
    """One forward of one stream: chunk-sized entries, oldest first."""

    stream_id: str
    epoch: int
    """Bumped when the stream restarts its unfinished chunks; ring latents of older epochs are stale."""
    seed: int
    entries: tuple[tuple[int, int], ...]
    """(chunk index, step index or CONTEXT) per entry."""
    timesteps: tuple[float, ...]
    """Model timestep of each entry."""
    entry_sigmas: tuple[tuple[float, float], ...]
    """Per entry: (sigma of its step, sigma of the next step) for x0 and the re-noise on the last stage."""
    steps: int
    """The stream's denoising steps (an entry at step ``steps - 1`` finishes its chunk)."""
    chunk_frames: int
    commit_frames: int = 0
    """Leading frames whose K/V join the cache (context entries)."""
    reset_cache: bool = False
    """Clear the stream's KV cache before this forward (re-cache)."""
    independent: bool = False
    """Entries attend to the clean cache and themselves only (stream_batch, batch_attention 'clean')."""
    inline: torch.Tensor | None = None
    """[F, C, h, w] float32 latents sent by the driver (re-cache only); None: stage 0 finds them."""
    lane: int = 0
    """Which lane issued it (``SamplerConfig.lanes``; the engine's bookkeeping)."""
    input: ChunkInput | None = None
    """Video-to-video: the input of the chunk entering step 0 in this forward (None: noise, text-to-video)."""

    @property
    def frames(self) -> int:
        return len(self.entries) * self.chunk_frames

    @property
    def offsets(self) -> tuple[int, ...] | None:
        """Independent work: each entry's first temporal position, in frames after the cache (None otherwise:
        entries sit back to back)."""
        if not self.independent:
            return None
        return tuple(i * self.chunk_frames for i in range(len(self.entries)))

    def t(self) -> torch.Tensor:
        """[F] per-frame timesteps."""
        return torch.tensor(self.timesteps, dtype=torch.float32).repeat_interleave(self.chunk_frames)

    def ring_entries(self) -> list[tuple[int, int]]:
        """What the last stage produces from this forward, in order: (chunk, next step) for an entry that
        goes on denoising, (chunk, CONTEXT) for one that finished (its clean x0 is the next context)."""
        return [(c, s + 1 if s + 1 < self.steps else CONTEXT) for c, s in self.entries if s != CONTEXT]

    def finishes(self) -> list[int]:
        """Chunks this forward finishes (their last denoising step)."""
        return [c for c, s in self.entries if s == self.steps - 1]


@dataclass(slots=True)
class MicroBatch:
    """One forward through the pipeline: works of several streams, frames concatenated in order."""

    seq: int
    segments: list[Work]
    grid: tuple[int, int]
    prompts: dict[str, str] = field(default_factory=dict)
    """Prompts of streams whose context changes with this micro-batch (stage 0 encodes and embeds them)."""
    profile: bool = False
    """Stages time each block (feeds the block scheduler)."""
    decode_to: dict[str, int] = field(default_factory=dict)
    """Stream -> the decode worker its finished chunks go to (set by the executor; empty: no decode)."""

    @property
    def frames(self) -> int:
        return sum(s.frames for s in self.segments)

    @property
    def tokens(self) -> int:
        return self.frames * self.grid[0] * self.grid[1]

    def ring_frames(self) -> int:
        """Latent frames the last stage sends back to stage 0 for this micro-batch."""
        return sum(len(w.ring_entries()) * w.chunk_frames for w in self.segments)


@dataclass(slots=True)
class OutputFormat:
    """How a stream's frames are encoded: ``jpeg`` (at ``jpeg_quality``) or ``raw_rgb``."""

    encoding: str = "jpeg"
    jpeg_quality: int = 90


@dataclass(slots=True)
class DecodeJob:
    """One finished chunk for a decode worker: its latents [frames, C, h, w] come from the last stage."""

    stream_id: str
    chunk: int
    frames: int


@dataclass(slots=True)
class DecodedChunk:
    """A finished chunk's video frames, encoded next to the decode: what reaches the orchestrator."""

    stream_id: str
    chunk: int
    frames: list[bytes]
    width: int
    height: int
    decode_s: float
    """Decode plus encode seconds on the decode worker."""


@dataclass(slots=True)
class StageStats:
    """What one stage reports per micro-batch."""

    stage: int
    compute_s: float
    """The forward, plus (stage 0) the VAE encode of this micro-batch's video chunks: the stage's busy time."""
    idle_s: float
    """Time between the end of this stage's previous forward and the start of this one."""
    bytes_sent: int
    """Activation bytes handed to the next stage (the last stage: ring latents back to stage 0)."""
    cache_bytes: int
    """KV + cross-attention cache bytes this stage holds, all streams."""
    tokens: int
    block_s: dict[int, float] = field(default_factory=dict)
    """Per-block seconds, on profiled micro-batches only."""
    gpu_used_bytes: int = 0
    """CUDA memory allocated by this stage's process (0 on CPU)."""
    gpu_reserved_bytes: int = 0
    """CUDA memory reserved by its caching allocator (0 on CPU)."""
    encode_s: float = 0.0
    """Of ``compute_s``: stage 0's VAE encode of the video chunks in ``Finished.encoded``."""


@dataclass(slots=True)
class Finished:
    """What comes back to the driver for one micro-batch: clean latents of the chunks it finished (kept for
    re-cache and checkpoints; their frames come separately, as DecodedChunks from the decode workers)."""

    seq: int
    chunks: list[list[tuple[int, torch.Tensor]]]
    """Per segment (micro-batch order): (chunk, x0 [f, C, h, w] float32 on CPU)."""
    stats: list[StageStats]
    encoded: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    """Video-to-video: stream -> (chunk, z [f, C, h, w]) stage 0 encoded from pixels in this micro-batch."""


@dataclass(slots=True)
class Collected:
    """What an executor's ``collect`` returns: completed micro-batches in submission order, and the chunks
    the decode workers finished since the last call (in order per stream)."""

    finished: list[Finished] = field(default_factory=list)
    decoded: list[DecodedChunk] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.finished or self.decoded)
