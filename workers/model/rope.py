"""3D RoPE tables for Wan2.1: complex split 22/21/21 of a 128-wide head (t, h, w), adjacent pairs.

For head dim d: temporal gets d - 4*(d//6) real channels, height and width 2*(d//6) each.
Angles are computed in float64 (as Wan does) and returned as float32 cos/sin tables.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import torch

THETA = 10000.0


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real channels per axis (t, h, w): (44, 42, 42) for head dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


@lru_cache(maxsize=None)
def _inv_freqs(head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse frequencies per axis, float64: [dt/2], [dh/2], [dw/2]."""
    return tuple(1.0 / THETA ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in axis_dims(head_dim))


@lru_cache(maxsize=64)
def _spatial_angles(head_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """[T, dh/2 + dw/2] angles of the (h, w) grid, tokens row-major."""
    _, fh, fw = _inv_freqs(head_dim)
    hh = torch.arange(grid_h, dtype=torch.float64)[:, None, None] * fh  # [h, 1, dh/2]
    ww = torch.arange(grid_w, dtype=torch.float64)[None, :, None] * fw  # [1, w, dw/2]
    return torch.cat((hh.expand(grid_h, grid_w, -1), ww.expand(grid_h, grid_w, -1)), -1).reshape(
        grid_h * grid_w, -1)


def rope_tables(positions: torch.Tensor, grid: tuple[int, int], head_dim: int,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [F, T, head_dim/2] for frames at temporal ``positions`` [F] over a (h, w) token grid."""
    ft, _, _ = _inv_freqs(head_dim)
    t_ang = positions.to(torch.float64).cpu()[:, None] * ft  # [F, dt/2]
    s_ang = _spatial_angles(head_dim, *grid)  # [T, ds/2]
    f, t = t_ang.shape[0], s_ang.shape[0]
    ang = torch.cat((t_ang[:, None].expand(f, t, -1), s_ang[None].expand(f, t, -1)), -1)
    return ang.cos().float().to(device), ang.sin().float().to(device)


class RopeTables:
    """cos, sin tables of the frame layouts a model slice meets, made on its device once per layout and kept
    (a steady stream of forwards repeats a few layouts), so a forward reads them without touching the host:
    what lets a CUDA graph capture it."""

    def __init__(self, head_dim: int, size: int = 64):
        self.head_dim, self.size = head_dim, size
        self._tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __call__(self, positions: tuple[int, ...], grid: tuple[int, int],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (positions, grid, device)
        hit = self._tables.get(key)
        if hit is not None:
            self._tables.move_to_end(key)
            return hit
        tables = rope_tables(torch.tensor(positions), grid, self.head_dim, device)
        self._tables[key] = tables
        if len(self._tables) > self.size:
            self._tables.popitem(last=False)
        return tables


@lru_cache(maxsize=256)
def temporal_shift_tables(delta_frames: int, head_dim: int,
                          device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, 1, head_dim/2] that move an already rotated key by ``delta_frames`` in time only (kept on
    the device: a cache commit's re-rotation touches no host memory)."""
    ft, fh, fw = _inv_freqs(head_dim)
    ang = torch.cat((delta_frames * ft, torch.zeros(fh.numel() + fw.numel(), dtype=torch.float64)))
    return ang.cos().float().view(1, 1, -1).to(device), ang.sin().float().view(1, 1, -1).to(device)
