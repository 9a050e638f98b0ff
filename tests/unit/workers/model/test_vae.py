"""Streaming VAE decode, chunk by chunk, equals decoding all latents at once (tiny VAE and Wan VAE)."""

import pytest
import torch

from workers.model import get_config
from workers.model.vae import TinyVAE, WanVAE, to_uint8


def _stream(vae, latents, sizes):
    state, out, i = vae.new_state(), [], 0
    for n in sizes:
        out.append(vae.decode_chunk(latents[i:i + n], state))
        i += n
    return torch.cat(out)


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1, 1, 1], [3, 3], [1, 2, 3]])
def test_tiny_vae_streaming_equals_full(sizes):
    cfg = get_config("tiny")
    vae = TinyVAE(cfg)
    latents = torch.randn(sum(sizes), cfg.out_channels, 4, 6)
    full = vae.decode_all(latents)
    assert full.shape == (1 + 4 * (sum(sizes) - 1), 3, 32, 48)
    streamed = _stream(vae, latents, sizes)
    assert streamed.shape == full.shape
    assert (streamed - full).abs().max() <= 1e-5
    # causal: the past matters (a different first chunk changes later frames)
    other = latents.clone()
    other[0] += 1
    assert (vae.decode_all(other)[-4:] - full[-4:]).abs().max() > 1e-4


def test_wan_vae_streaming_equals_full():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                    temperal_downsample=[False, True, True]).eval()
    vae = WanVAE(ae)
    latents = torch.randn(4, 16, 4, 4)
    full = vae.decode_all(latents)
    assert full.shape == (1 + 4 * 3, 3, 32, 32)
    for sizes in ([1, 1, 1, 1], [2, 2], [1, 3]):
        streamed = _stream(vae, latents, sizes)
        assert (streamed - full).abs().max() <= 1e-5, sizes


def test_to_uint8_range():
    px = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    out = to_uint8(px)
    assert out.dtype == torch.uint8 and out.shape == (2, 2, 2, 3)
    assert out[0, :, :, 0].flatten().tolist() == [0, 128, 255, 255]
