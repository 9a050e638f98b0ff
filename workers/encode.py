"""Frame encoding for the wire: JPEG (PIL) or raw RGB bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_frames(frames: np.ndarray, encoding: str, jpeg_quality: int) -> list[bytes]:
    """uint8 frames [N, H, W, 3] -> one bytes object per frame."""
    if encoding == "raw_rgb":
        return [f.tobytes() for f in frames]
    if encoding != "jpeg":
        raise ValueError(f"unknown encoding {encoding!r}")
    out = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=jpeg_quality)
        out.append(buf.getvalue())
    return out
