"""VAEs with streaming decode and encode: chunk by chunk, with cached causal convolutions, equal to
processing the whole video at once. One latent frame is 4 video frames, except the stream's first (1 frame).

Decoders share one contract: ``new_state()`` per stream, ``decode_chunk(latents, state)`` -> pixels
[N, 3, H, W] in [-1, 1], and ``decode_all(latents)`` as the whole-video oracle. Encoders (video-to-video)
mirror it: ``encode_chunk(pixels, state)`` -> latents, ``encode_all(pixels)``. A VAE that does both keeps
both directions' caches in the one state of ``new_state()`` (disjoint keys). TAEHV (a decoder only) is in
taehv.py; ``build_decoder`` picks the decoder ``ModelConfig.vae_decoder`` names.
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


class StreamingEncoder(ABC):
    """Causal video encoder: the stream's first call takes 1 + 4k frames (the first frame is encoded alone,
    as the Wan VAE does), later calls 4k frames; each group of 4 frames becomes one latent frame."""

    @abstractmethod
    def new_state(self) -> Any:
        """Fresh per-stream state (causal-conv caches)."""

    @abstractmethod
    def encode_chunk(self, pixels: torch.Tensor, state: Any) -> torch.Tensor:
        """Pixels [N, 3, H, W] in [-1, 1] -> diffusion latents [F, C, h, w] (F = ceil(N / 4)); updates ``state``.

        Raises ValueError when N is not 1 + 4k (first call of a stream) or 4k (later calls), k >= 0 / k >= 1.
        """

    def encode_all(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode a whole video's 1 + 4k frames in one call (the streaming oracle)."""
        return self.encode_chunk(pixels, self.new_state())


def encode_groups(n: int, first: bool, t: int = 4) -> list[tuple[int, int]]:
    """Frame ranges one encode call runs the causal encoder on: (0, 1) first in a stream, then groups of t."""
    if n < 1 or (n - int(first)) % t:
        want = f"1 + {t}k frames on a stream's first call" if first else f"{t}k frames (k >= 1) after the first"
        raise ValueError(f"encode_chunk takes {want}, got {n}")
    start = 1 if first else 0
    return ([(0, 1)] if first else []) + [(a, a + t) for a in range(start, n, t)]


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


class TinyVAE(nn.Module, StreamingDecoder, StreamingEncoder):
    """A small causal VAE for the tiny / small configs (seeded weights, smooth colour output).

    Encoder: per-frame patchify conv (stride 8 in space), a causal 3x3x3 conv over video frames, then a
    conv with stride 4 in time (the stream's first frame is padded with 3 zero frames to a group of its own).
    """

    def __init__(self, cfg: ModelConfig, width: int = 32):
        super().__init__()
        self.z_dim = cfg.out_channels
        self.t_up, self.s_up = cfg.vae_stride[0], cfg.vae_stride[1]
        self.conv_in = CausalConv3d(self.z_dim, width)
        self.conv_mid = CausalConv3d(width, width)
        self.to_time = nn.Conv3d(width, 16 * self.t_up, kernel_size=1)  # latent frame -> t_up frames
        self.conv_px = CausalConv3d(16, 16)
        self.to_rgb = nn.Conv3d(16, 3, kernel_size=1)
        s, t = cfg.vae_stride[1:], cfg.vae_stride[0]
        self.enc_in = nn.Conv3d(3, width, kernel_size=(1, *s), stride=(1, *s))
        self.enc_mix = CausalConv3d(width, width)
        self.enc_time = nn.Conv3d(width, width, kernel_size=(t, 1, 1), stride=(t, 1, 1))
        self.enc_out = nn.Conv3d(width, self.z_dim, kernel_size=1)
        with torch.no_grad():
            for name, p in self.named_parameters():
                gen = torch.Generator().manual_seed(cfg.init_seed * 7 + zlib.crc32(name.encode()))
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5 * (1.0 if p.dim() > 1 else 0.1))

    def new_state(self) -> dict:
        return {"caches": [None, None, None], "emitted": 0, "enc_cache": None, "enc_first": True}

    @torch.no_grad()
    def encode_chunk(self, pixels: torch.Tensor, state: dict) -> torch.Tensor:
        encode_groups(pixels.shape[0], state["enc_first"], self.t_up)  # checks the frame count
        x = pixels.to(self.enc_in.weight.device, self.enc_in.weight.dtype).transpose(0, 1)[None]  # [1, 3, N, H, W]
        x = self.enc_in(x)  # [1, width, N, H/8, W/8]
        x, state["enc_cache"] = self.enc_mix(F.silu(x), state["enc_cache"])
        if state["enc_first"]:
            x = torch.cat((x.new_zeros(x.shape[:2] + (self.t_up - 1,) + x.shape[3:]), x), 2)  # [1, w, 4F, h, w]
            state["enc_first"] = False
        x = self.enc_time(F.silu(x))  # [1, width, F, h, w]
        return self.enc_out(F.silu(x))[0].transpose(0, 1)  # [F, z, h, w]

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


class WanVAE(StreamingDecoder, StreamingEncoder):
    """The real Wan2.1 VAE (diffusers ``AutoencoderKLWan``) with per-stream decoder and encoder feature caches.

    Encode returns the normalised posterior mean, ``(mu - latents_mean) / latents_std``, without sampling
    (as StreamDiffusionV2's ``stream_encode``).
    """

    def __init__(self, vae: Any, device: torch.device | str = "cpu"):
        self.vae = vae.to(device).eval()
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1).to(device)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1).to(device)
        self.conv_count = sum(type(m).__name__ == "WanCausalConv3d" for m in vae.decoder.modules())
        self.enc_conv_count = sum(type(m).__name__ == "WanCausalConv3d" for m in vae.encoder.modules())
        self.t_down = 2 ** sum(cfg.temperal_downsample)

    @classmethod
    def from_path(cls, path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "WanVAE":
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"VAE directory not found: {path!r}")
        from diffusers import AutoencoderKLWan

        return cls(AutoencoderKLWan.from_pretrained(path, local_files_only=True, torch_dtype=dtype), device)

    def new_state(self) -> dict:
        return {"feat": [None] * self.conv_count, "first": True,
                "enc_feat": [None] * self.enc_conv_count, "enc_first": True}

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

    def _normalize(self, h: torch.Tensor) -> torch.Tensor:
        """quant_conv output [1, 2C, F, h, w] -> normalised mean latents [F, C, h, w] (float32)."""
        mu = h[:, :self.mean.shape[1]].float()  # [1, C, F, h, w]; the rest is the log-variance
        return ((mu - self.mean) / self.std)[0].transpose(0, 1)

    @torch.no_grad()
    def encode_chunk(self, pixels: torch.Tensor, state: dict) -> torch.Tensor:
        groups = encode_groups(pixels.shape[0], state["enc_first"], self.t_down)
        x = pixels.transpose(0, 1)[None].to(self.mean.device, self.vae.dtype)  # [1, 3, N, H, W]
        # One encoder call per group, as AutoencoderKLWan._encode does: its caches expect that split.
        outs = [self.vae.encoder(x[:, :, a:b], feat_cache=state["enc_feat"], feat_idx=[0]) for a, b in groups]
        state["enc_first"] = False
        return self._normalize(self.vae.quant_conv(torch.cat(outs, 2)))  # pointwise in time

    @torch.no_grad()
    def encode_all(self, pixels: torch.Tensor) -> torch.Tensor:
        encode_groups(pixels.shape[0], True, self.t_down)
        x = pixels.transpose(0, 1)[None].to(self.mean.device, self.vae.dtype)  # [1, 3, N, H, W]
        return self._normalize(self.vae.encode(x).latent_dist.parameters)


def build_vae(cfg: ModelConfig, path: str = "", device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> TinyVAE | WanVAE:
    """The VAE ``cfg.vae`` names (it decodes and encodes), on ``device`` in ``dtype``."""
    if cfg.vae == "tiny":
        return TinyVAE(cfg).to(device, dtype)
    if cfg.vae == "demo":  # stored with the DiT: ``path`` (GenerationConfig.vae_checkpoint()) or the shipped file
        from workers.config import shipped_weights
        from workers.model.demo_vae import load_demo_vae  # imports this module

        return load_demo_vae(path or shipped_weights(cfg.weights), cfg.in_channels, device).to(dtype)
    return WanVAE.from_path(path, device, dtype)


def build_decoder(gen: GenerationConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  vae: StreamingDecoder | None = None) -> StreamingDecoder:
    """The decoder ``gen.model.vae_decoder`` names, from the generation config's local paths: the VAE's own
    (``vae`` when already built) or TAEHV."""
    if gen.model.vae_decoder == "wan":
        return vae if vae is not None else build_vae(gen.model, gen.vae_checkpoint(), device, dtype)
    from workers.model.taehv import build_taehv  # deferred: taehv.py imports this module's contract

    return build_taehv(gen.model, gen.taehv_path, device, dtype)
