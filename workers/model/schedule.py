"""Few-step flow-matching math (REFERENCE §2 A.6): shifted sigma table, warped step list, x0, re-noise,
and the per-(seed, chunk, step) noise every executor draws identically."""

from __future__ import annotations

import torch

from workers.config import SamplerConfig


class FlowMatchSchedule:
    """Sigma table of ``FlowMatchScheduler(shift=S, sigma_min=0, extra_one_step=True)`` at 1000 steps."""

    def __init__(self, cfg: SamplerConfig):
        self.cfg = cfg
        raw = torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1]  # 1.000 .. 0.001
        s = float(cfg.shift)
        self.sigmas = s * raw / (1 + (s - 1) * raw)  # [1000], descending
        self.table = 1000.0 * self.sigmas  # timesteps [1000]
        self.timesteps: list[float] = [self.timestep_of(step) for step in cfg.denoising_steps]

    def timestep_of(self, step: float) -> float:
        """The model timestep of a step-list entry: the shifted table's entry when warping (warp_denoising_step)."""
        if not self.cfg.warp:
            return float(step)
        index = int(1000 - step)  # truncates as (1000 - steps).long() does
        return float(self.table[index]) if index < 1000 else 0.0

    def sigma(self, t: float) -> float:
        """sigma of the table entry nearest to timestep t."""
        return float(self.sigmas[torch.argmin((self.table - t).abs())])

    def step_sigmas(self) -> list[float]:
        return [self.sigma(t) for t in self.timesteps]


def to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 = x_t - sigma * v, computed in float64 (as Self-Forcing's wrapper), returned in x_t's dtype."""
    return (x_t.double() - sigma * flow.double()).to(x_t.dtype)


def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """x_t' = (1 - sigma') x0 + sigma' eps."""
    return ((1 - sigma) * x0.double() + sigma * noise.double()).to(x0.dtype)


def chunk_noise(seed: int, chunk: int, step: int, shape: tuple[int, ...],
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gaussian noise for (stream seed, chunk index, step index): step 0 is the chunk's initial noise,
    step i > 0 re-noises to step i. Counter-based, so any executor and any interleaving of streams
    draws the same numbers, and a stream can resume on another replica from (seed, chunk) alone. (CPU and
    CUDA generators differ: a stream's numbers are the same on every device of one kind.)"""
    # The odd offset keeps (seed 0, chunk 0, step 0) off generator seed 0, which weight initialisation uses
    # (init_seed): a stream's first noise would otherwise replay the model's initial weights.
    key = (int(seed) * 0x9E3779B97F4A7C15 + int(chunk) * 0xBF58476D1CE4E5B9 + int(step) * 0x94D049BB133111EB
           + 0xD1B54A32D192ED03)
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(key % (2**63 - 1))  # drawn on the device: no host copy
    return torch.randn(shape, generator=gen, dtype=torch.float32, device=device).to(dtype)
