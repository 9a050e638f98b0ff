"""Triton kernels for the DiT block's memory-bound ops, same signatures and semantics as streamgen_kernels.reference.

Layout: x is [F, T, C] contiguous (latent frames, tokens per frame, channels); per-frame vectors [F, C].
Every kernel reads its inputs once and writes its output once, computing in float32 and storing in the
input dtype. One program handles one token row of C channels (C padded to a power of two and masked).

On CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``, set before this module is
imported); tests compare them with the references that way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _modulated_norm(x, mask, shift_ptr, scale_ptr, frame, cols, C, eps):
    """LayerNorm (no affine) of a float32 row, then * (1 + scale) + shift of its frame."""
    mean = tl.sum(x, axis=0) / C
    diff = tl.where(mask, x - mean, 0.0)
    var = tl.sum(diff * diff, axis=0) / C
    shift = tl.load(shift_ptr + frame * C + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + frame * C + cols, mask=mask, other=0.0).to(tl.float32)
    return diff / tl.sqrt(var + eps) * (1.0 + scale) + shift


@triton.jit
def _gated_sum(x_ptr, y_ptr, gate_ptr, row, frame, cols, mask, C):
    """x + gate * y for one row, in float32."""
    x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + frame * C + cols, mask=mask, other=0.0).to(tl.float32)
    return x + g * y


@triton.jit
def _norm_modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, T, C, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)  # token row in [0, F*T)
    frame = row // T
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    out = _modulated_norm(x, mask, shift_ptr, scale_ptr, frame, cols, C, eps)
    tl.store(out_ptr + row * C + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, T, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    res = _gated_sum(x_ptr, y_ptr, gate_ptr, row, row // T, cols, mask, C)
    tl.store(out_ptr + row * C + cols, res.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_norm_modulate_kernel(x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, res_ptr, out_ptr, T, C, eps,
                                         BLOCK_C: tl.constexpr):
    """res = x + gate * y, then out = LN(res) * (1 + scale) + shift: one read of x and y, two writes."""
    row = tl.program_id(0)
    frame = row // T
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    res = _gated_sum(x_ptr, y_ptr, gate_ptr, row, frame, cols, mask, C).to(res_ptr.dtype.element_ty)
    tl.store(res_ptr + row * C + cols, res, mask=mask)
    # normalise what was stored (rounded to the storage dtype), as the unfused ops would
    out = _modulated_norm(res.to(tl.float32), mask, shift_ptr, scale_ptr, frame, cols, C, eps)
    tl.store(out_ptr + row * C + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, q_out, k_out, HALF_C, HALF_D, eps,
                         BLOCK: tl.constexpr):
    """One token row of q and of k: RMSNorm over all C channels, then rotate adjacent pairs per head.

    Pairs (2j, 2j+1), j in [0, C/2); pair j belongs to head j // (D/2) at rotary slot j % (D/2).
    cos / sin are [rows, D/2].
    """
    row = tl.program_id(0)
    j = tl.arange(0, BLOCK)
    mask = j < HALF_C
    slot = j % HALF_D
    c = tl.load(cos_ptr + row * HALF_D + slot, mask=mask, other=1.0)
    s = tl.load(sin_ptr + row * HALF_D + slot, mask=mask, other=0.0)
    C = 2 * HALF_C
    base = row * C
    for which in tl.static_range(2):  # q, then k: one pass over both
        src = q_ptr if which == 0 else k_ptr
        dst = q_out if which == 0 else k_out
        w_ptr = wq_ptr if which == 0 else wk_ptr
        xe = tl.load(src + base + 2 * j, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(src + base + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt((tl.sum(xe * xe, axis=0) + tl.sum(xo * xo, axis=0)) / C + eps)
        we = tl.load(w_ptr + 2 * j, mask=mask, other=0.0).to(tl.float32)
        wo = tl.load(w_ptr + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
        ne = xe * inv * we
        no = xo * inv * wo
        tl.store(dst + base + 2 * j, (ne * c - no * s).to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + base + 2 * j + 1, (ne * s + no * c).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_split_kernel(q_ptr, k_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, q_out, k_out, HALF_C, HALF_D, eps,
                               BLOCK: tl.constexpr):
    """Same as _qk_norm_rope_kernel, but each row is read and written with contiguous (vectorisable)
    accesses: load [2*BLOCK], view as [BLOCK, 2] pairs, split, rotate, interleave back."""
    row = tl.program_id(0)
    cols = tl.arange(0, 2 * BLOCK)
    C = 2 * HALF_C
    mask = cols < C
    j = tl.arange(0, BLOCK)
    slot = j % HALF_D
    c = tl.load(cos_ptr + row * HALF_D + slot, mask=j < HALF_C, other=1.0)
    s = tl.load(sin_ptr + row * HALF_D + slot, mask=j < HALF_C, other=0.0)
    base = row * C
    for which in tl.static_range(2):  # q, then k
        src = q_ptr if which == 0 else k_ptr
        dst = q_out if which == 0 else k_out
        w_ptr = wq_ptr if which == 0 else wk_ptr
        x = tl.load(src + base + cols, mask=mask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        xe, xo = tl.split(tl.reshape(x * inv * w, (BLOCK, 2)))
        out = tl.interleave(xe * c - xo * s, xe * s + xo * c)
        tl.store(dst + base + cols, out.to(dst.dtype.element_ty), mask=mask)


NUM_WARPS = 4
"""Warps per token row. bench/kernels.py sweeps 1-16 on a GPU; on an H200 no other value was faster beyond
noise at the wan2.1-1.3b shapes. The interpreter ignores it."""


def _rows(x: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"expected x of shape [F, T, C], got {tuple(x.shape)}")
    f, t, c = x.shape
    return f * t, t, c


def norm_modulate(x, shift, scale, eps: float, num_warps: int | None = None):
    rows, t, c = _rows(x)
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    out = torch.empty_like(x)
    _norm_modulate_kernel[(rows,)](x, shift, scale, out, t, c, eps, BLOCK_C=triton.next_power_of_2(c),
                                   num_warps=num_warps or NUM_WARPS)
    return out


def gated_residual(x, y, gate, num_warps: int | None = None):
    rows, t, c = _rows(x)
    x, y, gate = x.contiguous(), y.contiguous(), gate.contiguous()
    out = torch.empty_like(x)
    _gated_residual_kernel[(rows,)](x, y, gate, out, t, c, BLOCK_C=triton.next_power_of_2(c),
                                    num_warps=num_warps or NUM_WARPS)
    return out


def gated_residual_norm_modulate(x, y, gate, shift, scale, eps: float, num_warps: int | None = None):
    rows, t, c = _rows(x)
    x, y, gate, shift, scale = (a.contiguous() for a in (x, y, gate, shift, scale))
    res, out = torch.empty_like(x), torch.empty_like(x)
    _gated_residual_norm_modulate_kernel[(rows,)](x, y, gate, shift, scale, res, out, t, c, eps,
                                                  BLOCK_C=triton.next_power_of_2(c), num_warps=num_warps or NUM_WARPS)
    return res, out


def qk_norm_rope_strided(q, k, weight_q, weight_k, cos, sin, eps: float, num_warps: int | None = None):
    return _qk_norm_rope(_qk_norm_rope_kernel, q, k, weight_q, weight_k, cos, sin, eps, num_warps)


def qk_norm_rope_split(q, k, weight_q, weight_k, cos, sin, eps: float, num_warps: int | None = None):
    return _qk_norm_rope(_qk_norm_rope_split_kernel, q, k, weight_q, weight_k, cos, sin, eps, num_warps)


def _qk_norm_rope(kernel, q, k, weight_q, weight_k, cos, sin, eps: float, num_warps: int | None):
    rows, t, c = _rows(q)
    half_d = cos.shape[-1]
    if q.shape != k.shape or half_d < 1 or c % (2 * half_d):
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} do not split into heads of {2 * half_d} channels")
    q, k = q.contiguous(), k.contiguous()
    cos = cos.expand(q.shape[0], t, half_d).contiguous().float()
    sin = sin.expand(q.shape[0], t, half_d).contiguous().float()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    kernel[(rows,)](q, k, weight_q.contiguous(), weight_k.contiguous(), cos, sin, q_out, k_out,
                    c // 2, half_d, eps, BLOCK=triton.next_power_of_2(c // 2), num_warps=num_warps or NUM_WARPS)
    return q_out, k_out


# the variant the model uses: contiguous loads ran 1.6x faster than strided ones on an H200
# (bench/kernels.py times both)
qk_norm_rope = qk_norm_rope_split

OPS = {"norm_modulate": norm_modulate, "gated_residual": gated_residual, "qk_norm_rope": qk_norm_rope,
       "gated_residual_norm_modulate": gated_residual_norm_modulate}
