"""The demo VAE: the StreamingDecoder and StreamingEncoder contracts (chunk by chunk equals all at once), the Wan frame layout,
training-time decode equal to streaming decode, and loading from a demo checkpoint."""

import pytest
import torch

from workers.config import get_config
from workers.model.demo_vae import DemoVAE, load_demo_vae
from workers.model.vae import build_vae


def _vae() -> DemoVAE:
    torch.manual_seed(1)
    vae = DemoVAE(z_dim=8, width=16).eval()
    vae.latent_mean.copy_(torch.randn(8) * 0.1)
    vae.latent_std.copy_(torch.rand(8) + 0.5)
    return vae


@pytest.mark.parametrize("sizes", [[1] * 6, [3, 3], [1, 2, 3]])
def test_streaming_decode_equals_decoding_everything(sizes):
    vae = _vae()
    latents = torch.randn(sum(sizes), 8, 8, 8)
    full = vae.decode_all(latents)
    assert full.shape == (1 + 4 * (sum(sizes) - 1), 3, 64, 64)  # the first latent frame is one video frame
    state, parts, i = vae.new_state(), [], 0
    for n in sizes:
        parts.append(vae.decode_chunk(latents[i:i + n], state))
        i += n
    assert (torch.cat(parts) - full).abs().max() <= 1e-5
    with torch.no_grad():
        assert (vae.decode_train(latents) - full).abs().max() <= 1e-5
    # causal: a latent's predecessor shapes its frames, later latents do not
    other = latents.clone()
    other[-1] += 1
    assert (vae.decode_all(other)[:-4] - full[:-4]).abs().max() == 0
    other = latents.clone()
    other[-2] += 1
    assert (vae.decode_all(other)[-4:] - full[-4:]).abs().max() > 1e-4


def test_encode_groups_frames_like_the_wan_vae():
    vae = _vae()
    video = torch.rand(9, 3, 64, 64) * 2 - 1
    groups = vae.groups(video)
    assert groups.shape == (3, 12, 64, 64)
    assert torch.equal(groups[0].view(4, 3, 64, 64), video[:1].expand(4, -1, -1, -1))  # frame 0 alone
    assert torch.equal(groups[2].view(4, 3, 64, 64), video[5:9])
    assert vae.encode(video).shape == (3, 8, 8, 8)
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.groups(video[:8])


@pytest.mark.parametrize("sizes", [[1, 4, 4], [5, 8], [13]])
def test_streaming_encode_equals_encoding_everything(sizes):
    """Video-to-video encodes chunk by chunk through the StreamingEncoder interface: 1 + 4k frames first,
    then 4k; it equals encoding the whole video, and bad frame counts are refused."""
    vae = _vae()
    video = torch.rand(sum(sizes), 3, 64, 64) * 2 - 1
    state, parts, i = vae.new_state(), [], 0
    for n in sizes:
        parts.append(vae.encode_chunk(video[i:i + n], state))
        i += n
    assert (torch.cat(parts) - vae.encode(video)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="4k frames"):
        vae.encode_chunk(video[:3], state)


def test_loads_from_a_demo_checkpoint_through_build_vae(tmp_path):
    vae = _vae()
    path = tmp_path / "demo.pt"
    torch.save({"generator": {}, "vae": vae.state_dict(), "vae_config": {"z_dim": 8, "width": 16}}, path)
    loaded = build_vae(get_config("demo"), str(path))
    latents = torch.randn(4, 8, 8, 8)
    assert torch.equal(loaded.decode_all(latents), vae.decode_all(latents))
    with pytest.raises(ValueError, match="latent channels"):
        load_demo_vae(str(path), 16)
    torch.save({"generator": {}}, tmp_path / "dit_only.pt")
    with pytest.raises(ValueError, match="no 'vae' entry"):
        load_demo_vae(str(tmp_path / "dit_only.pt"), 8)
    with pytest.raises(FileNotFoundError):
        load_demo_vae(str(tmp_path / "missing.pt"), 8)
