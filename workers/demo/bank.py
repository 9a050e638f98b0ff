"""Every latent frame the DiT trains on, encoded once (phase 2 of ``make train-demo`` then costs no VAE work).

A latent frame is a group of 4 video frames of one prompt's object moving steadily from a start position, or
the stream's first latent (frame 0 four times: ``static``). The demo VAE pads circularly, so shifting the
frames by a whole 8 px cell shifts the latents by one cell exactly: the bank holds the 4 x 4 sub-cell start
positions (on a 2 px grid: the speed is 2 px per frame) of each prompt and kind, and a lookup rolls them.
"""

from __future__ import annotations

import torch

from workers.demo import clips
from workers.model.demo_vae import T_UP, DemoVAE

GRID = 2
"""Start positions lie on this pixel grid (the object's speed is a multiple of it)."""
CELL = 8
"""Pixels per latent cell (the VAE's spatial stride)."""
SUB = CELL // GRID
PROMPTS = clips.all_prompts()


class LatentBank:
    """Normalised latents [32 prompts, 2 kinds (moving, static), SUB y, SUB x, z, h, w] at sub-cell starts."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    @classmethod
    @torch.no_grad()
    def build(cls, vae: DemoVAE) -> LatentBank:
        ys, xs = torch.meshgrid(torch.arange(SUB) * GRID, torch.arange(SUB) * GRID, indexing="ij")
        starts = torch.stack((xs.flatten(), ys.flatten()), -1).double()  # [SUB^2, 2] (x, y)
        out = []
        for p in PROMPTS:
            dx, dy = clips.DIRECTIONS[p.direction]
            step = torch.tensor((dx, dy), dtype=torch.float64) * clips.SPEED
            kinds = []
            for kind in (0, 1):  # moving: frames k = 0..3 along the track; static: the start 4 times
                k = torch.arange(T_UP, dtype=torch.float64) * (1 - kind)
                centres = (starts[:, None] + k[None, :, None] * step) % clips.SIZE  # [n, 4, 2]
                colour = clips.colour_tensor(p.colour).expand(*centres.shape[:2], 3)
                frames = clips.render(centres, colour, torch.full(centres.shape[:2], p.shape == "square"))
                kinds.append(vae.normalise(vae.encode_raw(frames.flatten(1, 2))))  # [n, z, h, w]
            out.append(torch.stack(kinds))
        z = torch.stack(out)  # [32, 2, SUB^2, z, h, w]
        return cls(z.view(len(PROMPTS), 2, SUB, SUB, *z.shape[3:]))

    def lookup(self, prompt: list[int], static: list[bool], x: list[int], y: list[int]) -> torch.Tensor:
        """Latents [N, z, h, w] of groups whose first frame has the object at (x, y) (pixels, on the grid)."""
        out = []
        for p, s, px, py in zip(prompt, static, x, y):
            px, py = int(px) % clips.SIZE, int(py) % clips.SIZE
            z = self.latents[p, int(s), (py % CELL) // GRID, (px % CELL) // GRID]
            out.append(torch.roll(z, shifts=(py // CELL, px // CELL), dims=(1, 2)))
        return torch.stack(out)


def clip_groups(latents: list[int], per_latent: list[int], start: tuple[int, int]) -> tuple[list, list, list]:
    """For a clip's global latent indices (non-decreasing) and the prompt index of each: the (static, x, y) of
    each group. The object moves steadily under each latent's prompt, continuously across a change of prompt
    (the frames between two listed latents move under the later one's direction)."""
    x, y = start  # the object at frame 0
    last = 0  # the frame (x, y) is at
    statics, xs, ys = [], [], []
    for g, p in zip(latents, per_latent):
        if g == 0:
            statics.append(True), xs.append(x), ys.append(y)
            continue
        dx, dy = clips.DIRECTIONS[PROMPTS[p].direction]
        first = T_UP * g - (T_UP - 1)
        x, y = x + dx * int(clips.SPEED) * (first - last), y + dy * int(clips.SPEED) * (first - last)
        statics.append(False), xs.append(x % clips.SIZE), ys.append(y % clips.SIZE)
        x, y, last = x + dx * int(clips.SPEED) * (T_UP - 1), y + dy * int(clips.SPEED) * (T_UP - 1), T_UP * g
    return statics, xs, ys
