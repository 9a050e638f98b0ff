"""All of streamgen's configuration, in one torch-free module.

Every field has a default and is validated in ``__post_init__`` with ``ValueError`` (never ``assert``).
The data plane (``workers/``) imports these classes; ``workers.model`` re-exports ``ModelConfig`` and
``get_config`` as its public API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

__all__ = [
    "ModelConfig",
    "SamplerConfig",
    "CacheConfig",
    "GenerationConfig",
    "EngineConfig",
    "AutoscalingConfig",
    "ServerConfig",
    "ServiceConfig",
    "get_config",
    "MODEL_CONFIGS",
    "SAMPLER_MODES",
    "CACHE_POLICIES",
    "KERNEL_BACKENDS",
]

KERNEL_BACKENDS = ("auto", "torch", "triton")
TEXT_ENCODERS = ("hash", "umt5")
VAES = ("tiny", "wan")
SAMPLER_MODES = ("sequential", "stream_batch")
CACHE_POLICIES = ("sink", "ema_sink", "none")


def _positive(name: str, value: int | float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Wan2.1 causal DiT plus the small components streamgen pairs it with."""

    dim: int = 1536
    """Hidden width of the transformer."""
    ffn_dim: int = 8960
    """Inner width of each block's FFN."""
    num_heads: int = 12
    """Attention heads; ``dim // num_heads`` is the head dim (128 for the real models)."""
    num_layers: int = 30
    """Transformer blocks."""
    text_dim: int = 4096
    """Width of the text encoder's output (umT5-XXL: 4096)."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    in_channels: int = 16
    """Latent channels in."""
    out_channels: int = 16
    """Latent channels out."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(t, h, w) patch; t must be 1 so that a token belongs to exactly one latent frame."""
    eps: float = 1e-6
    """LayerNorm / RMSNorm epsilon."""
    text_len: int = 512
    """Text tokens per prompt; the encoder pads (with zeros) to this length."""
    rope_max_positions: int = 1024
    """Temporal RoPE positions available; cache size plus in-flight frames must stay below it."""
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    """(t, h, w) compression of the VAE: one latent frame is 4 video frames, 8x8 pixels."""
    default_height: int = 480
    """Video height in pixels when a request gives 0."""
    default_width: int = 832
    """Video width in pixels when a request gives 0."""
    text_encoder: str = "umt5"
    """``umt5`` (real, local path) or ``hash`` (small, deterministic, no weights)."""
    vae: str = "wan"
    """``wan`` (real Wan VAE, local path) or ``tiny`` (small causal VAE, seeded weights)."""
    init_seed: int = 0
    """Seed for weights when no checkpoint is loaded (tiny / small configs and tests)."""
    kernel_backend: str = "auto"
    """Memory-bound block ops: ``auto`` (Triton on CUDA when available), ``torch`` or ``triton``."""

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "freq_dim", "in_channels",
                     "out_channels", "text_len", "rope_max_positions", "default_height", "default_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"ModelConfig head dim ({self.head_dim}) must be even and at least 6 for 3D RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"ModelConfig.freq_dim must be even, got {self.freq_dim}")
        if tuple(self.patch_size) != tuple(int(p) for p in self.patch_size) or len(self.patch_size) != 3:
            raise ValueError(f"ModelConfig.patch_size must be 3 ints, got {self.patch_size!r}")
        if self.patch_size[0] != 1:
            raise ValueError("ModelConfig.patch_size[0] must be 1 (one token belongs to one latent frame)")
        if not (0 < self.eps < 1e-2):
            raise ValueError(f"ModelConfig.eps must be in (0, 0.01), got {self.eps!r}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"ModelConfig.text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}")
        if self.vae not in VAES:
            raise ValueError(f"ModelConfig.vae must be one of {VAES}, got {self.vae!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(
                f"ModelConfig.kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        self.latent_grid(self.default_height, self.default_width)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) for a pixel size; raises ValueError naming the field that does not divide."""
        step_h = self.vae_stride[1] * self.patch_size[1]
        step_w = self.vae_stride[2] * self.patch_size[2]
        if not isinstance(height, int) or height <= 0 or height % step_h:
            raise ValueError(f"height must be a positive multiple of {step_h}, got {height!r}")
        if not isinstance(width, int) or width <= 0 or width % step_w:
            raise ValueError(f"width must be a positive multiple of {step_w}, got {width!r}")
        return height // self.vae_stride[1], width // self.vae_stride[2]

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens one latent frame becomes: 1560 for 480x832 with the real patch (30 x 52)."""
        lh, lw = self.latent_grid(height, width)
        return (lh // self.patch_size[1]) * (lw // self.patch_size[2])


MODEL_CONFIGS: dict[str, ModelConfig] = {
    # Tests and the demo: a chunk's forward takes a few ms on one CPU thread.
    "tiny": ModelConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=4, text_dim=32, freq_dim=32,
                        text_len=16, default_height=64, default_width=96, text_encoder="hash", vae="tiny"),
    # Benchmarks: compute-dominated on CPU (well over 50 ms per chunk per half-model on one thread).
    "small": ModelConfig(dim=512, ffn_dim=1536, num_heads=8, num_layers=8, text_dim=128, freq_dim=64,
                         text_len=32, default_height=128, default_width=256, text_encoder="hash", vae="tiny"),
    "wan2.1-1.3b": ModelConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-14b": ModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A named model config, optionally with fields replaced (validated again)."""
    try:
        base = MODEL_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(MODEL_CONFIGS)}") from None
    return replace(base, **overrides) if overrides else base


@dataclass(frozen=True)
class SamplerConfig:
    """Few-step flow-matching sampler (REFERENCE §2 A.6-A.7)."""

    denoising_steps: tuple[float, ...] = (1000, 750, 500, 250)
    """Step list before warping (Self-Forcing's default)."""
    warp: bool = True
    """Map the step list through the shifted sigma table (``warp_denoising_step``)."""
    shift: float = 5.0
    """Timestep shift S: 5 for Self-Forcing / LongLive / Reward Forcing, 8 for CausVid / StreamDiffusionV2."""
    chunk_frames: int = 3
    """Latent frames per chunk: 3 for Self-Forcing T2V, 1 for StreamDiffusionV2 V2V."""
    mode: str = "sequential"
    """``sequential``: a chunk's steps in order, context pass, then the next chunk (Self-Forcing).
    ``stream_batch``: one forward per tick carries every in-flight chunk at its own step (docs/stream_batch)."""
    context_timestep: float = 0.0
    """Timestep of the context pass that writes a finished chunk's clean K/V."""
    batch_attention: str = "inflight"
    """``stream_batch`` only: what an in-flight entry attends to besides the clean cache. ``inflight``:
    also the older in-flight chunks of its forward (block-causal, like Rolling Forcing). ``clean``: only
    the forward's clean context chunk and itself (no noisy context, as Self-Forcing checkpoints were
    trained); entries are then independent, which lets a step-split plan run them on different step
    groups exactly."""
    lanes: int = 1
    """``stream_batch`` only: forwards one stream keeps in flight. Forward k consumes the output of
    forward k - lanes, so with lanes = P a single stream keeps all P pipeline stages busy (as
    StreamDiffusionV2's ring does). Part of the sampling semantics: the reference uses it too."""

    def __post_init__(self) -> None:
        steps = tuple(float(s) for s in self.denoising_steps)
        object.__setattr__(self, "denoising_steps", steps)
        if not steps:
            raise ValueError("SamplerConfig.denoising_steps must not be empty")
        if any(not (0 < s <= 1000) or not math.isfinite(s) for s in steps):
            raise ValueError(f"SamplerConfig.denoising_steps must lie in (0, 1000], got {steps}")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"SamplerConfig.denoising_steps must be strictly decreasing, got {steps}")
        _positive("SamplerConfig.shift", self.shift)
        if not isinstance(self.chunk_frames, int) or self.chunk_frames <= 0:
            raise ValueError(f"SamplerConfig.chunk_frames must be a positive int, got {self.chunk_frames!r}")
        if self.mode not in SAMPLER_MODES:
            raise ValueError(f"SamplerConfig.mode must be one of {SAMPLER_MODES}, got {self.mode!r}")
        if self.batch_attention not in ("inflight", "clean"):
            raise ValueError(f"SamplerConfig.batch_attention must be 'inflight' or 'clean', "
                             f"got {self.batch_attention!r}")
        if not isinstance(self.lanes, int) or self.lanes < 1:
            raise ValueError(f"SamplerConfig.lanes must be a positive int, got {self.lanes!r}")
        if self.lanes > 1 and self.mode != "stream_batch":
            raise ValueError("SamplerConfig.lanes > 1 needs mode 'stream_batch'")
        if not (0 <= self.context_timestep < 1000):
            raise ValueError(f"SamplerConfig.context_timestep must be in [0, 1000), got {self.context_timestep}")

    @property
    def num_steps(self) -> int:
        return len(self.denoising_steps)


@dataclass(frozen=True)
class CacheConfig:
    """Per-stream rolling self-attention KV cache (memory fixed: sink_frames + window_frames frames).

    A chunk attends to the sink, the ``window_frames`` most recent committed frames and itself, so
    Self-Forcing's ``local_attn_size`` L with chunk f maps to ``sink_frames + window_frames = L - f``.
    """

    policy: str = "sink"
    """``sink``: the first ``sink_frames`` frames stay pinned; ``ema_sink``: evicted frames are blended
    into the sink (Reward Forcing); ``none``: no sink, a plain rolling window."""
    sink_frames: int = 3
    """Pinned frames (ignored, treated as 0, for policy ``none``)."""
    window_frames: int = 6
    """Most recent committed frames kept beside the sink."""
    ema_alpha: float = 0.999
    """``ema_sink``: sink <- alpha * sink + (1 - alpha) * evicted."""
    recache_frames: int = 9
    """Clean latents kept per stream and re-encoded on a prompt change or recovery (LongLive's K)."""

    def __post_init__(self) -> None:
        if self.policy not in CACHE_POLICIES:
            raise ValueError(f"CacheConfig.policy must be one of {CACHE_POLICIES}, got {self.policy!r}")
        for name in ("sink_frames", "window_frames", "recache_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"CacheConfig.{name} must be a non-negative int, got {value!r}")
        if self.window_frames < 1:
            raise ValueError("CacheConfig.window_frames must be at least 1")
        if not (0.0 <= self.ema_alpha <= 1.0):
            raise ValueError(f"CacheConfig.ema_alpha must be in [0, 1], got {self.ema_alpha!r}")
        if self.policy in ("sink", "ema_sink") and self.sink_frames < 1:
            raise ValueError(f"CacheConfig.policy {self.policy!r} needs sink_frames >= 1")

    @property
    def pinned_frames(self) -> int:
        return 0 if self.policy == "none" else self.sink_frames

    @property
    def capacity_frames(self) -> int:
        return self.pinned_frames + self.window_frames


@dataclass(frozen=True)
class EngineConfig:
    """How a pipeline replica's engine schedules and re-plans."""

    max_batch_streams: int = 4
    """Streams batched into one micro-batch at most."""
    profile_every: int = 8
    """Every n-th micro-batch times each block (feeds the block scheduler); 0 = never."""
    rebalance_every: int = 32
    """Check the block split every n micro-batches; 0 = never re-plan."""
    rebalance_threshold: float = 0.15
    """Re-plan when the slowest stage is this much slower than the best split's slowest stage."""
    cost_decay: float = 0.8
    """EWMA decay of the measured per-block costs."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_streams, int) or self.max_batch_streams < 1:
            raise ValueError(f"EngineConfig.max_batch_streams must be a positive int, got {self.max_batch_streams!r}")
        for name in ("profile_every", "rebalance_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"EngineConfig.{name} must be a non-negative int, got {value!r}")
        if self.rebalance_every and not self.profile_every:
            raise ValueError("EngineConfig.rebalance_every needs profile_every > 0 (costs come from profiling)")
        if not (0 < self.rebalance_threshold < 10):
            raise ValueError(f"EngineConfig.rebalance_threshold must be in (0, 10), got {self.rebalance_threshold!r}")
        if not (0 <= self.cost_decay < 1):
            raise ValueError(f"EngineConfig.cost_decay must be in [0, 1), got {self.cost_decay!r}")


@dataclass(frozen=True)
class GenerationConfig:
    """What one stream generates with: model, sampler, cache and video size."""

    model: ModelConfig = field(default_factory=lambda: get_config("tiny"))
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    height: int = 0
    """Pixels; 0 means the model's default."""
    width: int = 0
    """Pixels; 0 means the model's default."""
    model_path: str = ""
    """Local DiT checkpoint (``.pt`` / ``.safetensors``); empty means seeded random weights."""
    text_encoder_path: str = ""
    """Local directory of a umT5 encoder + tokenizer (text_encoder ``umt5``)."""
    vae_path: str = ""
    """Local directory of a diffusers ``AutoencoderKLWan`` (vae ``wan``)."""
    use_ema: bool = False
    """Load ``generator_ema`` instead of ``generator`` from a Self-Forcing-style file."""

    def __post_init__(self) -> None:
        if self.height == 0:
            object.__setattr__(self, "height", self.model.default_height)
        if self.width == 0:
            object.__setattr__(self, "width", self.model.default_width)
        self.model.latent_grid(self.height, self.width)
        max_frames = self.cache.capacity_frames + (self.sampler.num_steps + 1) * self.sampler.chunk_frames
        if max_frames > self.model.rope_max_positions:
            raise ValueError(
                f"cache ({self.cache.capacity_frames} frames) plus in-flight chunks ({max_frames} frames in all) "
                f"exceed the model's {self.model.rope_max_positions} RoPE positions")
        if self.cache.recache_frames > self.cache.capacity_frames:
            raise ValueError(
                f"CacheConfig.recache_frames ({self.cache.recache_frames}) must not exceed the cache capacity "
                f"({self.cache.capacity_frames} frames)")


def _host_port(value: str, name: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 <= int(port) < 65536):
        raise ValueError(f"{name} must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC front end: addresses, request limits, pacing and admission."""

    listen: str = "127.0.0.1:50051"
    """gRPC HOST:PORT (port 0 picks a free one)."""
    metrics_listen: str = "127.0.0.1:9464"
    """Prometheus /metrics HOST:PORT; empty disables the endpoint."""
    allow_plaintext_non_loopback: bool = False
    """Plaintext is loopback-only unless this is set (there is no TLS yet)."""
    reflection: bool = False
    """Serve gRPC reflection (off by default)."""
    default_fps: float = 16.0
    max_fps: float = 60.0
    default_latency_budget_ms: int = 10_000
    """Per-frame budget when a request gives 0: the longest a chunk may take from dispatch to frames."""
    max_prompt_bytes: int = 4096
    max_frames: int = 1_000_000
    max_width: int = 1920
    max_height: int = 1920
    max_streams_per_replica: int = 8
    """Hard cap per pipeline replica; the latency model may admit fewer."""
    admission_headroom: float = 0.9
    """Admit while the modelled utilisation stays at or below this fraction."""
    retry_after_ms: int = 1000
    """Hint sent with RESOURCE_EXHAUSTED / UNAVAILABLE."""
    output_chunks_ahead: int = 2
    """Chunks a stream may have generated but not yet sent (bounded output queue)."""
    no_output_timeout_s: float = 30.0
    """A running stream with no frame for this long ends UNAVAILABLE (no silent stalls)."""
    drain_timeout_s: float = 10.0
    max_receive_message_bytes: int = 4 * 1024 * 1024
    stall_frames: float = 1.0
    """A frame later than this many intervals past its due time re-anchors the pacing clock."""
    probe_period_s: float = 5.0
    """Readiness: every replica runs a real forward on every stage this often (0 disables probing)."""
    probe_timeout_s: float = 5.0
    """A probe that takes longer fails: a replica passes only with a fresh, successful probe."""

    def __post_init__(self) -> None:
        host, _ = _host_port(self.listen, "ServerConfig.listen")
        if host not in LOOPBACK_HOSTS and not self.allow_plaintext_non_loopback:
            raise ValueError(f"ServerConfig.listen {self.listen!r} is not loopback and TLS is not available: "
                             "bind 127.0.0.1 or set allow_plaintext_non_loopback")
        if self.metrics_listen:
            _host_port(self.metrics_listen, "ServerConfig.metrics_listen")
        for name in ("default_fps", "max_fps", "admission_headroom", "no_output_timeout_s", "drain_timeout_s",
                     "stall_frames", "probe_timeout_s"):
            _positive(f"ServerConfig.{name}", getattr(self, name))
        if self.probe_period_s < 0:
            raise ValueError("ServerConfig.probe_period_s must not be negative")
        if self.default_fps > self.max_fps:
            raise ValueError("ServerConfig.default_fps must not exceed max_fps")
        for name in ("default_latency_budget_ms", "max_prompt_bytes", "max_frames", "max_width", "max_height",
                     "max_streams_per_replica", "retry_after_ms", "output_chunks_ahead",
                     "max_receive_message_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ServerConfig.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class AutoscalingConfig:
    """Pipeline replicas between min and max on admitted-stream utilisation (orchestrator/scheduler.py)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_utilisation: float = 0.7
    """Per-replica share of the latency model's capacity to aim for."""
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 10.0
    period_s: float = 0.5
    """How often the policy runs."""

    def __post_init__(self) -> None:
        if not (isinstance(self.min_replicas, int) and isinstance(self.max_replicas, int)
                and 1 <= self.min_replicas <= self.max_replicas):
            raise ValueError(f"AutoscalingConfig needs 1 <= min_replicas <= max_replicas, got "
                             f"{self.min_replicas}, {self.max_replicas}")
        if not (0 < self.target_utilisation <= 1):
            raise ValueError("AutoscalingConfig.target_utilisation must be in (0, 1]")
        for name in ("upscale_delay_s", "downscale_delay_s", "period_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"AutoscalingConfig.{name} must not be negative")


@dataclass(frozen=True)
class ServiceConfig:
    """The root: everything `streamgen serve` runs with."""

    generation: GenerationConfig = field(default_factory=GenerationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    stages: int = 2
    """Pipeline stages per replica."""
    replicas: int = 1
    """Pipeline replicas."""
    executor: str = "ray"
    """``ray`` (one actor per stage) or ``inprocess`` (all stages in the server process)."""
    replica_host: str = "driver"
    """Where each replica's engine loop runs: ``driver`` (a thread of the orchestrator process) or
    ``serve`` (a Ray Serve deployment per replica, in its own process, health-checked and restarted by
    Serve; needs executor ``ray``)."""
    ray_address: str = ""
    """Empty: start a local Ray bound to loopback. ``auto`` or an address: join that cluster."""
    threads_per_stage: int = 1
    stage_call_timeout_s: float = 10.0
    """A stage that does not finish a forward within this long is treated as dead (hung stage)."""
    placement_timeout_s: float = 60.0
    """How long a replica waits for its stage slots (start-up, rebuild after a failure) before giving up."""
    repair_period_s: float = 5.0
    """How often the fleet loop replaces replicas that left service (fixed fleets and the autoscaling
    floor); after a replacement fails to start it waits this long before the next try."""
    gpus_per_stage: float = 0.0
    """GPUs each stage actor reserves (1 on GPU clusters; logical GPUs fake a cluster in tests)."""
    cpus_per_stage: float = 0.0
    """CPUs each stage actor reserves (0 lets tests pack many actors on 2 cores)."""
    local_ray_gpus: float | None = None
    """Logical GPUs a *local* Ray advertises (tests); None = what the machine has."""
    autoscaling: AutoscalingConfig | None = None
    """None: a fixed ``replicas``. Set: start with ``min_replicas`` and scale up to ``max_replicas``."""

    def __post_init__(self) -> None:
        if not isinstance(self.stages, int) or not (1 <= self.stages <= self.generation.model.num_layers):
            raise ValueError(f"ServiceConfig.stages must be in [1, {self.generation.model.num_layers}], "
                             f"got {self.stages!r}")
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"ServiceConfig.replicas must be a positive int, got {self.replicas!r}")
        if self.executor not in ("ray", "inprocess"):
            raise ValueError(f"ServiceConfig.executor must be 'ray' or 'inprocess', got {self.executor!r}")
        if self.replica_host not in ("driver", "serve"):
            raise ValueError(f"ServiceConfig.replica_host must be 'driver' or 'serve', got {self.replica_host!r}")
        if self.replica_host == "serve" and self.executor != "ray":
            raise ValueError("ServiceConfig.replica_host 'serve' needs executor 'ray' (stage actors in its bundles)")
        _positive("ServiceConfig.stage_call_timeout_s", self.stage_call_timeout_s)
        _positive("ServiceConfig.placement_timeout_s", self.placement_timeout_s)
        _positive("ServiceConfig.repair_period_s", self.repair_period_s)
        if self.gpus_per_stage < 0 or self.cpus_per_stage < 0:
            raise ValueError("ServiceConfig.gpus_per_stage / cpus_per_stage must not be negative")
        if not isinstance(self.threads_per_stage, int) or self.threads_per_stage < 1:
            raise ValueError("ServiceConfig.threads_per_stage must be a positive int")


def _build(cls, data, where: str):
    """A config dataclass from a mapping, recursively; unknown keys are errors that name them."""
    import dataclasses
    import typing

    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        target = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
        if cls is GenerationConfig and key == "model":
            kwargs[key] = _model_from(value, f"{where}.model")
        elif target is not None and value is not None:
            kwargs[key] = _build(target, value, f"{where}.{key}")
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None


def _model_from(value, where: str) -> ModelConfig:
    """``model: tiny`` or ``model: {name: wan2.1-1.3b, kernel_backend: torch, ...}``."""
    if isinstance(value, str):
        return get_config(value)
    if not isinstance(value, dict):
        raise ValueError(f"{where}: a config name or a mapping")
    value = dict(value)
    name = value.pop("name", None)
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    if name is not None:
        return get_config(name, **fixed)
    return _build(ModelConfig, fixed, where)


def load_service_config(path: str) -> ServiceConfig:
    """The one file that carries every knob (``deploy/streamgen.yaml`` documents them all)."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return _build(ServiceConfig, data, path)
