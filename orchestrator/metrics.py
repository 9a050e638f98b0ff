"""Every streamgen metric, declared here and nowhere else. Prefix streamgen_, base units, bounded labels
(no stream ids, prompts or tenants). The server feeds the stream metrics; the engine cores' measurements
arrive as CoreStats structs with their outputs (wherever the core runs) and ``export_core_stats`` turns
them into metrics; /metrics serves them."""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from orchestrator.tokens import AuthFailure
from orchestrator.types import EndReason, FrameOutcome, InputOutcome, Rejection

if TYPE_CHECKING:
    from workers.core_messages import CoreStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """One registry per server (tests run several servers in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.streams_active = Gauge("streamgen_streams_active", "Streams admitted and not yet ended", registry=r)
        self.stream_starts = Counter("streamgen_stream_starts", "Stream start attempts", ["result"], registry=r)
        self.stream_rejections = Counter("streamgen_stream_rejections", "Streams refused, by reason", ["reason"],
                                         registry=r)
        self.streams_ended = Counter("streamgen_streams_ended", "Streams ended, by reason", ["reason"], registry=r)
        self.stream_duration = Histogram("streamgen_stream_duration_seconds", "Admission to end",
                                         buckets=(1, 5, 15, 30, 60, 300, 900, 3600), registry=r)
        self.frames = Counter("streamgen_frames", "Generated frames, by outcome", ["outcome"], registry=r)
        self.input_frames = Counter("streamgen_input_frames", "Video-to-video input frames, by outcome", ["outcome"],
                                    registry=r)
        self.frame_latency = Histogram("streamgen_frame_latency_seconds",
                                       "Chunk dispatch to frame sent", buckets=LATENCY_BUCKETS, registry=r)
        self.ttff = Histogram("streamgen_time_to_first_frame_seconds", "Admission to first frame sent",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.output_interval = Histogram("streamgen_output_interval_seconds", "Time between a stream's frames",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.output_freezes = Counter("streamgen_output_freezes", "Gaps of at least max(3T, T + 150 ms)",
                                      registry=r)
        self.stage_compute = Counter("streamgen_stage_compute_seconds", "Stage busy time", ["stage"], registry=r)
        self.stage_idle = Counter("streamgen_stage_idle_seconds", "Stage idle time between forwards", ["stage"],
                                  registry=r)
        self.stage_latency = Histogram("streamgen_stage_latency_seconds", "One forward on one stage", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=r)
        self.stage_microbatches_inflight = Gauge("streamgen_stage_microbatches_inflight",
                                                 "Micro-batches in flight in a pipeline replica", ["replica"],
                                                 registry=r)
        # Deprecated alias of streamgen_stage_microbatches_inflight (same value): remove in the next release.
        self.stage_queue_depth = Gauge("streamgen_stage_queue_depth",
                                       "Deprecated: use streamgen_stage_microbatches_inflight", ["replica"], registry=r)
        self.stage_bytes_sent = Counter("streamgen_stage_bytes_sent", "Activation bytes to the next stage",
                                        ["stage"], registry=r)
        self.cache_bytes = Gauge("streamgen_cache_bytes", "KV + cross-attention cache bytes", ["stage"], registry=r)
        self.gpu_memory = Gauge("streamgen_gpu_memory_bytes", "CUDA memory of a stage's device: used (allocated) "
                                "and reserved (by the caching allocator)", ["stage", "kind"], registry=r)
        self.decode_latency = Histogram("streamgen_decode_seconds", "One chunk's VAE decode plus encode on a "
                                        "decode worker", buckets=STAGE_BUCKETS, registry=r)
        self.chunk_latency = Histogram("streamgen_chunk_latency_seconds", "Chunk first dispatch to its encoded frames",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.stage_rebuild = Histogram("streamgen_stage_rebuild_seconds",
                                       "A replica's stage rebuild after a stage failure: old stages killed to new ones ready",
                                       buckets=(0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60), registry=r)
        self.stage_errors = Counter("streamgen_stage_errors", "Stage failures", ["kind"], registry=r)
        self.stream_migrations = Counter("streamgen_stream_migrations", "Streams moved to rebuilt stages",
                                         ["result"], registry=r)
        self.engine_errors = Counter("streamgen_engine_errors", "Engine loop failures", ["kind"], registry=r)
        self.replicas = Gauge("streamgen_replicas", "Pipeline replicas", ["state"], registry=r)
        self.replica_repairs = Counter("streamgen_replica_repairs", "Replacements for replicas that left service",
                                       ["result"], registry=r)
        self.health_status = Gauge("streamgen_health_status", "1 when SERVING", ["service"], registry=r)
        self.draining = Gauge("streamgen_draining", "1 while draining", registry=r)
        self.build_info = Info("streamgen_build", "Versions", registry=r)
        self.auth_failures = Counter("streamgen_auth_failures", "Calls refused by the auth interceptor, by reason",
                                     ["reason"], registry=r)
        self.concurrent_rpc_refusals = Counter("streamgen_concurrent_rpc_refusals",
                                               "Calls refused at a concurrent-call limit (server.maximum_concurrent_rpcs; health has its own)",
                                               registry=r)
        self.web_pages = Gauge("streamgen_web_pages", "Browser pages connected (their WebSockets)", registry=r)
        self.web_frames = Counter("streamgen_web_frames", "Frames for browser pages: sent, or dropped (replaced by a "
                                  "newer one while the page had web_frames_in_flight unacknowledged)", ["outcome"],
                                  registry=r)
        self.web_input_frames = Counter("streamgen_web_input_frames", "Camera frames from browser pages: forwarded to "
                                        "the stream, or dropped (a newer one came first)", ["outcome"], registry=r)
        self.web_bad_messages = Counter("streamgen_web_bad_messages", "Page messages answered with an error (bad JSON, "
                                        "an unknown type, a value out of range); the page's stream goes on", registry=r)
        # Every bounded label value exists from the start (a 0 series beats a missing one in PromQL).
        for result in ("admitted", "rejected"):
            self.stream_starts.labels(result)
        for outcome in ("sent", "dropped"):
            self.web_frames.labels(outcome)
        for outcome in ("forwarded", "dropped"):
            self.web_input_frames.labels(outcome)
        for reason in Rejection:
            self.stream_rejections.labels(reason.value)
        for end in EndReason:
            self.streams_ended.labels(end.value)
        for failure in AuthFailure:
            self.auth_failures.labels(failure.value)
        for outcome in FrameOutcome:
            self.frames.labels(outcome.value)
        for outcome in InputOutcome:
            self.input_frames.labels(outcome.value)
        for kind in ("exception", "replica_lost"):
            self.engine_errors.labels(kind)
        for state in ("serving", "draining", "starting"):
            self.replicas.labels(state)
        for kind in ("died", "timeout", "error"):
            self.stage_errors.labels(kind)
        for result in ("ok", "failed"):
            self.stream_migrations.labels(result)
            self.replica_repairs.labels(result)

    def set_build_info(self, version: str) -> None:
        """Versions from the installed distributions: nothing is imported (the local backend never loads ray)."""
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed

        def of(dist: str) -> str:
            try:
                return installed(dist)
            except PackageNotFoundError:
                return "none"

        self.build_info.info({"version": version, "python_version": platform.python_version(),
                              "torch_version": of("torch"), "ray_version": of("ray"),
                              "grpc_version": of("grpcio")})

    def serve(self, listen: str):
        """Start the /metrics HTTP endpoint; returns (server, thread)."""
        host, _, port = listen.rpartition(":")
        return start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)

    def export_core_stats(self, stats: "CoreStats", replica: int) -> None:
        """What an engine core measured (carried back with its outputs or its status) into the metrics."""
        self.observe_stage_stats(stats.stage_stats)
        for latency in stats.chunk_latency_s:
            self.chunk_latency.observe(latency)
        for seconds in stats.decode_s:
            self.decode_latency.observe(seconds)
        for kind, n in stats.stage_errors.items():
            self.stage_errors.labels(kind).inc(n)
        if stats.engine_errors:
            self.engine_errors.labels("exception").inc(stats.engine_errors)
        if stats.migrations:
            self.stream_migrations.labels("ok").inc(stats.migrations)
        for seconds in stats.stage_rebuild_s:
            self.stage_rebuild.observe(seconds)
        self.stage_microbatches_inflight.labels(str(replica)).set(stats.inflight)
        self.stage_queue_depth.labels(str(replica)).set(stats.inflight)

    def forget_replica(self, replica: int) -> None:
        """A retired replica's own series go (replica indices are never reused: kept, they would only pile up
        and report its last value)."""
        for gauge in (self.stage_microbatches_inflight, self.stage_queue_depth):
            try:
                gauge.remove(str(replica))
            except KeyError:  # it never reported
                pass

    def observe_stage_stats(self, stats) -> None:
        for s in stats:
            stage = str(s.stage)
            self.stage_compute.labels(stage).inc(s.compute_s)
            self.stage_idle.labels(stage).inc(s.idle_s)
            self.stage_latency.labels(stage).observe(s.compute_s)
            self.stage_bytes_sent.labels(stage).inc(s.bytes_sent)
            self.cache_bytes.labels(stage).set(s.cache_bytes)
            if s.gpu_reserved_bytes:  # CUDA stages only
                self.gpu_memory.labels(stage, "used").set(s.gpu_used_bytes)
                self.gpu_memory.labels(stage, "reserved").set(s.gpu_reserved_bytes)


# What the README's metric table lists; a test scrapes /metrics and checks each is present.
CATALOGUE = (
    "streamgen_streams_active", "streamgen_stream_starts_total", "streamgen_stream_rejections_total",
    "streamgen_streams_ended_total", "streamgen_stream_duration_seconds", "streamgen_frames_total",
    "streamgen_input_frames_total",
    "streamgen_frame_latency_seconds", "streamgen_time_to_first_frame_seconds", "streamgen_output_interval_seconds",
    "streamgen_output_freezes_total", "streamgen_stage_compute_seconds_total", "streamgen_stage_idle_seconds_total",
    "streamgen_stage_latency_seconds", "streamgen_stage_microbatches_inflight",
    "streamgen_stage_queue_depth", "streamgen_stage_bytes_sent_total",
    "streamgen_cache_bytes", "streamgen_gpu_memory_bytes", "streamgen_decode_seconds",
    "streamgen_chunk_latency_seconds", "streamgen_engine_errors_total",
    "streamgen_stage_errors_total", "streamgen_stage_rebuild_seconds", "streamgen_stream_migrations_total", "streamgen_replicas",
    "streamgen_replica_repairs_total",
    "streamgen_health_status", "streamgen_draining", "streamgen_build_info",
    "streamgen_auth_failures_total", "streamgen_concurrent_rpc_refusals_total",
    "streamgen_web_pages", "streamgen_web_frames_total", "streamgen_web_input_frames_total",
    "streamgen_web_bad_messages_total",
)
CUDA_ONLY = ("streamgen_gpu_memory_bytes",)
"""Declared (and in the scrape's HELP/TYPE lines) everywhere, with series only where stages run on CUDA."""
