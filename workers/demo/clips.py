"""Synthetic clips for the demo model: ``a {red|green|blue|yellow} {ball|square} moving {left|right|up|down}``.

One object on a plain dark background, moving a fixed number of pixels per frame in the named direction and
wrapping around the frame edge (the frame is a torus). Rendering is anti-aliased (pixel coverage), so sub-pixel
motion is smooth. Everything is a pure function of (prompt, seed, frame index): nothing is downloaded, and
the same arguments give the same pixels on any machine.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 90, 235),
    "yellow": (230, 210, 40),
}
"""The object colours (uint8 RGB)."""
SHAPES = ("ball", "square")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Unit motion (dx, dy) per direction; y grows downwards as in images."""
BACKGROUND = (16, 16, 24)
"""The plain dark background (uint8 RGB)."""
SIZE = 64
"""Frame height and width in pixels."""
SPEED = 2.0
"""Pixels the object moves per frame."""
BALL_RADIUS = 7.0
SQUARE_HALF = 6.5
"""Half the side of the square (13 px side: about the ball's area)."""

_PROMPT = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+moving\s+(\w+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Prompt:
    colour: str
    shape: str
    direction: str

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"


def parse_prompt(text: str) -> Prompt:
    """``a red ball moving left`` -> Prompt; ValueError for anything outside the vocabulary."""
    m = _PROMPT.match(text)
    if not m or m[1].lower() not in COLOURS or m[2].lower() not in SHAPES or m[3].lower() not in DIRECTIONS:
        raise ValueError(f"not a demo prompt (a COLOUR SHAPE moving DIRECTION): {text!r}")
    return Prompt(m[1].lower(), m[2].lower(), m[3].lower())


def all_prompts() -> list[Prompt]:
    """The 32 prompts, colour-major."""
    return [Prompt(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def start_position(seed: int, size: int = SIZE) -> tuple[float, float]:
    """The object's (x, y) centre at frame 0, uniform over the frame, from the seed alone."""
    gen = torch.Generator().manual_seed(int(seed) % (2**63 - 1))
    x, y = (torch.rand(2, generator=gen, dtype=torch.float64) * size).tolist()
    return x, y


def track(start: tuple[float, float], direction: str, frames: torch.Tensor, speed: float = SPEED,
          size: int = SIZE) -> torch.Tensor:
    """Centres [N, 2] (x, y) at the given frame indices [N], wrapped into [0, size)."""
    dx, dy = DIRECTIONS[direction]
    t = frames.to(torch.float64)
    return torch.stack((start[0] + dx * speed * t, start[1] + dy * speed * t), -1) % size


def switch_track(frames: torch.Tensor, directions: list[str], start: tuple[float, float], speed: float = SPEED,
                 size: int = SIZE) -> torch.Tensor:
    """Centres [N, 2] at non-decreasing frame indices [N] whose direction may change (a prompt switch): from
    frame to frame the object moves under the earlier frame's direction, so the track is continuous."""
    pos = torch.tensor(start, dtype=torch.float64)
    out, prev_frame, prev_dir = [], 0, directions[0]
    for g, d in zip(frames.tolist(), directions):
        dx, dy = DIRECTIONS[prev_dir]
        pos = pos + speed * (g - prev_frame) * torch.tensor((dx, dy), dtype=torch.float64)
        out.append(pos.clone())
        prev_frame, prev_dir = g, d
    return torch.stack(out) % size


def render_prompts(frames: torch.Tensor, prompts: list[Prompt], start: tuple[float, float],
                   size: int = SIZE) -> torch.Tensor:
    """Frames [N, 3, size, size] at frame indices [N], each showing its own prompt's object on one track."""
    centres = switch_track(frames, [p.direction for p in prompts], start, size=size)
    colours = torch.stack([colour_tensor(p.colour) for p in prompts])
    square = torch.tensor([p.shape == "square" for p in prompts])
    return render(centres, colours, square, size)


def render(centres: torch.Tensor, colours: torch.Tensor, square: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Frames in [-1, 1] [..., 3, size, size] of one object each.

    centres [..., 2] (x, y) in pixels, colours [..., 3] uint8-scale RGB, square [...] bool (else a ball).
    Coverage is the anti-aliased area of the shape on each pixel; distances wrap around the edges.
    """
    axis = torch.arange(size, dtype=torch.float64)
    # wrapped offsets of each pixel centre from the object centre, in (-size/2, size/2]: [..., size]
    ox = torch.remainder(axis - centres[..., 0:1].double() + size / 2, size) - size / 2
    oy = torch.remainder(axis - centres[..., 1:2].double() + size / 2, size) - size / 2
    dist = torch.sqrt(oy[..., :, None] ** 2 + ox[..., None, :] ** 2)  # [..., H, W]
    ball = (BALL_RADIUS + 0.5 - dist).clamp(0, 1)
    box = (SQUARE_HALF + 0.5 - oy.abs()).clamp(0, 1)[..., :, None] * \
        (SQUARE_HALF + 0.5 - ox.abs()).clamp(0, 1)[..., None, :]
    cover = torch.where(square[..., None, None], box, ball)[..., None, :, :]  # [..., 1, H, W]
    bg = torch.tensor(BACKGROUND, dtype=torch.float64).view(3, 1, 1)
    rgb = bg + cover * (colours.double()[..., :, None, None] - bg)  # [..., 3, H, W]
    return (rgb / 127.5 - 1).float()


def colour_tensor(name: str) -> torch.Tensor:
    return torch.tensor(COLOURS[name], dtype=torch.float64)


def clip(prompt: Prompt | str, seed: int, frames: int, first: int = 0, size: int = SIZE) -> torch.Tensor:
    """Frames ``first .. first + frames - 1`` of the clip of (prompt, seed), in [-1, 1]: [frames, 3, size, size]."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    idx = torch.arange(first, first + frames)
    centres = track(start_position(seed, size), p.direction, idx, size=size)
    colours = colour_tensor(p.colour).expand(frames, 3)
    square = torch.full((frames,), p.shape == "square")
    return render(centres, colours, square, size)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[-1, 1] frames [N, 3, H, W] -> uint8 [N, H, W, 3] (the engine's output layout)."""
    return ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def frames_per_wrap(size: int = SIZE, speed: float = SPEED) -> int:
    """Frames the object takes to cross the frame once (the clip's period)."""
    return math.ceil(size / speed)
