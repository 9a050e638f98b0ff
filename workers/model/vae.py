"""VAE decoders with streaming decode: chunk by chunk, with cached causal convolutions, equal to decoding
all latents at once. One latent frame becomes 4 video frames, except the stream's first (1 frame).

Both decoders share one contract: ``new_state()`` per stream, ``decode_chunk(latents, state)`` ->
pixels [N, 3, H, W] in [-1, 1], and ``decode_all(latents)`` as the whole-video oracle.
"""

from __future__ import annotations

import os
import zlib
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.config import GenerationConfig, ModelConfig


class StreamingDecoder(ABC):
    @abstractmethod
    def new_state(self) -> Any:
        """Fresh per-stream decode state (feature caches)."""

    @abstractmethod
    def decode_chunk(self, latents: torch.Tensor, state: Any) -> torch.Tensor:
        """Diffusion latents [F, C, h, w] -> pixels [N, 3, H, W] in [-1, 1]; updates ``state``."""

    def decode_all(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a whole video's latents [F, C, h, w] in one call (the streaming oracle)."""
        return self.decode_chunk(latents, self.new_state())


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [N, 3, H, W] in [-1, 1] -> uint8 frames [N, H, W, 3]."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class CausalConv3d(nn.Conv3d):
    """3x3x3 conv, causal in time: the first frames see zeros (or the previous call's last frames)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=3, padding=(0, 1, 1))

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [1, C, T, H, W], cache [1, C, 2, H, W] (None = stream start) -> (y [1, C', T, H, W], new cache)."""
        if cache is None:
            cache = x.new_zeros(x.shape[:2] + (2,) + x.shape[3:])
        xp = torch.cat((cache, x), dim=2)  # [1, C, T+2, H, W]
        return super().forward(xp), xp[:, :, -2:].clone()


class TinyVAE(nn.Module, StreamingDecoder):
    """A small causal decoder for the tiny / small configs (seeded weights, smooth colour output)."""

    def __init__(self, cfg: ModelConfig, width: int = 32):
        super().__init__()
        self.z_dim = cfg.out_channels
        self.t_up, self.s_up = cfg.vae_stride[0], cfg.vae_stride[1]
        self.conv_in = CausalConv3d(self.z_dim, width)
        self.conv_mid = CausalConv3d(width, width)
        self.to_time = nn.Conv3d(width, 16 * self.t_up, kernel_size=1)  # latent frame -> t_up frames
        self.conv_px = CausalConv3d(16, 16)
        self.to_rgb = nn.Conv3d(16, 3, kernel_size=1)
        with torch.no_grad():
            for name, p in self.named_parameters():
                gen = torch.Generator().manual_seed(cfg.init_seed * 7 + zlib.crc32(name.encode()))
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5 * (1.0 if p.dim() > 1 else 0.1))

    def new_state(self) -> dict:
        return {"caches": [None, None, None], "emitted": 0}

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: dict) -> torch.Tensor:
        c = state["caches"]
        x = latents.to(self.conv_in.weight.dtype).transpose(0, 1)[None]  # [1, z, F, h, w]
        x, c[0] = self.conv_in(x, c[0])
        x, c[1] = self.conv_mid(F.silu(x), c[1])
        x = self.to_time(F.silu(x))  # [1, 16 * t_up, F, h, w]
        _, _, f, h, w = x.shape
        x = x.view(1, 16, self.t_up, f, h, w).transpose(2, 3).reshape(1, 16, f * self.t_up, h, w)
        x, c[2] = self.conv_px(x, c[2])
        x = self.to_rgb(F.silu(x))[0].transpose(0, 1)  # [N, 3, h, w]
        x = torch.tanh(F.interpolate(x, scale_factor=self.s_up, mode="bilinear", align_corners=False))
        drop = max(0, (self.t_up - 1) - state["emitted"])  # the stream's first latent gives 1 frame
        state["emitted"] += x.shape[0]
        return x[drop:]


class WanVAE(StreamingDecoder):
    """The real Wan2.1 VAE (diffusers ``AutoencoderKLWan``) with a per-stream decoder feature cache."""

    def __init__(self, vae: Any, device: torch.device | str = "cpu"):
        self.vae = vae.to(device).eval()
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1).to(device)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1).to(device)
        self.conv_count = sum(type(m).__name__ == "WanCausalConv3d" for m in vae.decoder.modules())

    @classmethod
    def from_path(cls, path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "WanVAE":
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"VAE directory not found: {path!r}")
        from diffusers import AutoencoderKLWan

        return cls(AutoencoderKLWan.from_pretrained(path, local_files_only=True, torch_dtype=dtype), device)

    def new_state(self) -> dict:
        return {"feat": [None] * self.conv_count, "first": True}

    def _unnormalize(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.transpose(0, 1)[None].to(self.mean.device, torch.float32)  # [1, C, F, h, w]
        return (z * self.std + self.mean).to(self.vae.dtype)

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: dict) -> torch.Tensor:
        x = self.vae.post_quant_conv(self._unnormalize(latents))  # pointwise in time
        outs = []
        for i in range(x.shape[2]):
            outs.append(self.vae.decoder(x[:, :, i:i + 1], feat_cache=state["feat"], feat_idx=[0],
                                         first_chunk=state["first"]))
            state["first"] = False
        return torch.cat(outs, 2).clamp(-1, 1)[0].transpose(0, 1).float()  # [N, 3, H, W]

    @torch.no_grad()
    def decode_all(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self._unnormalize(latents)).sample[0].transpose(0, 1).float()


def build_vae(cfg: ModelConfig, path: str = "", device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> StreamingDecoder:
    if cfg.vae == "tiny":
        return TinyVAE(cfg).to(device, dtype)
    return WanVAE.from_path(path, device, dtype)


def build_decoder(gen: GenerationConfig, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> StreamingDecoder:
    """The decode workers' decoder for a generation config (its VAE, from its local path)."""
    return build_vae(gen.model, gen.vae_path, device, dtype)
