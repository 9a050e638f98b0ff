"""Request validation and admission (torch-free, unit-tested with fakes).

``validate`` turns a request (the proto message, read by attribute) into a StreamSpec or raises
RequestError naming the field; ``validate_prompt`` and ``validate_steps`` are the same checks for a
mid-stream Control. ``place`` is the one placement rule: the replica with the most headroom by the
latency model, under the hard cap. Admission (``Admission.decide``) and re-homing a stream both use it;
admission also refuses: capacity (RESOURCE_EXHAUSTED + retry hint), or a budget / fps no pipeline can
meet (FAILED_PRECONDITION). Decisions are pure arithmetic: well inside the 100 ms bound.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, replace
from typing import Protocol

from orchestrator.config import MAX_STEPS, GenerationConfig, ServerConfig
from orchestrator.types import Encoding, LatePolicy, Rejection, RequestError, StreamSpec, VideoSpec

DEFAULT_NOISE_SCALE = 0.7
"""s_init of a video-to-video stream whose config gives 0 (Daydream Scope's default; StreamDiffusionV2: 0.8)."""

def _invalid(field: str, why: str) -> RequestError:
    return RequestError(Rejection.INVALID, f"{field}: {why}")


def validate(req, server: ServerConfig, gen: GenerationConfig) -> StreamSpec:
    """Check every field of a GenerateRequest-like object against what this server generates (``gen``: its
    size, and its step count when the request gives 0); the error names the first bad field."""
    prompt = validate_prompt(req.prompt, server)
    width = int(req.width) or gen.width
    height = int(req.height) or gen.height
    for name, value, limit in (("width", width, server.max_width), ("height", height, server.max_height)):
        if value > limit:
            raise _invalid(name, f"{value} exceeds the maximum {limit}")
    if (width, height) != (gen.width, gen.height):
        raise _invalid("width" if width != gen.width else "height",
                       f"this server generates {gen.width}x{gen.height} (or 0 for that)")
    fps = float(req.fps)
    if not math.isfinite(fps) or not server.min_fps <= fps <= server.max_fps:
        raise _invalid("fps", f"must be in [{server.min_fps:g}, {server.max_fps:g}], got {req.fps!r}")
    steps = validate_steps(int(req.steps) or gen.sampler.num_steps)
    budget_ms = int(req.latency_budget_ms) or server.default_latency_budget_ms
    max_frames = int(getattr(req, "max_frames", 0))  # a TransformConfig has none: until the input ends
    if max_frames > server.max_frames:
        raise _invalid("max_frames", f"exceeds {server.max_frames}")
    late = _enum_value("late_policy", req.late_policy, (LatePolicy.DROP, LatePolicy.DELIVER_FLAGGED))
    encoding = _enum_value("encoding", req.encoding, (Encoding.JPEG, Encoding.RAW_RGB))
    quality = int(req.jpeg_quality) or 90
    if not (1 <= quality <= 100):
        raise _invalid("jpeg_quality", f"must be in [1, 100], got {req.jpeg_quality}")
    return StreamSpec(prompt, int(req.seed), width, height, fps, steps, budget_ms / 1000.0, late, max_frames,
                      encoding, quality)


def _enum_value(field: str, value, members: tuple):
    """The member a proto enum number names. proto3 enums are open (an unknown number, negative too, arrives as
    is), so anything outside 0..len - 1 is refused rather than indexed from the end."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number < len(members):
        raise _invalid(field, f"unknown value {value!r}")
    return members[number]


def validate_transform(cfg, server: ServerConfig, gen: GenerationConfig) -> StreamSpec:
    """A TransformConfig: the Generate fields, plus the video-to-video ones; the error names the first bad field."""
    spec = validate(cfg, server, gen)
    noise_scale = float(cfg.noise_scale) or DEFAULT_NOISE_SCALE
    if not math.isfinite(noise_scale) or not (0 < noise_scale <= 1):
        raise _invalid("noise_scale", f"must be in (0, 1] (0 for the default {DEFAULT_NOISE_SCALE}), got {cfg.noise_scale!r}")
    threshold = float(cfg.similarity_threshold)
    if not math.isfinite(threshold) or not (0 <= threshold < 1):
        raise _invalid("similarity_threshold", f"must be in [0, 1) (0 turns the filter off), got {threshold!r}")
    idle_ms = int(cfg.idle_timeout_ms)
    if idle_ms > server.max_idle_timeout_s * 1000:
        raise _invalid("idle_timeout_ms", f"exceeds {server.max_idle_timeout_s * 1000:.0f}")
    idle_s = idle_ms / 1000 if idle_ms else server.idle_timeout_s
    return replace(spec, video=VideoSpec(noise_scale, bool(cfg.motion_aware), threshold, idle_s))


def validate_prompt(prompt, server: ServerConfig) -> str:
    """A prompt for Generate or Control: non-empty text within the byte limit, no control characters."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise _invalid("prompt", "must be non-empty text")
    if len(prompt.encode("utf-8")) > server.max_prompt_bytes:
        raise _invalid("prompt", f"longer than {server.max_prompt_bytes} bytes")
    if any(unicodedata.category(ch) == "Cc" and ch not in "\t\n" for ch in prompt):
        raise _invalid("prompt", "contains control characters")
    return prompt


def validate_steps(steps: int) -> int:
    if not (1 <= steps <= MAX_STEPS):
        raise _invalid("steps", f"must be in [1, {MAX_STEPS}], got {steps}")
    return steps


class ReplicaView(Protocol):
    """What admission needs to know about one pipeline replica."""

    def max_streams(self, fps: float, steps: int, video: bool = False) -> int:
        """Streams of ``fps`` at ``steps`` it sustains (``video``: video-to-video ones, whose encode it adds)."""

    def predicted_chunk_latency(self, steps: int, video: bool = False) -> float: ...

    def load(self) -> float:
        """Utilisation of admitted streams: sum over them of 1 / max_streams(their fps, steps, kind)."""

    def active(self) -> int:
        """Streams open on the replica."""


def stream_share(replica: ReplicaView, fps: float, steps: int, video: bool = False) -> float:
    """A stream's admission load on ``replica``: 1 / max_streams(fps, steps, video) (inf where it cannot run)."""
    cap = replica.max_streams(fps, steps, video)
    return 1.0 / cap if cap >= 1 else math.inf


def place(fps: float, steps: int, replicas: list[ReplicaView], server: ServerConfig,
          video: bool = False) -> "Decision | None":
    """The placement rule: the replica with the most headroom left after the stream's share (headroom =
    ``admission_headroom`` minus its load), among those under the hard cap with room; None if none has.
    ``video``: a video-to-video stream (its share includes its chunks' encode)."""
    best: Decision | None = None
    best_room = -math.inf
    for i, r in enumerate(replicas):
        if r.active() >= server.max_streams_per_replica:  # the hard cap
            continue
        share = stream_share(r, fps, steps, video)
        room = server.admission_headroom - (r.load() + share)
        if room >= -1e-9 and room > best_room:
            best, best_room = Decision(i, share), room
    return best


@dataclass(frozen=True)
class Decision:
    replica: int
    utilisation: float
    """The stream's share of the replica (1 / max_streams)."""


def input_buffering_s(fps: float, chunk_frames: int, frames_per_latent: int = 4) -> float:
    """Video-to-video: how long a chunk's first input frame waits for the rest of its chunk (4 f frames)."""
    return (frames_per_latent * chunk_frames - 1) / fps


class Admission:
    def __init__(self, server: ServerConfig, chunk_frames: int = 1):
        self.server = server
        self.chunk_frames = chunk_frames

    def decide(self, spec: StreamSpec, replicas: list[ReplicaView], draining: bool = False) -> Decision:
        if draining:
            raise RequestError(Rejection.DRAINING, "server is draining", self.server.retry_after_ms)
        if not replicas:
            raise RequestError(Rejection.DRAINING, "no pipeline replica is ready", self.server.retry_after_ms)
        video = spec.is_video
        latency = self._latency(spec, spec.steps, replicas)
        if latency > spec.latency_budget_s:
            raise RequestError(Rejection.BUDGET, f"latency_budget_ms: {spec.latency_budget_s * 1e3:.0f} ms is below "
                                                 f"the pipeline's {latency * 1e3:.0f} ms per chunk")
        decision = place(spec.fps, spec.steps, replicas, self.server, video)
        if decision is None:
            if all(r.max_streams(spec.fps, spec.steps, video) < 1 for r in replicas):
                raise RequestError(Rejection.BUDGET, f"fps: no pipeline sustains {spec.fps:g} fps at "
                                                     f"{spec.steps} steps")
            raise RequestError(Rejection.CAPACITY, "no capacity: try again later", self.server.retry_after_ms)
        return decision

    def check_steps(self, spec: StreamSpec, steps: int, replica: ReplicaView, share: float) -> None:
        """A running stream asks for ``steps``: the admission rules, on the replica that holds it, where its share
        is ``share`` now. Refused (RequestError) when a chunk at those steps would take longer than the stream's
        latency budget, or when its larger share would take the replica past ``admission_headroom`` (fewer
        steps are always taken)."""
        latency = self._latency(spec, steps, [replica])
        if latency > spec.latency_budget_s:
            raise RequestError(Rejection.BUDGET, f"steps: {steps} take {latency * 1e3:.0f} ms per chunk, over the "
                                                 f"stream's latency budget of {spec.latency_budget_s * 1e3:.0f} ms")
        new = stream_share(replica, spec.fps, steps, spec.is_video)
        if new > share and replica.load() - share + new > self.server.admission_headroom + 1e-9:
            raise RequestError(Rejection.CAPACITY, f"steps: no capacity for {steps} steps on this stream's pipeline",
                               self.server.retry_after_ms)

    def _latency(self, spec: StreamSpec, steps: int, replicas: list[ReplicaView]) -> float:
        """The fastest of ``replicas``' chunk latency at ``steps``; a video stream's output frame also waits for
        its chunk's input frames to arrive."""
        latency = min(r.predicted_chunk_latency(steps, spec.is_video) for r in replicas)
        return latency + (input_buffering_s(spec.fps, self.chunk_frames) if spec.is_video else 0.0)
