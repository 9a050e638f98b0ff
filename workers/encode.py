"""Frame encoding for the wire, next to the decode: JPEG (on the GPU with torchvision where the frames are
on CUDA and torchvision is present, else PIL) or raw RGB bytes. One call per chunk."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def encode_frames(frames: torch.Tensor | np.ndarray, encoding: str, jpeg_quality: int) -> list[bytes]:
    """uint8 frames [N, H, W, 3] -> one bytes object per frame."""
    if encoding not in ("jpeg", "raw_rgb"):
        raise ValueError(f"unknown encoding {encoding!r}")
    if isinstance(frames, torch.Tensor) and frames.device.type == "cuda" and encoding == "jpeg":
        gpu = _gpu_jpeg(frames, jpeg_quality)
        if gpu is not None:
            return gpu
    array = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else frames
    if encoding == "raw_rgb":
        return [f.tobytes() for f in array]
    out = []
    for f in array:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=jpeg_quality)
        out.append(buf.getvalue())
    return out


def _gpu_jpeg(frames: torch.Tensor, quality: int) -> list[bytes] | None:
    """nvJPEG through torchvision, the chunk's frames in one batched call; None without torchvision."""
    try:
        from torchvision.io import encode_jpeg
    except ImportError:
        return None
    encoded = encode_jpeg([f.permute(2, 0, 1).contiguous() for f in frames], quality=quality)  # [3, H, W] each
    return [bytes(e.cpu().numpy()) for e in encoded]
