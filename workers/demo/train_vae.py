"""Phase 1 of ``make train-demo``: the demo VAE (``workers/model/demo_vae.py``) as an autoencoder of the clips.

Each sample is 4 consecutive latent groups of one clip (sometimes the stream's first, frame 0 repeated, and
sometimes with a prompt switch at a group boundary); the last 3 are decoded, each with its predecessor, as the
streaming decoder does. The loss is pixel MSE, weighted up on the object (it covers a few percent of a frame),
with a little noise on the latents so the decoder tolerates the DiT's imprecision. A colour anchor makes
three latent channels regress each cell's mean colour, so colours apart in pixels stay apart in latents.
Afterwards the latents' per-channel mean and std are measured and stored in the VAE, so the DiT sees
normalised latents.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from workers.demo import clips
from workers.model.demo_vae import T_UP, DemoVAE

PROMPTS = clips.all_prompts()


def group_frames(g: int) -> list[int]:
    """Video frame indices of latent g: frame 0 four times for the first, else 4g-3 .. 4g."""
    return [0] * T_UP if g == 0 else list(range(T_UP * g - (T_UP - 1), T_UP * g + 1))


def render_groups(latents: list[int], per_latent: list[clips.Prompt], start: tuple[float, float]) -> torch.Tensor:
    """The frames of latent frames ``latents`` (global indices, non-decreasing) of one clip whose prompt may
    change between latents: [n, 4, 3, H, W], one track throughout."""
    idx = [f for g in latents for f in group_frames(g)]
    prompts = [p for p in per_latent for _ in range(T_UP)]
    frames = clips.render_prompts(torch.tensor(idx), prompts, start)  # [4n, 3, H, W]
    return frames.view(len(latents), T_UP, 3, clips.SIZE, clips.SIZE)


def random_start(gen: torch.Generator) -> tuple[float, float]:
    return tuple((torch.rand(2, generator=gen, dtype=torch.float64) * clips.SIZE).tolist())


def latent_groups(gen: torch.Generator, latents: list[int], switch_prob: float) -> torch.Tensor:
    """Rendered groups [len(latents), 4, 3, H, W] of one random clip, maybe switching prompt at a group boundary."""
    a = PROMPTS[int(torch.randint(len(PROMPTS), (), generator=gen))]
    per_latent = [a] * len(latents)
    if len(latents) > 1 and float(torch.rand((), generator=gen)) < switch_prob:
        b = PROMPTS[int(torch.randint(len(PROMPTS), (), generator=gen))]
        k = int(torch.randint(1, len(latents), (), generator=gen))
        per_latent = [a] * k + [b] * (len(latents) - k)
    return render_groups(latents, per_latent, random_start(gen))


def vae_batch(seed: int, step: int, batch: int, switch_prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups [B, 4, 4, 3, H, W], start [B] bool): groups 1..3 are decoded, group 0 is the predecessor of group 1,
    except at a stream start (``start``: group 1 is latent 0, which has none)."""
    gen = torch.Generator().manual_seed((seed * 999_983 + step) % (2**63 - 1))
    out, starts = [], []
    for _ in range(batch):
        g0 = 0 if float(torch.rand((), generator=gen)) < 0.25 else int(torch.randint(1, 64, (), generator=gen))
        out.append(latent_groups(gen, list(range(g0 - 1, g0 + 3)) if g0 else [0, 0, 1, 2], switch_prob))
        starts.append(g0 == 0)
    return torch.stack(out), torch.tensor(starts)


def cell_colour(groups: torch.Tensor, cells: int) -> torch.Tensor:
    """Groups [G, 4*3, H, W] in [-1, 1] -> each latent cell's mean colour over the group's 4 frames
    [G, 3, cells, cells]."""
    rgb = groups.view(groups.shape[0], T_UP, 3, *groups.shape[2:]).mean(1)  # [G, 3, H, W]
    return F.adaptive_avg_pool2d(rgb, cells)


def vae_loss(vae: DemoVAE, groups: torch.Tensor, start: torch.Tensor, noise: float,
             gen: torch.Generator, colour_anchor: float = 0.0) -> torch.Tensor:
    """groups [B, 4, 4, 3, H, W], start [B] -> weighted reconstruction loss of groups 1..3, plus
    ``colour_anchor`` x the MSE of latent channels 0..2 (un-normalised) against each cell's mean colour."""
    b = groups.shape[0]
    flat = groups.reshape(b * 4, T_UP * 3, clips.SIZE, clips.SIZE)
    z = vae.encode_raw(flat)  # [4B, z, 8, 8]
    anchor = colour_anchor * F.mse_loss(z[:, :3], cell_colour(flat, z.shape[-1])) if colour_anchor else 0.0
    z = z.view(b, 4, vae.z_dim, clips.SIZE // 8, clips.SIZE // 8)
    if noise:
        scale = z.detach().std(dim=(0, 1, 3, 4), keepdim=True)
        z = z + noise * scale * torch.randn(z.shape, generator=gen)
    prev = z[:, :3].clone()
    prev[start, 0] = 0  # the stream's first latent has no predecessor
    out = vae.decode_raw(z[:, 1:].reshape(b * 3, *z.shape[2:]), prev.reshape(b * 3, *z.shape[2:]))
    target = groups[:, 1:].reshape(b * 3 * T_UP, 3, clips.SIZE, clips.SIZE)
    bg = torch.tensor(clips.BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
    weight = 1 + 4 * ((target - bg).abs().sum(1, keepdim=True) > 0.1).float()
    return (weight * (out - target).pow(2)).mean() + 1e-4 * z.pow(2).mean() + anchor


@torch.no_grad()
def measure_latents(vae: DemoVAE, seed: int, clips_n: int = 64) -> None:
    """Set the VAE's per-channel latent mean / std from ``clips_n`` random clips (4 groups each)."""
    zs = [vae.encode_raw(vae_batch(seed + 1, i, 8)[0].reshape(-1, T_UP * 3, clips.SIZE, clips.SIZE))
          for i in range(math.ceil(clips_n / 8))]
    z = torch.cat(zs)  # [N, z, h, w]
    vae.latent_mean.copy_(z.mean(dim=(0, 2, 3)))
    vae.latent_std.copy_(z.std(dim=(0, 2, 3)).clamp_min(1e-3))


@torch.no_grad()
def colour_distances(vae: DemoVAE, frames: int = 17) -> dict[str, float]:
    """RMS distance between the normalised latents of same-track clips that differ only in colour, per colour
    pair ("red-yellow": ...), averaged over both shapes and the four directions. The DiT's x0 loss pays
    little for confusing a pair that is close here."""
    names = list(clips.COLOURS)
    z = {c: torch.stack([vae.encode(clips.clip(clips.Prompt(c, s, d), 7, frames))
                         for s in clips.SHAPES for d in clips.DIRECTIONS]) for c in names}
    return {f"{a}-{b}": float((z[a] - z[b]).pow(2).mean().sqrt())
            for i, a in enumerate(names) for b in names[i + 1:]}


@torch.no_grad()
def reconstruct(vae: DemoVAE, video: torch.Tensor) -> torch.Tensor:
    """Video [1 + 4k, 3, H, W] -> its reconstruction through encode and streaming decode (one call)."""
    return vae.decode_chunk(vae.encode(video), vae.new_state())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frames in [-1, 1]."""
    return float(10 * torch.log10(4 / F.mse_loss(a, b)))
