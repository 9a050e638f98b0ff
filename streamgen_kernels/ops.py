"""Dispatch for the block's memory-bound ops: the model calls these and nothing else.

``backend`` is the model config's ``kernel_backend``: ``torch`` always runs the reference; ``auto``
runs the Triton kernel on CUDA tensors when Triton is installed; ``triton`` requires it (on CPU that
means the Triton interpreter, ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Callable

from streamgen_kernels import reference

_TRITON: dict[str, Callable] | None = None  # loaded on first use; {} when Triton is not installed


def triton_ops() -> dict[str, Callable]:
    global _TRITON
    if _TRITON is None:
        try:
            from streamgen_kernels.triton_ops import OPS
        except ImportError:
            OPS = {}
        _TRITON = OPS
    return _TRITON


def _pick(op: str, backend: str, x) -> Callable:
    if backend == "torch":
        return getattr(reference, op)
    if backend == "auto":
        if not x.is_cuda:
            return getattr(reference, op)
        return triton_ops().get(op) or getattr(reference, op)
    if backend == "triton":
        fused = triton_ops().get(op)
        if fused is None:
            raise RuntimeError(f"kernel_backend='triton' but Triton is not available for {op!r}")
        return fused
    raise ValueError(f"unknown kernel backend {backend!r}")


def norm_modulate(x, shift, scale, eps: float, backend: str = "auto"):
    return _pick("norm_modulate", backend, x)(x, shift, scale, eps)


def qk_norm_rope(q, k, weight_q, weight_k, cos, sin, eps: float, backend: str = "auto"):
    return _pick("qk_norm_rope", backend, q)(q, k, weight_q, weight_k, cos, sin, eps)


def gated_residual(x, y, gate, backend: str = "auto"):
    return _pick("gated_residual", backend, x)(x, y, gate)


def gated_residual_norm_modulate(x, y, gate, shift, scale, eps: float, backend: str = "auto"):
    return _pick("gated_residual_norm_modulate", backend, x)(x, y, gate, shift, scale, eps)
