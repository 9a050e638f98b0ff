"""What crosses the engine core's boundary: control messages in, outputs and stats out.

Struct-only module (no logic). Messages are tagged by their class (``match`` on it); every struct is a
slotted dataclass. They are picklable, so a core hosted in another process (a Ray Serve replica) takes
and returns the same structs as one hosted in this process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from workers.batch import OutputFormat as OutputFormat  # re-exported: how a client names a stream's encoding
from workers.batch import StageStats
from workers.engine import StreamCheckpoint
from workers.v2v import VideoParams


# -- control messages (the core's inbox) -----------------------------------------------------------


@dataclass(slots=True)
class OpenStream:
    stream_id: str
    prompt: str
    seed: int
    fps: float
    steps: int
    output: OutputFormat
    video: VideoParams | None = None
    """Video-to-video: its input settings (its chunks then come as PushInput)."""


@dataclass(slots=True)
class RestoreStream:
    """Continue a stream from a checkpoint taken by another core (re-cache of its recent clean latents)."""

    checkpoint: StreamCheckpoint
    output: OutputFormat


@dataclass(slots=True)
class CloseStream:
    stream_id: str


@dataclass(slots=True)
class SetPrompt:
    stream_id: str
    prompt: str


@dataclass(slots=True)
class SetSteps:
    stream_id: str
    steps: int


@dataclass(slots=True)
class PushInput:
    """A video-to-video stream's next input chunk."""

    stream_id: str
    frames: Any
    """uint8 [N, H, W, 3] at the stream's size (numpy or torch)."""
    meta: Any = None
    """Comes back on the chunk's FrameBatch (the input frames' indices and capture times)."""
    due: float | None = None
    """When its first output frame is due (monotonic; earliest deadline first)."""


@dataclass(slots=True)
class EndInput:
    """A video-to-video stream gets no more input; the chunks in flight still come out."""

    stream_id: str


@dataclass(slots=True)
class SetNoiseScale:
    stream_id: str
    noise_scale: float


@dataclass(slots=True)
class Consumed:
    """The consumer took ``chunks`` finished chunks (frees the stream's look-ahead)."""

    stream_id: str
    chunks: int = 1


@dataclass(slots=True)
class Call:
    """Run ``fn`` on the engine thread (probes, hand-off, tooling). The caller waits on ``done``; a call
    whose caller gave up (``given_up``) is skipped, never run late. Not picklable: in-process only."""

    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    given_up: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    value: Any = None


@dataclass(slots=True)
class Stop:
    """End the engine loop."""


ControlMessage = OpenStream | RestoreStream | CloseStream | SetPrompt | SetSteps | Consumed | PushInput | EndInput \
    | SetNoiseScale
Message = ControlMessage | Call | Stop


# -- outputs ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class CoreStats:
    """What the core measured since the last struct it handed out; the orchestrator's metrics module
    exports it (counters add up, ``inflight`` is the latest value)."""

    stage_stats: list[StageStats] = field(default_factory=list)
    chunk_latency_s: list[float] = field(default_factory=list)
    """Per finished chunk: its first dispatch to its encoded frames."""
    decode_s: list[float] = field(default_factory=list)
    """Per finished chunk: decode plus encode seconds on its decode worker."""
    stage_errors: dict[str, int] = field(default_factory=dict)
    """StageFailure kind ("died" | "timeout" | "error") -> count."""
    engine_errors: int = 0
    """Engine loop exceptions (the core's streams end)."""
    migrations: int = 0
    """Streams moved onto rebuilt stages."""
    stage_rebuild_s: list[float] = field(default_factory=list)
    """Per stage rebuild that succeeded: killing the old stages to the new ones ready (process starts included)."""
    inflight: int = 0
    """Micro-batches in flight in the pipeline."""


@dataclass(slots=True)
class FrameBatch:
    """One finished chunk of one stream, encoded."""

    stream_id: str
    chunk: int
    prompt_revision: int
    frames: list[bytes]
    width: int
    height: int
    latency_s: float
    ready_at: float
    """Monotonic time it was encoded (a client in another process re-stamps it with its own clock)."""
    checkpoint: StreamCheckpoint | None = None
    """The stream's checkpoint after this chunk (cores in their own process ship it, so the orchestrator
    can continue the stream elsewhere if that process dies)."""
    stats: CoreStats | None = None
    input: Any = None
    """Video-to-video: the PushInput's meta of the input chunk these frames restyle."""
    repeated: bool = False
    """Video-to-video: the similarity filter skipped that chunk; these are the previous chunk's frames."""


@dataclass(slots=True)
class StreamFailed:
    """The stream ended in the core (engine failure, repeated stage failures): it cannot go on."""

    stream_id: str
    reason: str
    stats: CoreStats | None = None


@dataclass(slots=True)
class StreamEvicted:
    """The stream left the core (a hand-off, or stages that could not be rebuilt): continue it elsewhere
    from ``checkpoint``."""

    stream_id: str
    checkpoint: StreamCheckpoint
    reason: str
    stats: CoreStats | None = None


CoreOutput = FrameBatch | StreamFailed | StreamEvicted
