"""Video-to-video ingress: input frames in, paced input chunks out (numpy and PIL; no torch, ray or grpc).

* ``decode_frame``: an InputFrame's bytes (JPEG or raw RGB) -> uint8 [H, W, 3] at the stream's size,
  centre-cropped to its aspect and resized; bad input raises ``InvalidFrame`` naming the reason.
* ``Ingress``: a stream's bounded input queue and chunk builder; it counts each input frame's one outcome.
  Frames whose index does not increase are dropped (``dropped_order``). A chunk (1 + 4 (f - 1) frames first, 4 f after) is taken no faster than the
  stream's fps allows and only while the engine holds fewer than ``max_pending`` of the stream's chunks;
  when more frames than a chunk are queued (input faster than fps, or a backlog) it is an even subsample of
  them and the rest are dropped (``dropped_backlog``), as is the oldest frame of a full queue. So a backlog
  never becomes latency (Scope, StreamDiffusionV2). Time is passed in (a fake clock in tests).
"""

from __future__ import annotations

import io
import struct
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from orchestrator.types import Encoding, InputOutcome

MAX_INPUT_SIDE = 4096
QUEUE_CHUNKS = 3
"""The input queue holds this many chunks' worth of frames at most."""
DECODE_ERRORS = (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError, SyntaxError,
                 NotImplementedError, EOFError, struct.error)
"""What PIL raises on malformed image bytes (its plugins use all of these)."""


class InvalidFrame(ValueError):
    """An input frame that cannot be used (counted ``dropped_invalid``)."""


@dataclass(slots=True)
class InputMeta:
    """What an output frame echoes of the input frame it restyles."""

    index: int
    capture_unix_ns: int
    arrival: float
    """Monotonic time the frame reached the server: its output is due at arrival + the latency budget."""


def decode_frame(data: bytes, encoding: Encoding, width: int, height: int, out_w: int, out_h: int) -> np.ndarray:
    """An input frame -> uint8 [out_h, out_w, 3]: centre-cropped to the output's aspect, then resized."""
    if not (0 < width <= MAX_INPUT_SIDE and 0 < height <= MAX_INPUT_SIDE):
        raise InvalidFrame(f"size {width}x{height} outside 1..{MAX_INPUT_SIDE}")
    if encoding is Encoding.RAW_RGB:
        if len(data) != width * height * 3:
            raise InvalidFrame(f"{len(data)} bytes, raw RGB {width}x{height} needs {width * height * 3}")
        image = Image.frombuffer("RGB", (width, height), data, "raw", "RGB", 0, 1)
    else:
        try:  # only the JPEG decoder sees client bytes: PIL's others (PPM, PNG, DDS, ...) are more attack surface
            image = Image.open(io.BytesIO(data), formats=["JPEG"])
            if image.size != (width, height):
                raise InvalidFrame(f"JPEG is {image.size[0]}x{image.size[1]}, the frame says {width}x{height}")
            image = image.convert("RGB")  # decodes (a truncated file fails here)
        except InvalidFrame:
            raise
        except DECODE_ERRORS as err:  # whatever the decoder raises on bad bytes is the client's bad frame
            raise InvalidFrame(f"not a decodable JPEG ({type(err).__name__})") from None
    scale = max(out_w / width, out_h / height)
    crop_w, crop_h = out_w / scale, out_h / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    image = image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    return np.asarray(image, dtype=np.uint8)


class Ingress:
    """One video-to-video stream's input side in the server."""

    def __init__(self, fps: float, chunk_frames: int, frames_per_latent: int = 4, max_pending: int = 2):
        self.interval = 1.0 / fps
        self.f, self.t = chunk_frames, frames_per_latent
        self.max_pending = max_pending
        self.queue: deque[tuple[InputMeta, np.ndarray]] = deque()
        self.capacity = QUEUE_CHUNKS * self.t * self.f
        self.last_index: int | None = None
        self.chunks = 0  # chunks built
        self._pending: deque[int] = deque()  # frames of each chunk the engine holds (built, output not back)
        self.next_at: float | None = None  # the earliest time the next chunk may be built
        self.counts: dict[InputOutcome, int] = {}

    def count(self, outcome: InputOutcome, n: int = 1) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + n

    def frames_needed(self) -> int:
        return 1 + self.t * (self.f - 1) if self.chunks == 0 else self.t * self.f

    def offer(self, meta: InputMeta, frame: np.ndarray) -> InputOutcome | None:
        """Queue a decoded frame; returns the outcome it already has (dropped_order), else None (queued: it is
        accepted or dropped when a chunk is built)."""
        if self.last_index is not None and meta.index <= self.last_index:
            self.count(InputOutcome.DROPPED_ORDER)
            return InputOutcome.DROPPED_ORDER
        self.last_index = meta.index
        self.queue.append((meta, frame))
        if len(self.queue) > self.capacity:  # full: the oldest goes (latest wins)
            self.queue.popleft()
            self.count(InputOutcome.DROPPED_BACKLOG)
        return None

    def take(self, now: float, final: bool = False) -> tuple[np.ndarray, list[InputMeta | None]] | None:
        """The next chunk (frames [N, H, W, 3], their metas) if one may be built now, else None. ``final``:
        the input ended; the frames left make a last chunk (now), padded with the last frame, whose padding
        has no meta (no output goes out for it)."""
        n = self.frames_needed()
        if len(self._pending) >= self.max_pending or not self.queue:
            return None
        if not final and (len(self.queue) < n or (self.next_at is not None and now < self.next_at)):
            return None
        queued = list(self.queue)
        self.queue.clear()
        if len(queued) < n:  # the input's last frames
            self._pending.append(len(queued))
            self.chunks += 1
            pad = [(None, queued[-1][1])] * (n - len(queued))
            return np.stack([frame for _, frame in queued + pad]), [meta for meta, _ in queued + pad]
        picks = evenly(len(queued), n)
        self.count(InputOutcome.DROPPED_BACKLOG, len(queued) - n)
        chosen = [queued[i] for i in picks]
        self.chunks += 1
        self._pending.append(n)
        # the next chunk no sooner than its frames take at the stream's fps (a little slack for jitter)
        self.next_at = now + 0.9 * self.frames_needed() * self.interval
        return np.stack([frame for _, frame in chosen]), [meta for meta, _ in chosen]

    def ready_at(self, now: float) -> float | None:
        """When ``take`` will build a chunk from the frames already queued: ``next_at``, or ``now`` once that
        has passed; None when it cannot without more frames (``offer``) or, its time past, without the engine
        giving a chunk back (``delivered``). Callers take again after those, so None needs no timer."""
        if len(self.queue) < self.frames_needed():
            return None
        at = now if self.next_at is None else max(self.next_at, now)
        if at <= now and len(self._pending) >= self.max_pending:
            return None
        return at

    @property
    def pending(self) -> int:
        return len(self._pending)

    def delivered(self, repeated: bool) -> None:
        """The engine gave back the oldest chunk it held: its frames were restyled (accepted), or the similarity
        filter skipped it (filtered_similar)."""
        if self._pending:
            self.count(InputOutcome.FILTERED_SIMILAR if repeated else InputOutcome.ACCEPTED, self._pending.popleft())

    def finish_pending(self) -> None:
        """The chunks the engine held will not come back (the stream ended or moved): their frames were
        accepted (restyling them was under way)."""
        while self._pending:
            self.count(InputOutcome.ACCEPTED, self._pending.popleft())

    def finish(self) -> None:
        """The stream ended: what it held is counted."""
        self.finish_pending()
        self.count(InputOutcome.DROPPED_BACKLOG, len(self.queue))
        self.queue.clear()


def evenly(available: int, needed: int) -> list[int]:
    """``needed`` indices spread evenly over ``available`` queued frames, the newest always included."""
    if needed > available:
        raise ValueError(f"cannot pick {needed} of {available}")
    if needed == 1:
        return [available - 1]
    return [round(i * (available - 1) / (needed - 1)) for i in range(needed)]
