"""Video-to-video: the motion-aware noise controller and the stochastic similarity filter (REFERENCE §1.7,
§3 B.3), per stream. Both look at input pixels in [-1, 1], chunk by chunk, and are deterministic for a seed,
so the pipeline engine and the single-process reference make the same decisions.

* ``NoiseController``: how much noise a chunk's latents get, s in (0, 1], from its motion:
  d_f = sqrt(mean((x_f - x_{f-1})^2)) per frame (the previous chunk's last frame included),
  d = clamp(max_f d_f / 0.2, 0, 1), s = 0.9 (s_init - 0.1 d) + 0.1 s_prev. More motion, less noise.
  The chunk's first denoising step is then int(1000 s) - 100 and its noisy latents eps s + z (1 - s).
* ``SimilarityFilter``: a chunk whose cosine similarity to the last processed chunk is above the threshold is
  skipped with probability max(0, 1 - (1 - cos) / (1 - threshold)) (at most ``max_skips`` in a row); its
  output is the previous chunk's, re-emitted, and no denoising runs.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

import torch

from workers.config import SamplerConfig

MOTION_SCALE = 0.2
"""Per-frame RMS difference that counts as full motion (d = 1)."""
MOTION_RANGE = 0.1
"""How far motion lowers s below s_init."""
EMA = 0.9
"""Weight of the new value in s's exponential moving average."""
DEFAULT_NOISE_SCALE = 0.7
MAX_SKIPS = 10


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [N, H, W, 3] -> float pixels [N, 3, H, W] in [-1, 1]."""
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def first_step(noise_scale: float) -> float:
    """The chunk's first denoising step (before warping): int(1000 s) - 100."""
    return float(int(1000 * noise_scale) - 100)


@dataclass
class NoiseController:
    """Per-stream noise scale; ``motion_aware`` off keeps s at ``s_init``."""

    s_init: float = DEFAULT_NOISE_SCALE
    motion_aware: bool = True
    s_prev: float | None = None
    last_frame: torch.Tensor | None = None
    """The previous chunk's last frame [3, H, W] in [-1, 1]."""

    def motion(self, pixels: torch.Tensor) -> float:
        """d in [0, 1] for a chunk's pixels [N, 3, H, W] in [-1, 1]."""
        frames = pixels if self.last_frame is None else torch.cat((self.last_frame[None], pixels))
        if frames.shape[0] < 2:
            return 0.0
        diffs = (frames[1:].double() - frames[:-1].double()).pow(2).mean(dim=(1, 2, 3)).sqrt()  # [N]
        return min(max(float(diffs.max()) / MOTION_SCALE, 0.0), 1.0)

    def next(self, pixels: torch.Tensor) -> float:
        """The noise scale of the chunk ``pixels`` [N, 3, H, W] in [-1, 1]; the controller moves on."""
        if self.motion_aware:
            target = self.s_init - MOTION_RANGE * self.motion(pixels)
            s = target if self.s_prev is None else EMA * target + (1 - EMA) * self.s_prev
        else:
            s = self.s_init
        self.s_prev, self.last_frame = s, pixels[-1].clone()
        return s


@dataclass
class SimilarityFilter:
    """Per-stream skip decisions (``threshold`` 0: off), drawn from a generator seeded per stream."""

    threshold: float = 0.0
    seed: int = 0
    max_skips: int = MAX_SKIPS
    skips: int = 0
    previous: torch.Tensor | None = None
    _gen: torch.Generator | None = None

    def skip(self, pixels: torch.Tensor) -> bool:
        """Whether the chunk ``pixels`` [N, 3, H, W] (in [-1, 1]) is skipped; a processed one becomes the
        reference for the next."""
        if self.threshold <= 0 or self.previous is None or self.previous.shape != pixels.shape:
            return self._process(pixels)
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed * 2654435761 % (2 ** 63))
        cos = float(torch.nn.functional.cosine_similarity(self.previous.flatten().double(),
                                                          pixels.flatten().double(), dim=0))
        skip_prob = 0.0 if self.threshold >= 1 else max(0.0, 1 - (1 - cos) / (1 - self.threshold))
        u = float(torch.rand((), generator=self._gen, dtype=torch.float64))
        if skip_prob < u or self.skips >= self.max_skips:
            return self._process(pixels)
        self.skips += 1
        return True

    def _process(self, pixels: torch.Tensor) -> bool:
        self.previous, self.skips = pixels.clone(), 0
        return False


@dataclass(frozen=True)
class VideoParams:
    """A video-to-video stream's input settings (TransformConfig)."""

    noise_scale: float = DEFAULT_NOISE_SCALE
    motion_aware: bool = True
    similarity_threshold: float = 0.0


class VideoInput:
    """A video-to-video stream's input side, shared by the engine and the single-process reference: each input
    chunk is skipped by the similarity filter (its output: the previous one again) or gets its noise scale
    from the controller and becomes the sampling program's next chunk. ``release`` hands outputs back in
    input order, a skipped chunk's after the one it repeats."""

    def __init__(self, params: VideoParams, seed: int, chunk_frames: int, frames_per_latent: int = 4):
        self.controller = NoiseController(params.noise_scale, params.motion_aware)
        self.filter = SimilarityFilter(params.similarity_threshold, seed)
        self.f, self.t = chunk_frames, frames_per_latent
        self.order: deque[tuple[object, int | None, int]] = deque()  # (meta, program chunk or None: skipped, frames)
        self.received = 0
        self.last = None  # the last output released (what a skipped chunk shows)

    def frames_needed(self, index: int | None = None) -> int:
        """Input frames of input chunk ``index`` (default: the next): 1 + 4 (f - 1) for the first (the causal
        VAE encodes the first frame alone; output frames then match input frames one to one), 4 f after."""
        index = self.received if index is None else index
        return 1 + self.t * (self.f - 1) if index == 0 else self.t * self.f

    def push(self, frames: torch.Tensor, meta, program) -> int | None:
        """uint8 frames [N, H, W, 3] of the next input chunk -> the program chunk it became (None: skipped)."""
        if frames.shape[0] != self.frames_needed():
            raise ValueError(f"input chunk {self.received} needs {self.frames_needed()} frames, got {frames.shape[0]}")
        self.received += 1
        pixels = to_unit(frames)
        chunk = None
        if not self.filter.skip(pixels):
            chunk = program.add_input(self.controller.next(pixels), frames)
        self.order.append((meta, chunk, frames.shape[0]))
        return chunk

    def release(self, done: dict) -> list[tuple[object, object, bool, int]]:
        """(meta, output, repeated, input frames) in input order, for every input chunk whose output exists:
        ``done`` maps a program chunk to its output (entries are taken out); a skipped chunk shows the last
        output again."""
        out = []
        while self.order:
            meta, chunk, frames = self.order[0]
            if chunk is None:
                if self.last is None:
                    break
                out.append((meta, self.last, True, frames))
            elif chunk in done:
                self.last = done.pop(chunk)
                out.append((meta, self.last, False, frames))
            else:
                break
            self.order.popleft()
        return out


def video_sampler(sampler: SamplerConfig, steps: int) -> SamplerConfig:
    """A video-to-video stream's sampler: the first ``steps`` entries of ``v2v_steps`` (evenly spaced from its
    first when it has fewer); the controller replaces each chunk's first step."""
    base = sampler.v2v_steps
    chosen = base[:steps] if steps <= len(base) else tuple(base[0] * (steps - i) / steps for i in range(steps))
    return dataclasses.replace(sampler, denoising_steps=chosen)
