"""The DiT's bidirectional forward equals diffusers.WanTransformer3DModel on random weights (REFERENCE §5)."""

import pytest
import torch

from workers.model import CausalWanModel, get_config

diffusers = pytest.importorskip("diffusers")


def to_diffusers_key(key: str) -> str:
    """Original Wan name -> diffusers name (REFERENCE §5; note norm2 <-> norm3)."""
    top = {
        "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
        "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
        "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
        "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
        "time_projection.1.": "condition_embedder.time_proj.",
        "head.head.": "proj_out.",
    }
    for old, new in top.items():
        if key.startswith(old):
            return new + key[len(old):]
    if key == "head.modulation":
        return "scale_shift_table"
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        sub = {
            "modulation": "scale_shift_table",
            "ffn.0.weight": "ffn.net.0.proj.weight", "ffn.0.bias": "ffn.net.0.proj.bias",
            "ffn.2.weight": "ffn.net.2.weight", "ffn.2.bias": "ffn.net.2.bias",
            "norm3.weight": "norm2.weight", "norm3.bias": "norm2.bias",
        }
        if rest in sub:
            rest = sub[rest]
        else:
            for old, new in (("self_attn.", "attn1."), ("cross_attn.", "attn2.")):
                if rest.startswith(old):
                    rest = new + rest[len(old):]
            rest = rest.replace(".q.", ".to_q.").replace(".k.", ".to_k.").replace(".v.", ".to_v.")
            rest = rest.replace(".o.", ".to_out.0.")
        return f"blocks.{i}.{rest}"
    return key


def build_pair(cfg):
    ours = CausalWanModel(cfg).eval()
    ref = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=cfg.eps, rope_max_seq_len=1024).eval()
    mapped = {to_diffusers_key(k): v for k, v in ours.state_dict().items()}
    ref.load_state_dict(mapped, strict=True)
    return ours, ref


CONFIGS = [
    get_config("tiny"),  # 2 heads x 32
    get_config("tiny", dim=96, num_heads=6, ffn_dim=160, num_layers=2, text_dim=48),  # 6 heads x 16
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["tiny-2h", "6h"])
def test_bidirectional_forward_matches_diffusers(cfg):
    ours, ref = build_pair(cfg)
    b, f, h, w = 2, 3, 6, 10  # F >= 3, H != W (latent 6x10 -> 3x5 tokens)
    x = torch.randn(b, cfg.in_channels, f, h, w)
    t = torch.tensor([[999.0, 937.5, 625.0], [500.0, 250.0, 0.0]])  # per-frame timesteps
    ctx = torch.randn(b, 7, cfg.text_dim)
    with torch.no_grad():
        got = ours(x, t, ctx)
        tokens = (h // 2) * (w // 2)
        want = ref(hidden_states=x, timestep=t.repeat_interleave(tokens, dim=1), encoder_hidden_states=ctx,
                   return_dict=False)[0]
    assert got.shape == want.shape == x.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-4, err
    # And the check has teeth: a different timestep for one frame changes the output.
    t2 = t.clone()
    t2[0, 1] = 100.0
    with torch.no_grad():
        assert (ours(x, t2, ctx) - got).abs().max() > 1e-3
