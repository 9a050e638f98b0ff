"""Writing frames to a video file with PyAV (H.264 in MP4, falling back to MPEG-4 part 2)."""

from __future__ import annotations

import os
from typing import Iterable

import av
import numpy as np


class VideoWriter:
    """Append uint8 RGB frames [H, W, 3] to a video file; use as a context manager."""

    def __init__(self, path: str, fps: float, width: int, height: int):
        if width % 2 or height % 2:
            raise ValueError(f"video size must be even for yuv420p, got {width}x{height}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.container = av.open(path, mode="w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=max(1, round(fps)))
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self.container.mux(packet)
        self.frames += 1

    def write_all(self, frames: Iterable[np.ndarray]) -> None:
        for frame in frames:
            self.write(frame)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_video(path: str) -> np.ndarray:
    """Decode a video file to uint8 frames [N, H, W, 3] (tests and tooling)."""
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def iter_video(path: str):
    """(uint8 frame [H, W, 3], its time in seconds) of each frame of a video file, decoded lazily (the file's
    frame rate: ``video_rate``)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24"), float(frame.time or 0.0)


def video_frames(path: str) -> int:
    """Frames a video file holds, as its container says (0 when it does not say)."""
    with av.open(path) as container:
        return int(container.streams.video[0].frames or 0)


def video_rate(path: str) -> float:
    """A video file's frame rate (frames per second)."""
    with av.open(path) as container:
        rate = container.streams.video[0].average_rate
        return float(rate) if rate else 0.0


def synthetic_clip(path: str, frames: int = 64, fps: float = 8.0, width: int = 96, height: int = 64) -> str:
    """A small test clip, made here (nothing shipped or downloaded): a bright ball moving right over a slowly
    shifting colour gradient, so motion and content are easy to see in the restyled output."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    with VideoWriter(path, fps, width, height) as writer:
        for i in range(frames):
            phase = i / max(frames - 1, 1)
            img = np.stack([(xs / width) * 180 + 40 * phase, (ys / height) * 160, 120 - 60 * phase * np.ones_like(xs)],
                           axis=-1)
            cx, cy = (0.15 + 0.7 * phase) * width, height * (0.5 + 0.2 * np.sin(6.28 * phase))
            ball = (xs - cx) ** 2 + (ys - cy) ** 2 < (0.12 * height) ** 2
            img[ball] = (250, 230, 60)
            writer.write(np.clip(img, 0, 255).astype(np.uint8))
    return path
