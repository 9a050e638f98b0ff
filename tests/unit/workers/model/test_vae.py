"""Streaming VAE decode and encode, chunk by chunk, equal processing the whole video at once (tiny VAE and
Wan VAE)."""

import pytest
import torch

from workers.model import get_config
from workers.model.vae import TinyVAE, WanVAE, encode_groups, to_uint8


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


def _small_wan():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                      temperal_downsample=[False, True, True]).eval()


def _encode_stream(vae, pixels, sizes):
    state, out, i = vae.new_state(), [], 0
    for n in sizes:
        out.append(vae.encode_chunk(pixels[i:i + n], state))
        i += n
    return torch.cat(out)


def test_wan_vae_streaming_equals_full():
    vae = WanVAE(_small_wan())
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


def test_encode_groups_follow_the_causal_convention():
    assert encode_groups(1, True) == [(0, 1)]
    assert encode_groups(9, True) == [(0, 1), (1, 5), (5, 9)]
    assert encode_groups(8, False) == [(0, 4), (4, 8)]
    for n, first in [(4, True), (0, True), (5, False), (0, False), (2, False)]:
        with pytest.raises(ValueError, match="encode_chunk takes"):
            encode_groups(n, first)


@pytest.mark.parametrize("sizes", [[1, 4, 4], [5, 4], [9], [1, 8]])
def test_tiny_vae_streaming_encode_equals_full(sizes):
    cfg = get_config("tiny")
    vae = TinyVAE(cfg)
    pixels = torch.rand(sum(sizes), 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    full = vae.encode_all(pixels)
    assert full.shape == (3, cfg.out_channels, 4, 6)  # 1 + 4 + 4 frames -> 3 latent frames
    assert full.std() > 0.01
    streamed = _encode_stream(vae, pixels, sizes)
    assert streamed.shape == full.shape
    assert (streamed - full).abs().max() <= 1e-5
    other = pixels.clone()
    other[4] = -other[4]  # frame 4 reaches frames 5 and 6 through the causal conv (across a chunk boundary)
    assert (vae.encode_all(other)[2] - full[2]).abs().max() > 1e-4
    state = vae.new_state()
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode_chunk(pixels[:4], state)


def test_wan_vae_streaming_encode_equals_full():
    ae = _small_wan()
    vae = WanVAE(ae)
    pixels = torch.rand(13, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # Expected: diffusers' posterior mean, normalised with the config's latents_mean / latents_std.
    mean = torch.tensor(ae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(ae.config.latents_std).view(1, -1, 1, 1)
    with torch.no_grad():
        mu = ae.encode(pixels.transpose(0, 1)[None]).latent_dist.mean[0].transpose(0, 1)  # [F, C, h, w]
    expected = (mu - mean) / std
    assert expected.shape == (4, 16, 4, 4)
    assert (vae.encode_all(pixels) - expected).abs().max() <= 1e-5
    for sizes in ([1, 4, 4, 4], [5, 8], [9, 4], [13]):
        streamed = _encode_stream(vae, pixels, sizes)
        assert (streamed - expected).abs().max() <= 1e-5, sizes
    with pytest.raises(ValueError, match="4k frames"):
        _encode_stream(vae, pixels, [1, 5])


def test_wan_vae_one_state_serves_both_directions():
    vae = WanVAE(_small_wan())
    state = vae.new_state()
    latents = vae.encode_chunk(torch.rand(5, 3, 32, 32) * 2 - 1, state)
    pixels = vae.decode_chunk(latents, state)
    assert pixels.shape == (5, 3, 32, 32) and state["first"] is False and state["enc_first"] is False
