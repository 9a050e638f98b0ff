"""TAEHV tiny video decoder (TAEW2.1 weights, madebyollin/taehv layout) with streaming decode.

A cheap stand-in for the Wan VAE decoder: about 9.84M parameters, 2D convs per frame plus ``MemBlock``s
that also see the previous timestep's activation, ``TGrow`` time upsampling (x1, x2, x2) and nearest
spatial upsampling (x2 three times). It decodes the diffusion latents as they are (no latent mean / std)
to pixels in [0, 1], which ``decode_chunk`` maps to the contract's [-1, 1].

Layout of ``decoder`` (the index is the state-dict key prefix ``decoder.{i}.``, as in the published files):
0 Clamp, 1 conv(z, 256), 2 ReLU, 3-5 MemBlock(256), 6 Upsample, 7 TGrow(256, 1), 8 conv(256, 128, no bias),
9-11 MemBlock(128), 12 Upsample, 13 TGrow(128, 2), 14 conv(128, 64, no bias), 15-17 MemBlock(64),
18 Upsample, 19 TGrow(64, 2), 20 conv(64, 64, no bias), 21 ReLU, 22 conv(64, 3).
The published files also hold the TAEHV encoder (``encoder.*``); it is not used here (the Wan VAE encodes).

Streaming: a MemBlock is the only layer that looks across time, and only one step back, so a stream's
state is each MemBlock's last input frame. The first 3 output frames of a stream are dropped (as TAEHV's
``decode_video`` trims them), so F latent frames give 1 + 4(F - 1) frames, like the Wan VAE.
"""

from __future__ import annotations

import os
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from workers.config import ModelConfig
from workers.model.vae import StreamingDecoder

TAEW2_1_WIDTHS: tuple[int, int, int, int] = (256, 128, 64, 64)
"""Channel widths of the TAEW2.1 decoder stages (the last is the width before the RGB conv)."""
TIME_STRIDES: tuple[int, int, int] = (1, 2, 2)
"""TGrow stride per stage: time x4 in all, spatial x8 (x2 per stage)."""


def _conv(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the input latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual 3-conv block whose first conv also sees the previous timestep's input (concatenated)."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """x, past [T, C, H, W] (past[t] is the input at t - 1) -> [T, C, H, W]."""
        return F.relu(self.conv(torch.cat((x, past), 1)) + x)


class TGrow(nn.Module):
    """Time upsampling: a 1x1 conv to stride * C channels, channel group k becoming output frame s*t + k."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, c, h, w = x.shape
        return self.conv(x).reshape(t * self.stride, c, h, w)  # [T, s*C, H, W] -> [s*T, C, H, W]


class TAEHVDecoder(nn.Module, StreamingDecoder):
    """TAEHV decoder implementing the streaming contract; load TAEW2.1 weights with ``from_file``."""

    def __init__(self, latent_channels: int = 16, widths: tuple[int, ...] = TAEW2_1_WIDTHS, seed: int = 0):
        super().__init__()
        if len(widths) != len(TIME_STRIDES) + 1:
            raise ValueError(f"TAEHV needs {len(TIME_STRIDES) + 1} widths, got {widths!r}")
        self.latent_channels = latent_channels
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, widths[0]), nn.ReLU()]
        for n, n_next, stride in zip(widths[:-1], widths[1:], TIME_STRIDES):
            layers += [MemBlock(n), MemBlock(n), MemBlock(n), nn.Upsample(scale_factor=2, mode="nearest"),
                       TGrow(n, stride), _conv(n, n_next, bias=False)]
        layers += [nn.ReLU(), _conv(widths[-1], 3)]
        self.decoder = nn.Sequential(*layers)
        self.t_upscale = 1
        for stride in TIME_STRIDES:
            self.t_upscale *= stride
        self.frames_to_trim = self.t_upscale - 1  # the stream's first latent frame gives 1 frame
        self._last_grow = max(i for i, m in enumerate(self.decoder) if isinstance(m, TGrow))
        self._init_weights(seed)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        """Seeded weights (tests and the tiny configs; a weight file replaces them): std 1 / sqrt(fan_in)
        keeps activations O(1) through the residual stages, and the RGB bias centres output on mid-grey."""
        for name, p in self.named_parameters():
            gen = torch.Generator().manual_seed(seed * 7 + zlib.crc32(name.encode()))
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        self.decoder[-1].bias.fill_(0.5)

    @classmethod
    def from_file(cls, path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  latent_channels: int = 16) -> "TAEHVDecoder":
        """The TAEW2.1 decoder from a local ``.pth`` or ``.safetensors`` file (never downloads)."""
        model = cls(latent_channels=latent_channels)
        model.load_weights(read_state_dict(path), source=path)
        return model.to(device, dtype).eval()

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy ``decoder.*`` tensors by their published names; ``encoder.*`` ones are skipped.

        Raises ValueError naming every missing or unexpected key, or the first tensor whose shape differs.
        """
        own = self.state_dict()
        given = {k: v for k, v in state_dict.items() if not k.startswith("encoder.")}
        missing, unexpected = sorted(own.keys() - given.keys()), sorted(given.keys() - own.keys())
        if missing or unexpected:
            raise ValueError(f"TAEHV weights from {source}: missing keys {missing}, unexpected keys {unexpected}")
        for key, value in given.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"TAEHV weights from {source}: {key} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(own[key].shape)}")
        self.load_state_dict(given)  # copies, casting to the module's dtype

    def new_state(self) -> dict:
        return {"mem": [None] * len(self.decoder), "emitted": 0}

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: dict) -> torch.Tensor:
        """Diffusion latents [F, C, h, w] -> float32 pixels [N, 3, 8h, 8w] in [-1, 1] (N = 4F, 4F - 3 first)."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels or latents.shape[0] < 1:
            raise ValueError(f"TAEHV decodes latents [F, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        weight = self.decoder[1].weight
        x = latents.to(weight.device, weight.dtype)  # [F, C, h, w]
        mem = state["mem"]
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, MemBlock):
                prev = mem[i] if mem[i] is not None else torch.zeros_like(x[:1])
                past = torch.cat((prev, x[:-1]))  # [T, C, H, W]: frame t sees frame t - 1
                mem[i] = x[-1:].clone()  # a copy, so the chunk's activations can be freed
                x = layer(x, past)
            else:
                x = layer(x)
            if i == self._last_grow:
                # Only per-frame layers follow, so the stream's first frames are dropped here, unconvolved.
                drop = max(0, self.frames_to_trim - state["emitted"])
                state["emitted"] += x.shape[0]
                x = x[drop:]  # [N, C, H, W]
        return (x.clamp(0, 1) * 2 - 1).float()  # [0, 1] -> [-1, 1]


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a local ``.safetensors`` or ``.pth`` / ``.pt`` weight file, on the CPU."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"TAEHV weight file not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if path.endswith((".pth", ".pt")):
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{path}: expected a flat state dict of tensors")
        return sd
    raise ValueError(f"{path}: TAEHV weights must be a .safetensors, .pth or .pt file")


def build_taehv(cfg: ModelConfig, path: str = "", device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> TAEHVDecoder:
    """TAEW2.1 from ``path``; without one, seeded weights, allowed only for the tiny VAE (tests, demo)."""
    if path:
        return TAEHVDecoder.from_file(path, device, dtype, cfg.out_channels)
    if cfg.vae != "tiny":
        raise FileNotFoundError("vae_decoder 'taehv' needs taehv_path: a local TAEW2.1 .pth or .safetensors file")
    return TAEHVDecoder(cfg.out_channels, seed=cfg.init_seed).to(device, dtype).eval()
