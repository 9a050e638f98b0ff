"""Dispatch for the block's memory-bound ops: the model calls these and nothing else.

``backend`` is the model config's ``kernel_backend``: ``torch`` always runs the reference; ``auto``
runs a Triton kernel on CUDA tensors when one is registered for the op; ``triton`` requires one.
"""

from __future__ import annotations

from typing import Callable

import torch

from kernels import reference

# Op name -> Triton implementation with the reference's signature. Filled by kernels.triton_ops when
# triton imports; empty means every op runs its torch reference.
TRITON_OPS: dict[str, Callable] = {}


def _pick(op: str, backend: str, x: torch.Tensor) -> Callable:
    if backend == "torch":
        return getattr(reference, op)
    fused = TRITON_OPS.get(op)
    if backend == "triton":
        if fused is None:
            raise RuntimeError(f"kernel_backend='triton' but no Triton kernel is available for {op!r}")
        return fused
    if backend == "auto":
        return fused if (fused is not None and x.is_cuda) else getattr(reference, op)
    raise ValueError(f"unknown kernel backend {backend!r}")


def norm_modulate(x, shift, scale, eps: float, backend: str = "auto"):
    return _pick("norm_modulate", backend, x)(x, shift, scale, eps)


def qk_norm_rope(q, k, weight_q, weight_k, cos, sin, eps: float, backend: str = "auto"):
    return _pick("qk_norm_rope", backend, q)(q, k, weight_q, weight_k, cos, sin, eps)


def gated_residual(x, y, gate, backend: str = "auto"):
    return _pick("gated_residual", backend, x)(x, y, gate)
