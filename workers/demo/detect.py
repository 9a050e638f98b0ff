"""Quality detector for demo streams: what a viewer would say about a clip of one coloured object.

Per frame: the object's pixels (those far from the frame's median colour, i.e. the background), their
dominant palette colour and their centroid. Per stream: the dominant colour over the visible frames, the
direction of motion from the centroid track, and visibility (the fraction of frames with an object).

Centroids are circular means (the frame is a torus in the synthetic clips), and each step between frames is
taken modulo the frame size into [-size/2, size/2), so an object wrapping around an edge makes no jump;
steps longer than ``max_step`` (a jump, not motion) are ignored.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from workers.demo.clips import COLOURS, DIRECTIONS

_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # [4, 3]
_NAMES = list(COLOURS)


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of the detector (uint8 colour units and pixels)."""

    object_distance: float = 120.0
    """A pixel belongs to the object when its L1 colour distance from the background is at least this."""
    min_pixels: int = 30
    """A frame shows an object when at least this many pixels belong to it (the ball covers about 150)..."""
    max_pixels: int = 700
    """... and at most this many (more is noise or a smear, not one object)..."""
    radius: float = 14.0
    """... and at least ``compactness`` of them lie within this many pixels of their centroid."""
    compactness: float = 0.8
    max_step: float = 12.0
    """Centroid steps longer than this (pixels) are jumps, not motion, and are ignored."""
    min_speed: float = 0.5
    """Mean motion (pixels per frame) below which the object counts as still (direction None)."""


@dataclass
class FrameObservation:
    visible: bool
    pixels: int
    colour: str | None
    """Dominant palette colour of the object's pixels."""
    x: float = math.nan
    y: float = math.nan


@dataclass
class StreamQuality:
    frames: int
    visibility: float
    """Fraction of frames with a detectable object."""
    colour: str | None
    """Dominant colour over the visible frames (None: nothing visible)."""
    direction: str | None
    """left / right / up / down from the mean centroid step, or None (still, or too few visible steps)."""
    speed: float
    """Mean centroid motion in pixels per frame (over the steps used)."""
    steps_used: int
    colour_share: float
    """Share of visible frames whose colour is the dominant one."""
    per_frame: list[FrameObservation] = field(default_factory=list, repr=False)

    def agrees(self, colour: str, direction: str) -> tuple[bool, bool]:
        return self.colour == colour, self.direction == direction


def _wrap(d, size: int):
    """Offsets (float or tensor) wrapped into [-size/2, size/2)."""
    return (d + size / 2) % size - size / 2


def _circular_mean(weights: torch.Tensor, axis_len: int, dim: int) -> float:
    """Circular mean position along one axis of a [H, W] weight map (the frame wraps)."""
    coord = torch.arange(axis_len, dtype=torch.float64) * (2 * math.pi / axis_len)
    w = weights.double().sum(dim=dim)  # [axis_len]
    angle = math.atan2(float((w * torch.sin(coord)).sum()), float((w * torch.cos(coord)).sum()))
    return (angle % (2 * math.pi)) * axis_len / (2 * math.pi)


def observe(frame: torch.Tensor, cfg: DetectorConfig = DetectorConfig()) -> FrameObservation:
    """One uint8 frame [H, W, 3]."""
    rgb = frame.float()
    background = rgb.reshape(-1, 3).median(dim=0).values  # the object covers a few percent of the frame
    distance = (rgb - background).abs().sum(-1)  # [H, W]
    mask = distance >= cfg.object_distance
    n = int(mask.sum())
    if not cfg.min_pixels <= n <= cfg.max_pixels:
        return FrameObservation(False, n, None)
    weights = mask.float() * distance
    h, w = mask.shape
    x, y = _circular_mean(weights, w, 0), _circular_mean(weights, h, 1)
    ys, xs = mask.nonzero(as_tuple=True)
    near = torch.hypot(_wrap(xs.double() - x, w), _wrap(ys.double() - y, h)) <= cfg.radius
    if float(near.double().mean()) < cfg.compactness:  # scattered pixels: no single object
        return FrameObservation(False, n, None)
    nearest = torch.cdist(rgb[mask], _PALETTE).argmin(dim=1)  # [n]
    colour = _NAMES[int(torch.bincount(nearest, minlength=len(_NAMES)).argmax())]
    return FrameObservation(True, n, colour, x, y)


def assess(frames: torch.Tensor, cfg: DetectorConfig = DetectorConfig()) -> StreamQuality:
    """A stream's frames, uint8 [N, H, W, 3] -> colour, direction and visibility."""
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {tuple(frames.shape)} {frames.dtype}")
    obs = [observe(f, cfg) for f in frames]
    visible = [o for o in obs if o.visible]
    colours = Counter(o.colour for o in visible)
    colour, count = colours.most_common(1)[0] if colours else (None, 0)
    h, w = frames.shape[1:3]
    steps = []
    for a, b in zip(obs, obs[1:]):
        if a.visible and b.visible:
            d = (_wrap(b.x - a.x, w), _wrap(b.y - a.y, h))
            if math.hypot(*d) <= cfg.max_step:
                steps.append(d)
    direction, speed = None, 0.0
    if steps:
        mx = sum(d[0] for d in steps) / len(steps)
        my = sum(d[1] for d in steps) / len(steps)
        speed = math.hypot(mx, my)
        if speed >= cfg.min_speed:
            direction = max(DIRECTIONS, key=lambda k: DIRECTIONS[k][0] * mx + DIRECTIONS[k][1] * my)
    return StreamQuality(len(obs), len(visible) / max(len(obs), 1), colour, direction, speed, len(steps),
                         count / max(len(visible), 1), obs)
