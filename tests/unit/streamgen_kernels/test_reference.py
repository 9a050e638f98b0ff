"""Kernel references against independent formulations (Wan's complex RoPE, textbook LayerNorm), and dispatch."""

import pytest
import torch

from streamgen_kernels import ops, reference
from workers.model.rope import axis_dims, rope_tables


def test_axis_split_of_real_head():
    assert axis_dims(128) == (44, 42, 42)  # complex 22 / 21 / 21


def wan_rope(x, f, h, w, start, head_dim):
    """Wan's formulation: complex multiply with per-axis polar tables in float64."""
    dt, dh, dw = axis_dims(head_dim)

    def params(n, d):
        return torch.polar(torch.ones(n, d // 2, dtype=torch.float64),
                           torch.outer(torch.arange(n, dtype=torch.float64),
                                       1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)))

    ft, fh, fw = params(1024, dt)[start:start + f], params(1024, dh)[:h], params(1024, dw)[:w]
    freqs = torch.cat((ft[:, None, None].expand(f, h, w, -1), fh[None, :, None].expand(f, h, w, -1),
                       fw[None, None].expand(f, h, w, -1)), -1).reshape(f, h * w, 1, -1)
    xc = torch.view_as_complex(x.double().reshape(f, h * w, -1, head_dim // 2, 2))
    return torch.view_as_real(xc * freqs).reshape(f, h * w, -1).float()


@pytest.mark.parametrize("head_dim,heads,start", [(32, 2, 0), (16, 3, 5), (128, 1, 40)])
def test_rope_matches_wan_complex_form(head_dim, heads, start):
    f, h, w = 3, 2, 5
    x = torch.randn(f, h * w, heads * head_dim)
    cos, sin = rope_tables(torch.arange(start, start + f), (h, w), head_dim)
    assert (reference.rope(x, cos, sin) - wan_rope(x, f, h, w, start, head_dim)).abs().max() <= 1e-5


def test_norm_modulate_and_gated_residual():
    x = torch.randn(3, 7, 24)
    shift, scale, gate = torch.randn(3, 24), torch.randn(3, 24), torch.randn(3, 24)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    want = (x - mu) / torch.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift[:, None]
    assert (reference.norm_modulate(x, shift, scale, 1e-6) - want).abs().max() <= 1e-5
    y = torch.randn(3, 7, 24)
    assert (reference.gated_residual(x, y, gate) - (x + gate[:, None] * y)).abs().max() <= 1e-6


def test_qk_norm_rope_is_norm_then_rope():
    q, k = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    wq, wk = torch.rand(32) + 0.5, torch.rand(32) + 0.5
    cos, sin = rope_tables(torch.arange(2), (2, 3), 16)
    rq, rk = reference.qk_norm_rope(q, k, wq, wk, cos, sin, 1e-6)
    nq = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * wq
    assert (rq - reference.rope(nq, cos, sin)).abs().max() <= 1e-5
    assert rk.shape == k.shape


def test_dispatch():
    x = torch.randn(2, 3, 8)
    shift = scale = torch.zeros(2, 8)
    assert torch.equal(ops.norm_modulate(x, shift, scale, 1e-6, "torch"),
                       reference.norm_modulate(x, shift, scale, 1e-6))
    assert torch.equal(ops.norm_modulate(x, shift, scale, 1e-6, "auto"),
                       reference.norm_modulate(x, shift, scale, 1e-6))  # CPU tensors: reference
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.norm_modulate(x, shift, scale, 1e-6, "cuda")
