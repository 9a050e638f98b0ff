"""TAEHV / TAEW2.1 decoder: the published key layout, loading .pth and .safetensors files by those names,
streaming decode equal to whole-video decode, values pinned to the public implementation, dtypes."""

import math

import pytest
import torch
from safetensors.torch import save_file

from workers.config import GenerationConfig
from workers.model import get_config
from workers.model.taehv import TAEHVDecoder, build_taehv
from workers.model.vae import TinyVAE, build_decoder

DECODER_PARAMS = 9_844_611  # the published "about 9.84M"
ENCODER_PARAMS = 1_470_928


def published_layout(latent_channels: int = 16) -> dict[str, tuple[int, ...]]:
    """Every tensor of the public taew2_1 files, name -> shape (encoder and decoder; 128 tensors)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(key, cin, cout, k=3, bias=True):
        shapes[f"{key}.weight"] = (cout, cin, k, k)
        if bias:
            shapes[f"{key}.bias"] = (cout,)

    def mem(key, n):
        conv(f"{key}.conv.0", 2 * n, n)
        conv(f"{key}.conv.2", n, n)
        conv(f"{key}.conv.4", n, n)

    conv("encoder.0", 3, 64)
    for stage, pool in enumerate((2, 2, 1)):  # TPool, strided conv, 3 MemBlocks per stage
        i = 2 + 5 * stage
        conv(f"encoder.{i}.conv", 64 * pool, 64, k=1, bias=False)
        conv(f"encoder.{i + 1}", 64, 64, bias=False)
        for j in range(3):
            mem(f"encoder.{i + 2 + j}", 64)
    conv("encoder.17", 64, latent_channels)
    conv("decoder.1", latent_channels, 256)
    for stage, (n, n_next, grow) in enumerate(zip((256, 128, 64), (128, 64, 64), (1, 2, 2))):
        i = 3 + 6 * stage  # 3 MemBlocks, Upsample, TGrow, conv
        for j in range(3):
            mem(f"decoder.{i + j}", n)
        conv(f"decoder.{i + 4}.conv", n, n * grow, k=1, bias=False)
        conv(f"decoder.{i + 5}", n, n_next, bias=False)
    conv("decoder.22", 64, 3)
    return shapes


def random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """The published layout with seeded random values (std 1/sqrt(fan_in); mid-grey RGB bias)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in published_layout().items():
        t = torch.randn(shape, generator=gen)
        sd[key] = t / math.prod(shape[1:]) ** 0.5 if len(shape) > 1 else t * 0.05
    sd["decoder.22.bias"] += 0.5
    return sd


def write(sd: dict[str, torch.Tensor], path) -> str:
    path = str(path)
    if path.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    return path


def _stream(dec, latents, sizes):
    state, out, i = dec.new_state(), [], 0
    for n in sizes:
        out.append(dec.decode_chunk(latents[i:i + n], state))
        i += n
    return torch.cat(out)


def test_module_has_the_published_decoder_keys_and_size():
    layout = published_layout()
    assert len(layout) == 128
    dec = {k: v for k, v in layout.items() if k.startswith("decoder.")}
    own = {k: tuple(v.shape) for k, v in TAEHVDecoder().state_dict().items()}
    assert own == dec
    assert sum(math.prod(s) for s in dec.values()) == DECODER_PARAMS
    assert sum(p.numel() for p in TAEHVDecoder().parameters()) == DECODER_PARAMS
    enc = sum(math.prod(s) for k, s in layout.items() if k.startswith("encoder."))
    assert enc == ENCODER_PARAMS
    assert 2 * (enc + DECODER_PARAMS) == 22_631_078  # fp16 tensor bytes; the public file is 22,642,902


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_file_round_trip_by_published_names(tmp_path, ext):
    source = TAEHVDecoder(seed=1).eval()
    encoder = {k: v for k, v in random_state_dict(5).items() if k.startswith("encoder.")}
    path = write(encoder | source.state_dict(), tmp_path / f"taew2_1{ext}")
    loaded = TAEHVDecoder.from_file(path)
    latents = torch.randn(2, 16, 2, 3)
    assert torch.equal(loaded.decode_all(latents), source.decode_all(latents))
    assert not torch.allclose(TAEHVDecoder(seed=0).decode_all(latents), source.decode_all(latents), atol=1e-3)


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_fp16_file_with_every_published_tensor_loads(tmp_path, ext):
    sd = {k: v.half() for k, v in random_state_dict(2).items()}
    dec = TAEHVDecoder.from_file(write(sd, tmp_path / f"taew2_1{ext}"))
    for key, value in dec.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, sd[key].float()), key


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
@pytest.mark.parametrize("change,named", [
    (lambda sd: sd.pop("decoder.13.conv.weight"), r"missing keys \['decoder.13.conv.weight'\]"),
    (lambda sd: sd.update({"decoder.23.weight": torch.zeros(3)}), r"unexpected keys \['decoder.23.weight'\]"),
    (lambda sd: sd.update({"decoder.7.conv.weight": torch.zeros(512, 256, 1, 1)}),
     r"decoder.7.conv.weight has shape \(512, 256, 1, 1\), expected \(256, 256, 1, 1\)"),
    (lambda sd: sd.update({"decoder.1.weight": torch.zeros(256, 48, 3, 3)}), r"decoder.1.weight has shape"),
])
def test_bad_file_names_the_key(tmp_path, ext, change, named):
    sd = random_state_dict(0)
    change(sd)
    path = write(sd, tmp_path / f"bad{ext}")
    with pytest.raises(ValueError, match=named):
        TAEHVDecoder.from_file(path)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="taew2_1.pth"):
        TAEHVDecoder.from_file(str(tmp_path / "taew2_1.pth"))
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        TAEHVDecoder.from_file(str(tmp_path / "w.bin"))
    with pytest.raises(ValueError, match=r"latents \[F, 16, h, w\]"):
        TAEHVDecoder().decode_chunk(torch.zeros(1, 4, 2, 3), TAEHVDecoder().new_state())
    with pytest.raises(ValueError, match=r"got \(0, 16, 2, 3\)"):
        TAEHVDecoder().decode_chunk(torch.zeros(0, 16, 2, 3), TAEHVDecoder().new_state())


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1, 1], [2, 3], [1, 4], [3, 1, 1]])
def test_streaming_equals_whole_at_real_width(sizes):
    dec = TAEHVDecoder(seed=0).eval()  # real widths 256/128/64/64 at 64x96 pixels
    latents = torch.randn(sum(sizes), 16, 8, 12, generator=torch.Generator().manual_seed(3))
    whole = dec.decode_all(latents)
    assert whole.shape == (1 + 4 * (sum(sizes) - 1), 3, 64, 96)  # the Wan VAE's frame count
    assert ((whole > -1) & (whole < 1)).float().mean() > 0.5  # not saturated: the comparison means something
    streamed = _stream(dec, latents, sizes)
    assert streamed.shape == whole.shape
    assert (streamed - whole).abs().max() <= 1e-5
    other = latents.clone()
    other[0] += 1  # MemBlocks carry the past: a different first latent changes the last frames
    assert (dec.decode_all(other)[-4:] - whole[-4:]).abs().max() > 1e-3


def test_first_chunk_gives_one_frame_then_four():
    dec = TAEHVDecoder(widths=(32, 16, 8, 8))
    state = dec.new_state()
    counts = [dec.decode_chunk(torch.randn(1, 16, 2, 3), state).shape[0] for _ in range(3)]
    assert counts == [1, 4, 4]


def test_matches_the_public_implementation(tmp_path):
    """Values from madebyollin/taehv ``TAEHV.decode_video`` (sequential) * 2 - 1 on the same file and latents."""
    dec = TAEHVDecoder.from_file(write(random_state_dict(0), tmp_path / "taew2_1.pth"))
    out = dec.decode_all(torch.randn(3, 16, 2, 3, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (9, 3, 16, 24)
    frame_means = [-0.173808, -0.46364, -0.214261, -0.103523, -0.272511, -0.423704, -0.233699, -0.160597, -0.268535]
    pixel = [[-0.21946, -0.335962, 0.027106], [-1.0, -0.327918, -0.499644], [0.420591, -0.756653, -0.898227],
             [-0.43149, 0.013594, 0.043517], [-0.565495, -0.441065, 0.275683], [-1.0, -0.217231, -0.528539],
             [0.031731, -0.495703, -0.411492], [-0.531388, 0.125073, 0.218326], [-0.353828, -0.268321, -0.370642]]
    assert torch.allclose(out.mean(dim=(1, 2, 3)), torch.tensor(frame_means), atol=1e-4)
    assert torch.allclose(out[:, :, 5, 7], torch.tensor(pixel), atol=1e-4)


@pytest.mark.parametrize("dtype,max_err,mean_err", [(torch.bfloat16, 0.1, 0.01), (torch.float16, 0.02, 0.002)])
def test_low_precision(dtype, max_err, mean_err):
    latents = torch.randn(3, 16, 4, 6, generator=torch.Generator().manual_seed(2))
    ref = TAEHVDecoder(seed=0).eval().decode_all(latents)
    dec = TAEHVDecoder(seed=0).to("cpu", dtype).eval()
    assert all(p.dtype == dtype for p in dec.parameters())
    out = dec.decode_all(latents)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out - ref).abs()
    assert err.max() <= max_err and err.mean() <= mean_err
    assert (_stream(dec, latents, [1, 1, 1]) - out).abs().max() <= 2 * max_err


@pytest.mark.gpu
def test_cuda_decode_has_no_host_sync():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dec = TAEHVDecoder(seed=0).to("cuda", torch.bfloat16).eval()
    latents = torch.randn(3, 16, 8, 12, device="cuda")
    state = dec.new_state()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = torch.cat([dec.decode_chunk(latents[i:i + 1], state) for i in range(3)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.is_cuda and (out.cpu() - dec.decode_all(latents).cpu()).abs().max() <= 0.05


def test_build_decoder_follows_the_config(tmp_path):
    tiny = GenerationConfig(model=get_config("tiny"))
    assert isinstance(build_decoder(tiny), TinyVAE)  # vae_decoder wan: the VAE's own
    seeded = build_decoder(GenerationConfig(model=get_config("tiny", vae_decoder="taehv")))
    assert isinstance(seeded, TAEHVDecoder)
    path = write(random_state_dict(4), tmp_path / "taew2_1.safetensors")
    gen = GenerationConfig(model=get_config("tiny", vae_decoder="taehv"), taehv_path=path)
    loaded = build_decoder(gen, dtype=torch.bfloat16)
    assert loaded.decoder[1].weight.dtype == torch.bfloat16
    assert torch.equal(loaded.decoder[1].bias, random_state_dict(4)["decoder.1.bias"].bfloat16())
    with pytest.raises(FileNotFoundError, match="taehv_path"):
        build_taehv(get_config("wan2.1-1.3b", vae_decoder="taehv"))
    with pytest.raises(ValueError, match="vae_decoder"):
        get_config("tiny", vae_decoder="taehv", vae_stride=(4, 16, 16))
