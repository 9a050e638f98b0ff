"""Cost profiles: what the engine's pieces cost on one kind of device, as functions of tokens.

A profile is a JSON file (``profiles/*.json``) written by ``bench/profile.py`` (measured) or by hand from
published figures (its ``derivation`` says how). The simulator (``workers.sim``) charges every stage call,
decode and transfer from it. Torch-free, so ``streamgen plan`` loads without torch.

Costs are linear fits ``a_s + b_s * x``: x is the micro-batch's DiT tokens (latent frames x patches per
frame, all streams of the micro-batch) for blocks, embed and head, and the chunk's DiT tokens for the
decoders and the VAE encoder, so one profile serves any resolution and batch. Attention over a stream's
KV cache adds ``attention_s`` x tokens x cached tokens per block (see docs/capacity.md for what is left out).
On a CPU host (``cores``) the stages and decode workers share the cores: ``contention`` slows each call by how
busy the others are.
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import Field, ValidationError
from pydantic.dataclasses import dataclass

from workers.config import CONFIG, MODEL_CONFIGS, ModelConfig

Seconds = Annotated[float, Field(ge=0, le=1e6)]


@dataclass(frozen=True, config=CONFIG)
class Linear:
    """seconds = a_s + b_s * x."""

    a_s: Seconds = 0.0
    """Fixed seconds per call (launches, small ops)."""
    b_s: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Seconds per unit of x (a token)."""

    def __call__(self, x: float) -> float:
        return self.a_s + self.b_s * x


@dataclass(frozen=True, config=CONFIG)
class ModelCosts:
    """One model's costs on the profile's device."""

    block: Linear
    """One transformer block's forward; x = micro-batch tokens."""
    attention_s: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Per block, seconds per (micro-batch token x cached key token): attention over the streams' KV caches
    (0: folded into ``block``)."""
    embed: Linear = Linear()
    """Patch, time and text-context embedding on stage 0; x = micro-batch tokens."""
    head: Linear = Linear()
    """Output head and the ring update on the last stage; x = micro-batch tokens."""
    vae_decode: Linear = Linear()
    """The model's VAE decoder (plus frame encode) per chunk; x = the chunk's tokens."""
    tiny_decode: Linear | None = None
    """The tiny decoder (TAEHV) per chunk, when the model uses it (ModelConfig.vae_decoder taehv)."""
    vae_encode: Linear = Linear()
    """VAE encode of a video-to-video chunk on stage 0 (not charged for text-to-video); x = chunk tokens."""
    text_encode_s: Seconds = 0.0
    """One prompt through the text encoder on stage 0 (charged when a micro-batch carries a prompt)."""

    def decode(self, model: ModelConfig) -> Linear:
        """The decoder the model's config uses."""
        if model.vae_decoder == "taehv":
            if self.tiny_decode is None:
                raise ValueError("the profile has no tiny_decode cost, but the model decodes with taehv")
            return self.tiny_decode
        return self.vae_decode


@dataclass(frozen=True, config=CONFIG)
class Profile:
    """Costs of one device kind, per model, plus its links and memory."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    """Short name (cpu-2core, h100-sdv2, h200)."""
    device: str = ""
    """What it was measured or derived on."""
    command: str = ""
    """The command line that wrote it (measured profiles)."""
    derivation: str = ""
    """How the figures were obtained (derived profiles: from which published numbers, by which arithmetic)."""
    dtype: str = "bfloat16"
    """Weights and caches dtype the memory accounting uses (workers.devicemap.DTYPE_BYTES)."""
    gpu_memory_gib: Annotated[float, Field(gt=0, le=1 << 20)] | None = None
    """Memory per GPU; None: not bounded (a CPU)."""
    transfer_bytes_per_s: Annotated[float, Field(gt=0)] = 1e10
    """Stage-to-stage (and to a dedicated decode worker) bandwidth."""
    transfer_latency_s: Seconds = 0.0
    """Fixed time per stage-to-stage send."""
    call_overhead_s: Seconds = 0.0
    """Per stage call: dispatch, launch and bookkeeping outside the measured blocks."""
    cores: Annotated[int, Field(ge=1, le=4096)] | None = None
    """CPU cores that every stage and decode worker share (a CPU host); None: each owns its device (GPUs)."""
    shared_slowdown: Annotated[float, Field(ge=1, le=100)] = 1.0
    """A forward's time while the other cores compute too, over its time alone (shared caches, memory
    bandwidth, hyperthreads); with ``cores`` only."""
    models: dict[str, ModelCosts] = Field(default_factory=dict)
    """Model name (workers.config.MODEL_CONFIGS) -> its costs."""

    def costs(self, model: str) -> ModelCosts:
        try:
            return self.models[model]
        except KeyError:
            raise ValueError(f"profile {self.name!r} has no costs for model {model!r}; "
                             f"it has: {sorted(self.models)}") from None

    def transfer_s(self, nbytes: int) -> float:
        return self.transfer_latency_s + nbytes / self.transfer_bytes_per_s

    def contention(self, others: float) -> float:
        """Slowdown of a stage or decode call while ``others`` other processes compute on average (a CPU host):
        ``shared_slowdown`` as the other cores fill, then time sharing once there are more processes than
        cores. 1.0 without ``cores`` (GPUs)."""
        if self.cores is None or others <= 0:
            return 1.0
        share = min(1.0, others / (self.cores - 1)) if self.cores > 1 else 0.0
        return (1.0 + (self.shared_slowdown - 1.0) * share) * max(1.0, (1.0 + others) / self.cores)


def load_profile(path: str) -> Profile:
    """Read and validate a profile file; ValueError naming the file and the field on bad input."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as err:
        raise ValueError(f"cannot read profile {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"profile {path} is not JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"profile {path} must hold a JSON object")
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}  # "_comment" keys document the file
    try:
        profile = Profile(**raw)
    except (ValidationError, TypeError) as err:
        raise ValueError(f"bad profile {path}: {err}") from None
    unknown = sorted(set(profile.models) - set(MODEL_CONFIGS))
    if unknown:
        raise ValueError(f"profile {path} names unknown models {unknown}; known: {sorted(MODEL_CONFIGS)}")
    return profile


def dump_profile(profile: Profile) -> dict:
    """The profile as a JSON-ready dict (what ``load_profile`` reads back)."""
    from pydantic import TypeAdapter

    return TypeAdapter(Profile).dump_python(profile, mode="json")
