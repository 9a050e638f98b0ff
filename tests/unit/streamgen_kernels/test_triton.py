"""Triton kernels against their torch references (TRITON_INTERPRET=1 on CPU), small shapes."""

import pytest
import torch

triton = pytest.importorskip("triton")

from streamgen_kernels import reference, triton_ops  # noqa: E402
from workers.config import get_config  # noqa: E402
from workers.model.rope import rope_tables  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
SHAPES = [(1, 1, 24), (2, 5, 48), (3, 7, 96), (2, 3, 80)]  # frames, tokens, channels (non-powers of two)


def close(a, b, dtype):
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    err = (a.float() - b.float()).abs().max().item()
    scale = max(1.0, b.float().abs().max().item())
    assert err <= TOL[dtype] * scale, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("f,t,c", SHAPES)
def test_norm_modulate(f, t, c, dtype):
    x = torch.randn(f, t, c).to(dtype)
    shift, scale = torch.randn(f, c).to(dtype), torch.randn(f, c).to(dtype)
    close(triton_ops.norm_modulate(x, shift, scale, 1e-6), reference.norm_modulate(x, shift, scale, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("f,t,c", SHAPES)
def test_gated_residual_and_fused_norm(f, t, c, dtype):
    x, y = torch.randn(f, t, c).to(dtype), torch.randn(f, t, c).to(dtype)
    gate, shift, scale = (torch.randn(f, c).to(dtype) for _ in range(3))
    close(triton_ops.gated_residual(x, y, gate), reference.gated_residual(x, y, gate), dtype)
    res, out = triton_ops.gated_residual_norm_modulate(x, y, gate, shift, scale, 1e-6)
    want_res, want_out = reference.gated_residual_norm_modulate(x, y, gate, shift, scale, 1e-6)
    close(res, want_res, dtype)
    close(out, want_out, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frames,heads,head_dim,start", [(1, 2, 16, 0), (3, 3, 16, 7), (2, 1, 32, 2), (2, 5, 12, 4)])
@pytest.mark.parametrize("variant", ["strided", "split"])
def test_qk_norm_rope(frames, heads, head_dim, start, dtype, variant):
    grid = (2, 3)
    c = heads * head_dim
    q, k = torch.randn(frames, 6, c).to(dtype), torch.randn(frames, 6, c).to(dtype)
    wq, wk = (1 + 0.1 * torch.randn(c)).to(dtype), (1 + 0.1 * torch.randn(c)).to(dtype)
    cos, sin = rope_tables(torch.arange(start, start + frames), grid, head_dim)  # temporal offset `start`
    got = getattr(triton_ops, f"qk_norm_rope_{variant}")(q, k, wq, wk, cos, sin, 1e-6)
    want = reference.qk_norm_rope(q, k, wq, wk, cos, sin, 1e-6)
    close(got[0], want[0], dtype)
    close(got[1], want[1], dtype)


def test_tiny_model_with_kernels_forced_on_equals_reference_path():
    from workers.model import CausalWanModel

    torch.manual_seed(0)
    ref = CausalWanModel(get_config("tiny", kernel_backend="torch")).eval()
    fused = CausalWanModel(get_config("tiny", kernel_backend="triton")).eval()
    assert torch.equal(ref.state_dict()["blocks.0.self_attn.q.weight"], fused.state_dict()["blocks.0.self_attn.q.weight"])
    x = torch.randn(1, 16, 3, 4, 6)
    t = torch.tensor([[900.0, 500.0, 100.0]])
    ctx = torch.randn(1, 5, 32)
    with torch.no_grad():
        want = ref(x, t, ctx, frames_per_block=1)
        got = fused(x, t, ctx, frames_per_block=1)
    assert (got - want).abs().max() <= 1e-4
