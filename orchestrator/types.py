"""Plain structs the control plane passes around (no torch, ray or grpc). The wire format is the proto."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class LatePolicy(str, Enum):
    DROP = "drop"
    DELIVER_FLAGGED = "deliver_flagged"


class Encoding(str, Enum):
    JPEG = "jpeg"
    RAW_RGB = "raw_rgb"


class EndReason(str, Enum):
    """Why a stream ended (the `reason` label of streamgen_streams_ended_total)."""

    CLIENT_DONE = "client_done"  # max_frames reached, or a video-to-video client half-closed
    CLIENT_CANCEL = "client_cancel"  # a cancel Control, or the client went away
    DEADLINE = "deadline"  # the client's gRPC deadline expired mid-stream
    WORKER_LOST = "worker_lost"  # its pipeline failed and no replica could continue it
    NO_OUTPUT = "no_output"  # nothing came within no_output_timeout_s
    DRAIN = "drain"  # the server drained
    MAX_DURATION = "max_duration"  # it ran for the server's max_stream_duration_s
    IDLE = "idle"  # a video-to-video stream got no input for its idle timeout
    INVALID_INPUT = "invalid_input"  # a video-to-video stream sent too many unusable frames in a row
    INTERNAL = "internal"  # an unexpected error in the server


class FrameOutcome(str, Enum):
    """What happened to a generated frame (the `outcome` label of streamgen_frames_total)."""

    DELIVERED = "delivered"
    LATE = "late"  # delivered flagged, after its deadline
    DROPPED_DEADLINE = "dropped_deadline"
    DROPPED_STALE = "dropped_stale"  # generated under a prompt that was replaced before it was sent
    LOST = "lost"  # frame slots a stall (e.g. a stage rebuilt) left empty
    DROPPED_OVERFLOW = "dropped_overflow"  # its chunk overflowed the server's output queue


class InputOutcome(str, Enum):
    """What happened to a video-to-video input frame (the `outcome` label of streamgen_input_frames_total)."""

    ACCEPTED = "accepted"  # restyled
    DROPPED_BACKLOG = "dropped_backlog"  # arrived faster than the stream's fps, or while the engine was behind
    DROPPED_INVALID = "dropped_invalid"  # not decodable, wrong byte length or size
    DROPPED_ORDER = "dropped_order"  # its index did not increase
    FILTERED_SIMILAR = "filtered_similar"  # its chunk was near-identical to the last: the previous output again


class Rejection(str, Enum):
    """Why a stream was not admitted (the `reason` label of streamgen_stream_rejections_total)."""

    INVALID = "invalid"
    NOT_FOUND = "not_found"
    CAPACITY = "capacity"
    QUOTA = "quota"  # the tenant's concurrent-stream or start-rate quota
    BUDGET = "budget"
    DRAINING = "draining"


@dataclass(frozen=True)
class VideoSpec:
    """A validated video-to-video stream's input settings."""

    noise_scale: float
    motion_aware: bool
    similarity_threshold: float
    idle_timeout_s: float


@dataclass(frozen=True)
class StreamSpec:
    """A validated stream request (text-to-video, or video-to-video with ``video``)."""

    prompt: str
    seed: int
    width: int
    height: int
    fps: float
    steps: int
    latency_budget_s: float
    late_policy: LatePolicy
    max_frames: int  # 0 = unbounded
    encoding: Encoding
    jpeg_quality: int
    video: VideoSpec | None = None

    @property
    def is_video(self) -> bool:
        """A video-to-video stream (admission prices its chunks' encode too)."""
        return self.video is not None


class RequestError(Exception):
    """A request the server refuses; ``reason`` maps to a status code in the server module."""

    def __init__(self, reason: Rejection, message: str, retry_after_ms: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after_ms = retry_after_ms
