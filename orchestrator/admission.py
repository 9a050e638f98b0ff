"""Request validation and admission (torch-free, unit-tested with fakes).

``validate`` turns a request (the proto message, read by attribute) into a StreamSpec or raises
RequestError naming the field. ``Admission.decide`` picks the replica with the most headroom by the
latency model, or refuses: capacity (RESOURCE_EXHAUSTED + retry hint), or a budget / fps no pipeline
can meet (FAILED_PRECONDITION). Decisions are pure arithmetic: well inside the 100 ms bound.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Protocol

from orchestrator.config import ModelConfig, ServerConfig
from orchestrator.types import Encoding, LatePolicy, Rejection, RequestError, StreamSpec

MAX_STEPS = 8


def _invalid(field: str, why: str) -> RequestError:
    return RequestError(Rejection.INVALID, f"{field}: {why}")


def validate(req, server: ServerConfig, model: ModelConfig, default_steps: int) -> StreamSpec:
    """Check every field of a GenerateRequest-like object; the error names the first bad field."""
    prompt = req.prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise _invalid("prompt", "must be non-empty text")
    if len(prompt.encode("utf-8")) > server.max_prompt_bytes:
        raise _invalid("prompt", f"longer than {server.max_prompt_bytes} bytes")
    if any(unicodedata.category(ch) == "Cc" and ch not in "\t\n" for ch in prompt):
        raise _invalid("prompt", "contains control characters")
    width = int(req.width) or model.default_width
    height = int(req.height) or model.default_height
    for name, value, limit in (("width", width, server.max_width), ("height", height, server.max_height)):
        if value > limit:
            raise _invalid(name, f"{value} exceeds the maximum {limit}")
    if (width, height) != (model.default_width, model.default_height):
        raise _invalid("width" if width != model.default_width else "height",
                       f"this server generates {model.default_width}x{model.default_height} (or 0 for that)")
    fps = float(req.fps)
    if not math.isfinite(fps) or fps <= 0 or fps > server.max_fps:
        raise _invalid("fps", f"must be in (0, {server.max_fps}], got {req.fps!r}")
    steps = int(req.steps) or default_steps
    if not (1 <= steps <= MAX_STEPS):
        raise _invalid("steps", f"must be in [1, {MAX_STEPS}], got {req.steps}")
    budget_ms = int(req.latency_budget_ms) or server.default_latency_budget_ms
    max_frames = int(req.max_frames)
    if max_frames > server.max_frames:
        raise _invalid("max_frames", f"exceeds {server.max_frames}")
    try:
        late = (LatePolicy.DROP, LatePolicy.DELIVER_FLAGGED)[int(req.late_policy)]
    except (IndexError, ValueError):
        raise _invalid("late_policy", f"unknown value {req.late_policy!r}") from None
    try:
        encoding = (Encoding.JPEG, Encoding.RAW_RGB)[int(req.encoding)]
    except (IndexError, ValueError):
        raise _invalid("encoding", f"unknown value {req.encoding!r}") from None
    quality = int(req.jpeg_quality) or 90
    if not (1 <= quality <= 100):
        raise _invalid("jpeg_quality", f"must be in [1, 100], got {req.jpeg_quality}")
    return StreamSpec(prompt, int(req.seed), width, height, fps, steps, budget_ms / 1000.0, late, max_frames,
                      encoding, quality)


class ReplicaView(Protocol):
    """What admission needs to know about one pipeline replica."""

    def max_streams(self, fps: float, steps: int) -> int: ...

    def predicted_chunk_latency(self, steps: int) -> float: ...

    def load(self) -> float:
        """Utilisation of admitted streams: sum over them of 1 / max_streams(their fps, steps)."""

    def active(self) -> int:
        """Streams open on the replica."""


@dataclass(frozen=True)
class Decision:
    replica: int
    utilisation: float
    """The stream's share of the replica (1 / max_streams)."""


class Admission:
    def __init__(self, server: ServerConfig):
        self.server = server

    def decide(self, spec: StreamSpec, replicas: list[ReplicaView], draining: bool = False) -> Decision:
        if draining:
            raise RequestError(Rejection.DRAINING, "server is draining", self.server.retry_after_ms)
        if not replicas:
            raise RequestError(Rejection.DRAINING, "no pipeline replica is ready", self.server.retry_after_ms)
        latency = min(r.predicted_chunk_latency(spec.steps) for r in replicas)
        if latency > spec.latency_budget_s:
            raise RequestError(Rejection.BUDGET, f"latency_budget_ms: {spec.latency_budget_s * 1e3:.0f} ms is below "
                                                 f"the pipeline's {latency * 1e3:.0f} ms per chunk")
        best, best_room, share_best = None, -1.0, 0.0
        possible = False
        for i, r in enumerate(replicas):
            cap = r.max_streams(spec.fps, spec.steps)  # from the latency model
            if cap >= 1:
                possible = True
            share = 1.0 / cap if cap >= 1 else math.inf
            room = self.server.admission_headroom - (r.load() + share)
            if r.active() >= self.server.max_streams_per_replica:  # the hard cap
                continue
            if room >= -1e-9 and room > best_room:
                best, best_room, share_best = i, room, share
        if best is None:
            if not possible:
                raise RequestError(Rejection.BUDGET, f"fps: no pipeline sustains {spec.fps:g} fps at "
                                                     f"{spec.steps} steps")
            raise RequestError(Rejection.CAPACITY, "no capacity: try again later", self.server.retry_after_ms)
        return Decision(best, share_best)
