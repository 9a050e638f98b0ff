"""Pure-torch references for the block's memory-bound ops. These define the semantics.

Layout everywhere: x is [F, T, C] (latent frames, tokens per frame, channels); per-frame vectors are [F, C].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then x * (1 + scale) + shift per latent frame.

    x [F, T, C]; shift, scale [F, C] -> [F, T, C] in x.dtype (norm computed in float32, like Wan).
    """
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (y * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (all heads together). x [..., C], weight [C]."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) of every head.

    x [F, T, C] with C = H * D; cos, sin [F, T, D/2] (or broadcastable) -> [F, T, C].
    """
    f, t, c = x.shape
    half = cos.shape[-1]
    xp = x.float().view(f, t, c // (2 * half), half, 2)  # [F, T, H, D/2, 2]
    re, im = xp[..., 0], xp[..., 1]
    cos, sin = cos.float()[:, :, None], sin.float()[:, :, None]  # [F, T, 1, D/2]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.view(f, t, c).to(x.dtype)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of q and k across all heads, then 3D RoPE on both.

    q, k [F, T, C]; weights [C]; cos, sin [F, T, D/2] (the chunk's temporal offset is already in the
    tables) -> (q, k) rotated, [F, T, C] each.
    """
    return rope(rms_norm(q, weight_q, eps), cos, sin), rope(rms_norm(k, weight_k, eps), cos, sin)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y with a per-frame gate. x, y [F, T, C]; gate [F, C] -> [F, T, C]."""
    return (x.float() + gate.float()[:, None] * y.float()).to(x.dtype)


def gated_residual_norm_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                 scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """res = x + gate * y, out = LN(res) * (1 + scale) + shift; returns (res, out), both [F, T, C]."""
    res = gated_residual(x, y, gate)
    return res, norm_modulate(res, shift, scale, eps)
