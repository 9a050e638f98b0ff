"""The data plane's configuration: model, sampler, cache, engine, generation and parallel topology.

Torch-free, so the control plane (``orchestrator/config.py``, which composes the service root) and the
CLI import it without loading torch. Every class is a frozen pydantic dataclass: each field has a
default, a one-line attribute docstring (its ``description``) and a validated range; unknown keys and
bad values raise ``ValueError`` (pydantic's ``ValidationError``) naming the field. Being dataclasses,
they keep ``dataclasses.replace`` (which validates again) and pickle as they are (Ray ships them).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Any, Literal, get_args

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

__all__ = [
    "CONFIG",
    "MAX_STEPS",
    "ModelConfig",
    "SamplerConfig",
    "CacheConfig",
    "EngineConfig",
    "GenerationConfig",
    "ParallelConfig",
    "MODEL_CONFIGS",
    "get_config",
    "shipped_weights",
    "check_topology",
    "KERNEL_BACKENDS",
    "SAMPLER_MODES",
    "CACHE_POLICIES",
]

MAX_STEPS = 8
"""Most denoising steps a stream may use (request ``steps``, and the sampler's step list)."""

CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True)
"""Shared by every config class here and in orchestrator/config.py: unknown keys are errors."""

KernelBackend = Literal["auto", "torch", "triton"]
SamplerMode = Literal["sequential", "stream_batch"]
CachePolicy = Literal["sink", "ema_sink", "none"]
KERNEL_BACKENDS: tuple[str, ...] = get_args(KernelBackend)
SAMPLER_MODES: tuple[str, ...] = get_args(SamplerMode)
CACHE_POLICIES: tuple[str, ...] = get_args(CachePolicy)

Count = Annotated[int, Field(ge=1, le=1 << 20)]
"""A positive count or size (widths, layers, tokens)."""
Frames = Annotated[int, Field(ge=0, le=1 << 16)]
"""A number of latent frames."""
Pixels = Annotated[int, Field(ge=1, le=1 << 14)]
Triple = tuple[Annotated[int, Field(ge=1, le=64)], Annotated[int, Field(ge=1, le=64)],
               Annotated[int, Field(ge=1, le=64)]]
Timestep = Annotated[float, Field(gt=0, le=1000)]


@dataclass(frozen=True, config=CONFIG)
class ModelConfig:
    """Shape of a Wan2.1 causal DiT plus the small components streamgen pairs it with."""

    dim: Count = 1536
    """Hidden width of the transformer."""
    ffn_dim: Count = 8960
    """Inner width of each block's FFN."""
    num_heads: Count = 12
    """Attention heads; dim // num_heads is the head dim (128 for the real models)."""
    num_layers: Annotated[int, Field(ge=1, le=1024)] = 30
    """Transformer blocks."""
    text_dim: Count = 4096
    """Width of the text encoder's output (umT5-XXL: 4096)."""
    freq_dim: Annotated[int, Field(ge=2, le=1 << 16, multiple_of=2)] = 256
    """Width of the sinusoidal timestep embedding (even)."""
    in_channels: Annotated[int, Field(ge=1, le=1024)] = 16
    """Latent channels in."""
    out_channels: Annotated[int, Field(ge=1, le=1024)] = 16
    """Latent channels out."""
    patch_size: Triple = (1, 2, 2)
    """(t, h, w) patch; t must be 1 so that a token belongs to exactly one latent frame."""
    eps: Annotated[float, Field(gt=0, lt=1e-2)] = 1e-6
    """LayerNorm / RMSNorm epsilon."""
    text_len: Count = 512
    """Text tokens per prompt; the encoder pads (with zeros) to this length."""
    rope_max_positions: Count = 1024
    """Temporal RoPE positions available; cache size plus in-flight frames must stay below it."""
    vae_stride: Triple = (4, 8, 8)
    """(t, h, w) compression of the VAE: one latent frame is 4 video frames, 8x8 pixels."""
    default_height: Pixels = 480
    """Video height in pixels when a request gives 0."""
    default_width: Pixels = 832
    """Video width in pixels when a request gives 0."""
    text_encoder: Literal["umt5", "hash"] = "umt5"
    """umt5 (real, local path) or hash (small, deterministic, no weights)."""
    vae: Literal["wan", "tiny", "demo"] = "wan"
    """wan (real Wan VAE, local path), tiny (small causal VAE, seeded weights) or demo (trained, with its DiT)."""
    vae_decoder: Literal["wan", "taehv"] = "wan"
    """Decoder: wan (the vae's own) or taehv (TAEW2.1 tiny decoder; the vae still encodes)."""
    weights: Annotated[str, Field(max_length=128, pattern=r"^([A-Za-z0-9_.-]+\.(pt|safetensors))?$")] = ""
    """Shipped checkpoint (a file in workers/weights/) loaded, EMA, when model_path is empty; empty: seeded weights."""
    init_seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    """Seed for weights when no checkpoint is loaded (tiny / small configs and tests)."""
    kernel_backend: KernelBackend = "auto"
    """Memory-bound block ops: auto (Triton on CUDA when available), torch or triton."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"ModelConfig head dim ({self.head_dim}) must be even and at least 6 for 3D RoPE")
        if self.patch_size[0] != 1:
            raise ValueError("ModelConfig.patch_size[0] must be 1 (one token belongs to one latent frame)")
        if self.vae_decoder == "taehv" and self.vae_stride != (4, 8, 8):
            raise ValueError(f"ModelConfig.vae_decoder 'taehv' needs vae_stride (4, 8, 8), got {self.vae_stride}")
        if self.vae == "demo" and (self.vae_stride != (4, 8, 8) or self.in_channels != self.out_channels):
            raise ValueError("ModelConfig.vae 'demo' needs vae_stride (4, 8, 8) and in_channels = out_channels")
        try:
            self.latent_grid(self.default_height, self.default_width)
        except ValueError as err:
            raise ValueError(f"ModelConfig.default_height / default_width: {err}") from None
        return self

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

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token (h, w) of one latent frame for a pixel size: the latent grid over the patch."""
        lh, lw = self.latent_grid(height, width)
        return lh // self.patch_size[1], lw // self.patch_size[2]

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens one latent frame becomes: 1560 for 480x832 with the real patch (30 x 52)."""
        gh, gw = self.token_grid(height, width)
        return gh * gw


WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
"""Checkpoints shipped with streamgen (package data, so an installed package finds them): ``demo.pt``, the demo
model's DiT (``generator`` / ``generator_ema``) and VAE (``vae``), made by ``make train-demo``."""


def shipped_weights(name: str) -> str:
    """Path of a shipped checkpoint (``ModelConfig.weights``)."""
    return os.path.join(WEIGHTS_DIR, name)


MODEL_CONFIGS: dict[str, ModelConfig] = {
    # Tests: random weights; a chunk's forward takes a few ms on one CPU thread.
    "tiny": ModelConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=4, text_dim=32, freq_dim=32,
                        text_len=16, default_height=64, default_width=96, text_encoder="hash", vae="tiny"),
    # Benchmarks: compute-dominated on CPU (well over 50 ms per chunk per half-model on one thread).
    "small": ModelConfig(dim=512, ffn_dim=1536, num_heads=8, num_layers=8, text_dim=128, freq_dim=64,
                         text_len=32, default_height=128, default_width=256, text_encoder="hash", vae="tiny"),
    # The demo: trained on synthetic clips (workers/demo/, `make train-demo`) with its own small VAE (64x64 RGB
    # <-> 8x8x8 latents, 4 frames per latent frame); DiT and VAE weights ship in workers/weights/demo.pt.
    "demo": ModelConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=4, text_dim=32, freq_dim=64, in_channels=8,
                        out_channels=8, patch_size=(1, 1, 1), text_len=8, default_height=64, default_width=64,
                        text_encoder="hash", vae="demo", weights="demo.pt"),
    "wan2.1-1.3b": ModelConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-14b": ModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A named model config, optionally with fields replaced (validated again)."""
    try:
        base = MODEL_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(MODEL_CONFIGS)}") from None
    return dataclasses.replace(base, **overrides) if overrides else base


@dataclass(frozen=True, config=CONFIG)
class SamplerConfig:
    """Few-step flow-matching sampler (REFERENCE §2 A.6-A.7).

    ``mode``: ``sequential`` runs a chunk's steps in order, then its context pass, then the next chunk
    (Self-Forcing); ``stream_batch`` carries every in-flight chunk at its own step in one forward per
    tick (docs/stream_batch). ``batch_attention`` (stream_batch only) says what an in-flight entry
    attends to besides the clean cache: ``inflight`` also the older in-flight chunks of its forward
    (block-causal, like Rolling Forcing); ``clean`` only the forward's clean context chunk and itself (as
    Self-Forcing checkpoints were trained), so entries are independent. ``lanes`` (stream_batch only):
    forward k consumes the output of forward k - lanes, so with lanes = P a single stream keeps all P
    pipeline stages busy (as StreamDiffusionV2's ring does); the reference uses it too.
    """

    denoising_steps: Annotated[tuple[Timestep, ...], Field(min_length=1, max_length=MAX_STEPS)] = \
        (1000.0, 750.0, 500.0, 250.0)
    """Step list before warping, strictly decreasing in (0, 1000] (Self-Forcing's default)."""
    warp: bool = True
    """Map the step list through the shifted sigma table (warp_denoising_step)."""
    shift: Annotated[float, Field(gt=0, le=100)] = 5.0
    """Timestep shift S: 5 for Self-Forcing / LongLive / Reward Forcing, 8 for CausVid / StreamDiffusionV2."""
    chunk_frames: Annotated[int, Field(ge=1, le=64)] = 3
    """Latent frames per chunk: 3 for Self-Forcing T2V, 1 for StreamDiffusionV2 V2V."""
    mode: SamplerMode = "sequential"
    """sequential: one chunk's steps in order; stream_batch: one forward carries every in-flight chunk."""
    context_timestep: Annotated[float, Field(ge=0, lt=1000)] = 0.0
    """Timestep of the context pass that writes a finished chunk's clean K/V."""
    batch_attention: Literal["inflight", "clean"] = "inflight"
    """stream_batch only: in-flight entries also attend to older in-flight chunks (inflight) or not (clean)."""
    lanes: Annotated[int, Field(ge=1, le=64)] = 1
    """stream_batch only: forwards one stream keeps in flight (lanes = P keeps P stages busy)."""
    v2v_steps: Annotated[tuple[Timestep, ...], Field(min_length=1, max_length=MAX_STEPS)] = (700.0, 500.0, 400.0, 200.0)
    """Video-to-video step list before warping (StreamDiffusionV2's); the noise controller sets each chunk's first."""

    @model_validator(mode="after")
    def _check(self) -> SamplerConfig:
        for name in ("denoising_steps", "v2v_steps"):
            steps = getattr(self, name)
            if any(a <= b for a, b in zip(steps, steps[1:])):
                raise ValueError(f"SamplerConfig.{name} must be strictly decreasing, got {steps}")
        if self.lanes > 1 and self.mode != "stream_batch":
            raise ValueError("SamplerConfig.lanes > 1 needs mode 'stream_batch'")
        return self

    @property
    def num_steps(self) -> int:
        return len(self.denoising_steps)


@dataclass(frozen=True, config=CONFIG)
class CacheConfig:
    """Per-stream rolling self-attention KV cache (memory fixed: sink_frames + window_frames frames).

    A chunk attends to the sink, the ``window_frames`` most recent committed frames and itself, so
    Self-Forcing's ``local_attn_size`` L with chunk f maps to ``sink_frames + window_frames = L - f``.
    """

    policy: CachePolicy = "sink"
    """sink: first sink_frames pinned; ema_sink: evicted frames blend into the sink; none: plain window."""
    sink_frames: Frames = 3
    """Pinned frames (ignored, treated as 0, for policy none)."""
    window_frames: Annotated[int, Field(ge=1, le=1 << 16)] = 6
    """Most recent committed frames kept beside the sink."""
    ema_alpha: Annotated[float, Field(ge=0, le=1)] = 0.999
    """ema_sink: sink <- alpha * sink + (1 - alpha) * evicted."""
    recache_frames: Frames = 9
    """Clean latents kept per stream and re-encoded on a prompt change or recovery (LongLive's K)."""

    @model_validator(mode="after")
    def _check(self) -> CacheConfig:
        if self.policy in ("sink", "ema_sink") and self.sink_frames < 1:
            raise ValueError(f"CacheConfig.policy {self.policy!r} needs sink_frames >= 1")
        return self

    @property
    def pinned_frames(self) -> int:
        return 0 if self.policy == "none" else self.sink_frames

    @property
    def capacity_frames(self) -> int:
        return self.pinned_frames + self.window_frames


@dataclass(frozen=True, config=CONFIG)
class EngineConfig:
    """How a pipeline replica's engine schedules and re-plans."""

    max_batch_streams: Annotated[int, Field(ge=1, le=1024)] = 4
    """Streams batched into one micro-batch at most."""
    profile_every: Annotated[int, Field(ge=0, le=1 << 20)] = 8
    """Every n-th micro-batch times each block (feeds the block planner); 0 = never."""
    rebalance_every: Annotated[int, Field(ge=0, le=1 << 20)] = 32
    """Check the block split every n micro-batches; 0 = never re-plan (the split stays as built, even at start)."""
    rebalance_threshold: Annotated[float, Field(gt=0, lt=10)] = 0.15
    """Re-plan when the slowest stage is this much slower than the best split's slowest stage."""
    cost_decay: Annotated[float, Field(ge=0, lt=1)] = 0.8
    """EWMA decay of the measured per-block costs."""

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.rebalance_every and not self.profile_every:
            raise ValueError("EngineConfig.rebalance_every needs profile_every > 0 (costs come from profiling)")
        return self


def _model_field(value: Any) -> Any:
    """``model: tiny``, or ``model: {name: wan2.1-1.3b, kernel_backend: torch}`` (a name plus overrides)."""
    if isinstance(value, str):
        return get_config(value)
    if isinstance(value, dict) and "name" in value:
        rest = dict(value)
        base = get_config(rest.pop("name"))
        # The named fields under the overrides, validated as one mapping so a bad key keeps its path.
        return {f.name: getattr(base, f.name) for f in dataclasses.fields(base)} | rest
    return value


@dataclass(frozen=True, config=CONFIG)
class GenerationConfig:
    """What one stream generates with: model, sampler, cache and video size."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: get_config("demo"))
    """Model shape: a named config (demo, tiny, small, wan2.1-1.3b, wan2.1-14b), or a name plus field overrides."""
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    """Few-step sampler: step list, shift, chunk size and mode."""
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    """Per-stream rolling KV cache."""
    height: Annotated[int, Field(ge=0, le=1 << 14)] = 0
    """Pixels; 0 means the model's default."""
    width: Annotated[int, Field(ge=0, le=1 << 14)] = 0
    """Pixels; 0 means the model's default."""
    model_path: str = ""
    """Local DiT checkpoint (.pt / .safetensors); empty means seeded random weights."""
    text_encoder_path: str = ""
    """Local directory of a umT5 encoder + tokenizer (text_encoder umt5)."""
    vae_path: str = ""
    """Local directory of a diffusers AutoencoderKLWan (vae wan)."""
    taehv_path: str = ""
    """Local TAEW2.1 weight file, .pth or .safetensors (vae_decoder taehv; empty: seeded, tiny vae only)."""
    use_ema: bool = False
    """Load generator_ema instead of generator from a Self-Forcing-style file."""

    @field_validator("model", mode="before")
    @classmethod
    def _named_model(cls, value: Any) -> Any:
        return _model_field(value)

    def checkpoint(self) -> tuple[str, bool]:
        """(path, use_ema) of the DiT weights to load: ``model_path``, else the model's shipped ``weights``
        (their generator_ema), else ("", False) for seeded random weights."""
        if self.model_path or not self.model.weights:
            return self.model_path, self.use_ema
        return shipped_weights(self.model.weights), True

    def vae_checkpoint(self) -> str:
        """Where the VAE's weights are: ``vae_path``, else, for a VAE stored with its DiT (vae demo), the DiT's
        checkpoint (so a retrained pair stays a pair)."""
        if self.vae_path or self.model.vae != "demo":
            return self.vae_path
        return self.checkpoint()[0]

    @model_validator(mode="after")
    def _check(self) -> GenerationConfig:
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
        return self


@dataclass(frozen=True, config=CONFIG)
class ParallelConfig:
    """How one pipeline replica is laid out: stages, decode workers, where they run, device and dtype.

    Topology only: frames equal the single-process reference for every setting here but ``dtype``.
    GPU slots of a replica: 0..stages-1 hold the stages (slot 0 also the text encoder and the VAE
    encoder), then one slot per dedicated decode worker (``workers/devicemap.py`` computes the map).
    """

    stages: Annotated[int, Field(ge=1, le=1024)] = 2
    """Pipeline stages per replica, each a contiguous range of blocks (at most the model's num_layers)."""
    plan: Literal["layers"] = "layers"
    """How the model is split over stages: layers (contiguous block ranges, re-balanced by profiling)."""
    backend: Literal["ray", "local"] = "ray"
    """ray: one Ray actor per stage and decode worker; local: all in this process (never imports ray)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA where a stage has a GPU (Ray: gpus_per_stage > 0), else CPU; or force cpu / cuda."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations of the stages, text encoder and VAE (the reference comparisons use float32)."""
    decode: Literal["shared", "dedicated"] = "shared"
    """Decode workers share the last stage's GPU (their own CUDA stream) or each take a GPU of its own."""
    decode_workers: Annotated[int, Field(ge=0, le=64)] = 1
    """VAE decode (and JPEG encode) workers per replica; 0: no decode, latents only (DiT benchmarks)."""
    cuda_graphs: Literal["auto", "off"] = "auto"
    """auto: replay captured CUDA graphs of the DiT forward where a stage runs on CUDA; off: eager."""
    gpu_memory_gib: Annotated[float, Field(gt=0, le=1 << 20)] | None = None
    """Memory of each GPU slot the device map plans with; None: what the device reports (unchecked on CPU)."""
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    """Share of each GPU's memory the pieces and stream state may use (the rest: activations, workspace)."""
    threads_per_stage: Annotated[int, Field(ge=1, le=1024)] = 1
    """Torch intra-op threads of each stage actor (local backend: of the process, which runs every stage)."""
    cpus_per_stage: Annotated[float, Field(ge=0, le=1024)] = 0.0
    """CPUs each stage actor reserves (0 lets tests pack many actors on 2 cores)."""
    gpus_per_stage: Annotated[float, Field(ge=0, le=64)] = 0.0
    """GPUs each stage actor reserves (1 on GPU clusters; logical GPUs fake a cluster in tests)."""
    # serving pipelines outrank processes still starting beside them on shared cores (a sibling replica's
    # rebuild: Python, torch, a model load); lowering niceness needs CAP_SYS_NICE, else Ray's 15 stays
    serving_nice: Annotated[int, Field(ge=-20, le=19)] | None = 5
    """Niceness a stage, decode worker or Serve-hosted core takes once ready (Ray starts them at 15; None: keep it)."""
    # for nodes whose cores are this service's (workers/host.py; docs/operations.md "CPU stages and cores")
    pin_cores: bool = False
    """CPU stages each claim threads_per_stage free cores of their node and run only there; too few free: float."""
    # more per call: Ray's hand-over between calls (~1 ms of a busy CPU stage's time) is paid once per call; a
    # micro-batch's result waits for the rest of its call and the engine issues work further ahead
    micro_batches_per_call: Annotated[int, Field(ge=1, le=64)] = 1
    """Ray: micro-batches the driver hands each stage in one call (docs/pipeline.md, Executors)."""
    stage_call_timeout_s: Annotated[float, Field(gt=0, le=86400)] = 10.0
    """A stage that does not finish a forward within this long is treated as dead (hung stage)."""
    placement_timeout_s: Annotated[float, Field(gt=0, le=86400)] = 60.0
    """How long a replica waits for its stage slots (start-up, rebuild after a failure) before giving up."""

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if self.device == "cuda" and self.backend == "ray" and not self.gpus_per_stage:
            raise ValueError("ParallelConfig.device 'cuda' with backend 'ray' needs gpus_per_stage > 0 "
                             "(a Ray actor without a GPU reservation sees no CUDA device)")
        return self

    @property
    def gpu_slots(self) -> int:
        """GPU slots one replica takes: its stages, plus one per dedicated decode worker."""
        return self.stages + (self.decode_workers if self.decode == "dedicated" else 0)

    def stage_device(self, cuda_available: bool) -> str:
        """The torch device kind each stage runs on, given whether this process sees a CUDA device."""
        if self.device == "cuda" and not cuda_available:
            raise ValueError("ParallelConfig.device is 'cuda' but no CUDA device is available")
        if self.device == "auto":
            has_gpu = self.backend == "local" or self.gpus_per_stage > 0
            return "cuda" if has_gpu and cuda_available else "cpu"
        return self.device


def check_topology(parallel: ParallelConfig, model: ModelConfig) -> None:
    """The parallel layout fits the model: every stage gets at least one block."""
    if parallel.stages > model.num_layers:
        raise ValueError(f"ParallelConfig.stages ({parallel.stages}) must not exceed the model's "
                         f"num_layers ({model.num_layers}): every stage needs a block")
