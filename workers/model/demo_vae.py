"""The demo model's VAE (``ModelConfig.vae = "demo"``): 64x64 RGB <-> 8x8 latents, 4 video frames per latent frame.

Trained with the demo DiT (``workers/demo/train.py``) and shipped in the same checkpoint file (its ``vae``
entry). The layout follows the Wan VAE so the engine needs nothing special: a latent frame is 4 video frames
(``vae_stride`` (4, 8, 8)), except the stream's first, which is frame 0 alone.

* Encoder (``StreamingEncoder``, training and video-to-video): each group of 4 frames -> one latent [C, 8, 8];
  the first group is frame 0 repeated 4 times. Per group, no temporal state: the only stream state is whether
  the first frame has been seen.
* Decoder (``StreamingDecoder``): latent k and latent k-1 (a causal temporal kernel of 2; the cache is the
  previous latent, zeros at the stream start) -> 4 frames. The first latent's 3 leading frames are dropped.
  The only state is the previous latent, so decoding chunk by chunk equals decoding the whole video.

Latents are normalised per channel (``latent_mean`` / ``latent_std``, measured on the training clips after
the autoencoder is trained), so the DiT sees roughly unit-variance latents, as with the Wan VAE.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.vae import StreamingDecoder, StreamingEncoder, encode_groups

T_UP = 4
"""Video frames per latent frame."""


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    # Circular padding: the clips' frame is a torus, and an 8 px shift of the frames is then exactly a one-cell
    # shift of the latents (the DiT sees an object the same on either side of an edge).
    return nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, padding_mode="circular")


class DemoVAE(nn.Module, StreamingDecoder, StreamingEncoder):
    def __init__(self, z_dim: int = 8, width: int = 64):
        super().__init__()
        self.z_dim, self.width = z_dim, width
        w = width
        # encoder: [G, 4*3, 64, 64] -> [G, z, 8, 8]
        self.enc = nn.ModuleList([_conv(3 * T_UP, w // 2), _conv(w // 2, w, 4, 2), _conv(w, w, 4, 2),
                                  _conv(w, w, 4, 2), _conv(w, w)])
        self.enc_out = _conv(w, z_dim, 1)
        # decoder: [F, 2z, 8, 8] (latent k, latent k-1) -> [F, 4*3, 64, 64]
        self.dec_in = _conv(2 * z_dim, w)
        self.dec_mid = _conv(w, w)
        self.dec_up = nn.ModuleList([_conv(w, w), _conv(w, w // 2), _conv(w // 2, w // 2)])  # after each 2x up
        self.dec_out = _conv(w // 2, 3 * T_UP)
        self.register_buffer("latent_mean", torch.zeros(z_dim))
        self.register_buffer("latent_std", torch.ones(z_dim))

    # encoder (training) ----------------------------------------------------------------------------------

    @staticmethod
    def groups(frames: torch.Tensor) -> torch.Tensor:
        """Video [N = 1 + 4(F-1), 3, H, W] -> groups [F, 4*3, H, W] (frame 0 repeated for the first)."""
        n = frames.shape[0]
        if (n - 1) % T_UP:
            raise ValueError(f"a video of 1 + {T_UP}k frames is needed, got {n}")
        padded = torch.cat((frames[:1].expand(T_UP - 1, -1, -1, -1), frames))  # [4F, 3, H, W]
        return padded.reshape(-1, T_UP * 3, *frames.shape[2:])

    def encode_raw(self, groups: torch.Tensor) -> torch.Tensor:
        """Groups [G, 12, H, W] -> un-normalised latents [G, z, H/8, W/8]."""
        x = groups
        for i, conv in enumerate(self.enc):
            x = F.silu(conv(x)) if i else conv(x)
        return self.enc_out(F.silu(x))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean.view(-1, 1, 1)) / self.latent_std.view(-1, 1, 1)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Video [1 + 4(F-1), 3, H, W] in [-1, 1] -> normalised latents [F, z, H/8, W/8]."""
        return self.normalise(self.encode_raw(self.groups(frames)))

    # decoder -------------------------------------------------------------------------------------------

    def decode_raw(self, z: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Un-normalised latents [F, z, h, w] and each one's predecessor [F, z, h, w] -> frames [4F, 3, 8h, 8w]."""
        x = F.silu(self.dec_in(torch.cat((z, prev), 1)))
        x = x + self.dec_mid(x)
        for conv in self.dec_up:
            x = F.silu(conv(F.interpolate(x, scale_factor=2, mode="nearest")))
        x = torch.tanh(self.dec_out(x))  # [F, 12, H, W]
        f, _, h, w = x.shape
        return x.view(f, T_UP, 3, h, w).reshape(f * T_UP, 3, h, w)

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.latent_std.view(-1, 1, 1) + self.latent_mean.view(-1, 1, 1)

    def decode_train(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents of a whole video [F, z, h, w] -> its frames [1 + 4(F-1), 3, H, W], with grad."""
        z = self.denormalise(latents)
        prev = torch.cat((torch.zeros_like(z[:1]), z[:-1]))
        return self.decode_raw(z, prev)[T_UP - 1:]

    def new_state(self) -> dict:
        return {"prev": None, "emitted": 0, "enc_first": True}

    @torch.no_grad()
    def encode_chunk(self, pixels: torch.Tensor, state: dict) -> torch.Tensor:
        """Pixels [N, 3, H, W] in [-1, 1] (1 + 4k on the stream's first call, else 4k) -> latents [F, z, h, w].
        Chunk by chunk equals ``encode`` of the whole video: groups carry no state across calls."""
        encode_groups(pixels.shape[0], state["enc_first"], T_UP)  # checks the frame count
        x = pixels.to(self.latent_mean.device, torch.float32)
        if state["enc_first"]:
            groups, state["enc_first"] = self.groups(x), False
        else:
            groups = x.reshape(-1, T_UP * 3, *x.shape[2:])  # [N/4, 12, H, W]
        return self.normalise(self.encode_raw(groups))

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: dict) -> torch.Tensor:
        z = self.denormalise(latents.to(self.latent_mean.device, torch.float32))  # [F, z, h, w]
        first = state["prev"] if state["prev"] is not None else torch.zeros_like(z[:1])
        prev = torch.cat((first, z[:-1]))
        out = self.decode_raw(z, prev)  # [4F, 3, H, W]
        state["prev"] = z[-1:].clone()
        drop = max(0, (T_UP - 1) - state["emitted"])  # the stream's first latent gives 1 frame
        state["emitted"] += out.shape[0]
        return out[drop:]


def load_demo_vae(path: str, z_dim: int, device: torch.device | str = "cpu") -> DemoVAE:
    """The VAE stored under ``vae`` in a demo checkpoint (its shape under ``vae_config``); local files only."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"demo checkpoint not found: {path!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "vae" not in state:
        raise ValueError(f"{path}: no 'vae' entry (not a demo checkpoint)")
    vae = DemoVAE(**{k: int(v) for k, v in state.get("vae_config", {}).items()})
    if vae.z_dim != z_dim:
        raise ValueError(f"{path}: the VAE has {vae.z_dim} latent channels, the model config {z_dim}")
    vae.load_state_dict({k: v.float() for k, v in state["vae"].items()})
    return vae.to(device).eval()
