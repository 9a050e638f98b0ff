"""Self-Forcing-format checkpoints written by the test reload to identical outputs; bad files fail by name."""

import pytest
import torch
from safetensors.torch import save_file

from workers.loader import CheckpointError, clean_key, load_weights, read_state_dict
from workers.model import CausalWanModel, get_config

CFG = get_config("tiny")


def _forward(model):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, CFG.in_channels, 3, 4, 6, generator=g)
    t = torch.tensor([[900.0, 500.0, 100.0]])
    ctx = torch.randn(1, 5, CFG.text_dim, generator=g)
    with torch.no_grad():
        return model(x, t, ctx, frames_per_block=1)


@pytest.fixture(scope="module")
def source():
    return CausalWanModel(get_config("tiny", init_seed=123)).eval()


def test_prefixes_are_stripped():
    assert clean_key("model.blocks.0.self_attn.q.weight") == "blocks.0.self_attn.q.weight"
    assert clean_key("model._fsdp_wrapped_module.blocks.1.ffn.0.bias") == "blocks.1.ffn.0.bias"
    assert clean_key("_fsdp_wrapped_module.head.head.weight") == "head.head.weight"


@pytest.mark.parametrize("prefix", ["model.", "model._fsdp_wrapped_module."])
@pytest.mark.parametrize("which", ["generator", "generator_ema"])
def test_self_forcing_checkpoint_round_trip(tmp_path, source, prefix, which):
    sd = {prefix + k: v.clone() for k, v in source.state_dict().items()}
    other = {prefix + k: torch.zeros_like(v) for k, v in source.state_dict().items()}
    blob = {"generator": sd if which == "generator" else other,
            "generator_ema": sd if which == "generator_ema" else other, "critic": {"x": torch.zeros(1)}}
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save(blob, path)
    target = CausalWanModel(CFG).eval()  # init_seed 0: different weights until loaded
    assert not torch.equal(_forward(target), _forward(source))
    load_weights(target, str(path), use_ema=(which == "generator_ema"))
    assert torch.equal(_forward(target), _forward(source))


def test_safetensors_round_trip(tmp_path, source):
    path = tmp_path / "model.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = CausalWanModel(CFG).eval()
    load_weights(target, str(path))
    assert torch.equal(_forward(target), _forward(source))


def test_slice_loads_only_its_blocks(tmp_path, source):
    path = tmp_path / "ckpt.pt"
    torch.save({"generator": {"model." + k: v for k, v in source.state_dict().items()}}, path)
    part = CausalWanModel(CFG, block_range=(1, 3), with_embed=False, with_head=False)
    load_weights(part, str(path))
    assert set(part.state_dict()) == {k for k in source.state_dict() if k.split(".")[:2] in (["blocks", "1"], ["blocks", "2"])}
    for k, v in part.state_dict().items():
        assert torch.equal(v, source.state_dict()[k])


def test_missing_keys_are_named(tmp_path, source):
    sd = dict(source.state_dict())
    del sd["blocks.2.self_attn.norm_k.weight"]
    path = tmp_path / "missing.pt"
    torch.save({"generator": sd}, path)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\.self_attn\.norm_k\.weight"):
        load_weights(CausalWanModel(CFG), str(path))


def test_unexpected_keys_are_named(tmp_path, source):
    sd = dict(source.state_dict())
    sd["blocks.0.self_attn.lora_A.weight"] = torch.zeros(2, 2)
    sd["blocks.9.ffn.0.weight"] = torch.zeros(2, 2)  # the tiny model has 4 blocks
    path = tmp_path / "unexpected.pt"
    torch.save({"generator": sd}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*blocks\.0\.self_attn\.lora_A\.weight.*blocks\.9\.ffn\.0\.weight"):
        load_weights(CausalWanModel(CFG), str(path))


def test_shape_mismatch_and_missing_file(tmp_path, source):
    sd = dict(source.state_dict())
    sd["head.head.weight"] = torch.zeros(3, 3)
    path = tmp_path / "shape.pt"
    torch.save(sd, path)  # a bare state dict is accepted too
    with pytest.raises(CheckpointError, match=r"shape mismatch.*head\.head\.weight"):
        load_weights(CausalWanModel(CFG), str(path))
    with pytest.raises(FileNotFoundError):
        read_state_dict(str(tmp_path / "nope.pt"))
    torch.save({"generator": dict(source.state_dict())}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="generator_ema"):
        read_state_dict(str(tmp_path / "g.pt"), use_ema=True)


def test_stage_holds_only_owned_weights():
    full = CausalWanModel(CFG)
    first = CausalWanModel(CFG, block_range=(0, 2), with_embed=True, with_head=False)
    last = CausalWanModel(CFG, block_range=(2, 4), with_embed=False, with_head=True)
    assert {k.split(".")[1] for k in first.state_dict() if k.startswith("blocks.")} == {"0", "1"}
    assert not any(k.startswith(("head.", "blocks.2", "blocks.3")) for k in first.state_dict())
    assert not any(k.startswith(("patch_embedding", "text_embedding", "time_")) for k in last.state_dict())
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(first) + n(last) == n(full)
    for k, v in last.state_dict().items():  # seeded per name: slices hold the full model's weights
        assert torch.equal(v, full.state_dict()[k])
