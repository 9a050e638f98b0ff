"""The device map: which piece of a pipeline replica sits on which GPU slot, what it holds, and whether it fits.

A replica's GPU slots are its stages (slot i = stage i; slot 0 also holds the text encoder) and then one
slot per dedicated decode worker (shared decode workers sit on the last stage's slot). Over Ray a slot is
a placement-group bundle; with the local backend it is ``cuda:<slot>`` (or the CPU). Memory is counted
per slot: weights of the pieces placed there, plus per-stream state (KV and cross-attention caches of
the blocks it owns, decoder state), against ``gpu_memory_utilization`` of the slot's memory.

Torch-free (``streamgen serve --dry-run`` prints it without loading anything); callers that can see the
devices pass their memory in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.config import GenerationConfig, ModelConfig, ParallelConfig
from workers.plan import even_split

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
UMT5_XXL_ENCODER_PARAMS = 5_680_000_000
"""umT5-XXL encoder: 24 layers of d_model 4096 / d_ff 10240 plus a 256384 x 4096 embedding."""
WAN_VAE_DECODER_PARAMS = 73_000_000
"""The Wan2.1 VAE's decoder half (the whole VAE: about 127M parameters)."""
WAN_VAE_ENCODER_PARAMS = 54_000_000
"""The Wan2.1 VAE's encoder half: stage 0 encodes video-to-video input with it."""
WAN_VAE_STATE_BYTES_480P = int(1.8 * GIB)
"""Streaming Wan VAE decoder state of one 832x480 session in bf16 (vllm-omni#7074); scales with pixels."""
TAEHV_DECODER_PARAMS = 9_844_611
"""TAEW2.1's decoder (workers/model/taehv.py, the published layout)."""


@dataclass(frozen=True, slots=True)
class Piece:
    """One thing a replica places on a GPU slot."""

    name: str
    slot: int
    weight_bytes: int
    stream_bytes: int = 0
    """State one stream adds on this slot (KV and cross-attention caches, decoder state)."""


@dataclass
class DeviceMap:
    """The placement of one pipeline replica's pieces and the memory each slot needs."""

    pieces: list[Piece]
    devices: list[str]
    """Per slot: where it runs (``cuda:0``, ``cpu``, ``bundle 1``)."""
    capacity_bytes: list[int | None] = field(default_factory=list)
    """Per slot: its memory (None: not known, not checked)."""
    utilization: float = 0.9

    @property
    def slots(self) -> int:
        return len(self.devices)

    def on(self, slot: int) -> list[Piece]:
        return [p for p in self.pieces if p.slot == slot]

    def weight_bytes(self, slot: int) -> int:
        return sum(p.weight_bytes for p in self.on(slot))

    def stream_bytes(self, slot: int) -> int:
        return sum(p.stream_bytes for p in self.on(slot))

    def usable_bytes(self, slot: int) -> int | None:
        cap = self.capacity_bytes[slot] if slot < len(self.capacity_bytes) else None
        return None if cap is None else int(cap * self.utilization)

    def check(self) -> None:
        """Raise ValueError naming the first piece that does not fit its slot (weights, then one stream)."""
        for slot in range(self.slots):
            usable = self.usable_bytes(slot)
            if usable is None:
                continue
            used = 0
            for piece in self.on(slot):
                used += piece.weight_bytes
                if used > usable:
                    raise ValueError(
                        f"{piece.name} does not fit on slot {slot} ({self.devices[slot]}): the weights placed there "
                        f"need {used / GIB:.2f} GiB of the {usable / GIB:.2f} GiB usable "
                        f"({self.utilization:g} of {self.capacity_bytes[slot] / GIB:.2f} GiB)")
            per_stream = self.stream_bytes(slot)
            if used + per_stream > usable:
                holder = max(self.on(slot), key=lambda p: p.stream_bytes)
                raise ValueError(
                    f"{holder.name}: one stream's state ({per_stream / GIB:.2f} GiB on slot {slot}, "
                    f"{self.devices[slot]}) does not fit beside {used / GIB:.2f} GiB of weights in "
                    f"{usable / GIB:.2f} GiB usable")

    def max_streams(self, free_bytes: list[int | None] | None = None) -> int | None:
        """Streams whose state fits on every slot: from ``free_bytes`` per slot measured after the weights
        loaded (less the reserve ``1 - utilization`` of the capacity), else from the plan. None: unbounded
        (no slot's memory is known)."""
        best: int | None = None
        for slot in range(self.slots):
            per_stream = self.stream_bytes(slot)
            if per_stream == 0:
                continue
            if free_bytes is not None and slot < len(free_bytes) and free_bytes[slot] is not None:
                cap = self.capacity_bytes[slot] if slot < len(self.capacity_bytes) else None
                reserve = 0 if cap is None else int(cap * (1 - self.utilization))
                room = free_bytes[slot] - reserve
            else:
                usable = self.usable_bytes(slot)
                if usable is None:
                    continue
                room = usable - self.weight_bytes(slot)
            n = max(0, room) // per_stream
            best = n if best is None else min(best, n)
        return best

    def describe(self) -> str:
        """The plan as a table: one line per piece, a total per slot."""
        lines = []
        for slot in range(self.slots):
            usable = self.usable_bytes(slot)
            cap = "memory not checked" if usable is None else \
                f"{usable / GIB:.2f} GiB usable of {self.capacity_bytes[slot] / GIB:.2f} GiB"
            lines.append(f"slot {slot} ({self.devices[slot]}; {cap}):")
            for p in self.on(slot):
                lines.append(f"  {p.name:<44} weights {p.weight_bytes / GIB:8.3f} GiB   "
                             f"per stream {p.stream_bytes / GIB:8.3f} GiB")
            lines.append(f"  {'total':<44} weights {self.weight_bytes(slot) / GIB:8.3f} GiB   "
                         f"per stream {self.stream_bytes(slot) / GIB:8.3f} GiB")
        n = self.max_streams()
        lines.append("streams by memory: " + ("unbounded (no slot memory known)" if n is None else str(n)))
        return "\n".join(lines)


# -- parameter and state counts (from the config; unit tests hold them to the built modules) ----------

def block_parameters(cfg: ModelConfig) -> int:
    """One transformer block: self- and cross-attention (q, k, v, o + q/k norms), affine norm3, FFN, modulation."""
    d, ff = cfg.dim, cfg.ffn_dim
    attention = 4 * (d * d + d) + 2 * d
    return 2 * attention + 2 * d + (d * ff + ff) + (ff * d + d) + 6 * d


def embed_parameters(cfg: ModelConfig) -> int:
    """Patch, text and time embeddings plus the time projection (the first stage's extras)."""
    d, p = cfg.dim, cfg.patch_size
    patch = cfg.in_channels * d * p[0] * p[1] * p[2] + d
    text = cfg.text_dim * d + d + d * d + d
    time = cfg.freq_dim * d + d + d * d + d
    return patch + text + time + d * 6 * d + 6 * d


def head_parameters(cfg: ModelConfig) -> int:
    p = cfg.patch_size
    out = cfg.out_channels * p[0] * p[1] * p[2]
    return cfg.dim * out + out + 2 * cfg.dim


def kv_stream_bytes(gen: GenerationConfig, blocks: int, dtype_bytes: int) -> int:
    """One stream's self-attention K/V (cache plus the staging rows of its longest forward) and
    cross-attention K/V on ``blocks`` blocks."""
    m, s = gen.model, gen.sampler
    longest = s.chunk_frames * ((s.num_steps + 1) if s.mode == "stream_batch" else 1)
    frames = gen.cache.capacity_frames + max(longest, gen.cache.recache_frames)
    self_kv = 2 * frames * m.tokens_per_frame(gen.height, gen.width) * m.dim
    cross_kv = 2 * m.text_len * m.dim
    return blocks * (self_kv + cross_kv) * dtype_bytes


def decoder_bytes(gen: GenerationConfig, dtype_bytes: int) -> tuple[int, int]:
    """(weights, one stream's state) of the decode workers' decoder."""
    m = gen.model
    lh, lw = m.latent_grid(gen.height, gen.width)
    if m.vae == "tiny" and m.vae_decoder == "wan":  # workers/model/vae.py TinyVAE, width 32: three causal convs keep 2 frames each
        width, z, up = 32, m.out_channels, m.vae_stride[0]
        weights = (z * width * 27 + width) + (width * width * 27 + width) + (width * 16 * up + 16 * up) \
            + (16 * 16 * 27 + 16) + (16 * 3 + 3)
        state = 2 * lh * lw * (z + width + 16)
        return weights * dtype_bytes, state * dtype_bytes
    if m.vae_decoder == "taehv":  # each MemBlock keeps its last input frame: 3 per level, 256/128/64 channels
        state = 3 * lh * lw * (256 + 128 * 4 + 64 * 16)
        return TAEHV_DECODER_PARAMS * dtype_bytes, state * dtype_bytes
    scale = (gen.height * gen.width) / (480 * 832)
    return WAN_VAE_DECODER_PARAMS * dtype_bytes, int(WAN_VAE_STATE_BYTES_480P * scale * dtype_bytes / 2)


def encoder_bytes(gen: GenerationConfig, dtype_bytes: int) -> int:
    """Weights of the VAE encoder stage 0 loads for video-to-video streams (their per-stream causal state, a
    few frames of activations, is not counted: streams are sized by the larger decoder state)."""
    m = gen.model
    if m.vae == "tiny":  # TinyVAE's encoder: patchify conv, a causal 3x3x3 conv, time-stride conv, 1x1 out
        width, z, t, s = 32, m.in_channels, m.vae_stride[0], m.vae_stride[1]
        params = (3 * width * s * s + width) + (width * width * 27 + width) + (width * width * t + width) \
            + (width * z + z)
        return params * dtype_bytes
    return WAN_VAE_ENCODER_PARAMS * dtype_bytes


def text_encoder_bytes(gen: GenerationConfig, dtype_bytes: int) -> int:
    return 0 if gen.model.text_encoder == "hash" else UMT5_XXL_ENCODER_PARAMS * dtype_bytes


# -- the plan ---------------------------------------------------------------------------------------

def plan(gen: GenerationConfig, parallel: ParallelConfig, split: list[tuple[int, int]] | None = None,
         capacity_bytes: list[int | None] | None = None, devices: list[str] | None = None) -> DeviceMap:
    """The device map of one replica. ``capacity_bytes``: memory per slot (``parallel.gpu_memory_gib``
    overrides it; None: unknown); ``devices``: per-slot names to show (default ``slot i``)."""
    m, nbytes = gen.model, DTYPE_BYTES[parallel.dtype]
    split = split or even_split(m.num_layers, parallel.stages)
    last = parallel.stages - 1
    pieces = []
    for i, (a, b) in enumerate(split):
        weights = (b - a) * block_parameters(m) + (embed_parameters(m) if i == 0 else 0) \
            + (head_parameters(m) if i == last else 0)
        extras = ", embeddings" if i == 0 else ""
        extras += ", head" if i == last else ""
        pieces.append(Piece(f"stage {i} (blocks {a}-{b - 1}{extras})", i, weights * nbytes,
                            kv_stream_bytes(gen, b - a, nbytes)))
    pieces.append(Piece(f"text encoder ({m.text_encoder})", 0, text_encoder_bytes(gen, nbytes)))
    pieces.append(Piece(f"VAE encoder ({m.vae}, video-to-video)", 0, encoder_bytes(gen, nbytes)))
    dec_weights, dec_state = decoder_bytes(gen, nbytes)
    for w in range(parallel.decode_workers):
        slot = last if parallel.decode == "shared" else parallel.stages + w
        # a stream's decoder state lives on one worker; counted on each (any may get the next stream)
        name = "TAEHV" if m.vae_decoder == "taehv" else f"{m.vae} VAE"
        pieces.append(Piece(f"decode worker {w} ({name}, {parallel.decode})", slot, dec_weights, dec_state))
    slots = parallel.gpu_slots
    if parallel.gpu_memory_gib is not None:
        capacity_bytes = [int(parallel.gpu_memory_gib * GIB)] * slots
    capacity_bytes = list(capacity_bytes or [None] * slots)
    if len(capacity_bytes) < slots:
        capacity_bytes += [None] * (slots - len(capacity_bytes))
    return DeviceMap(pieces, devices or [f"slot {i}" for i in range(slots)], capacity_bytes,
                     parallel.gpu_memory_utilization)


def local_slots(parallel: ParallelConfig, cuda_count: int) -> list[str]:
    """The local backend's device per slot: ``cuda:<slot>`` when the stages run on CUDA, else ``cpu``.
    Raises ValueError naming the first piece whose slot has no GPU."""
    if parallel.stage_device(cuda_count > 0) == "cpu":
        return ["cpu"] * parallel.gpu_slots
    if parallel.gpu_slots > cuda_count:
        slot = cuda_count
        piece = f"stage {slot}" if slot < parallel.stages else f"decode worker {slot - parallel.stages} (dedicated)"
        raise ValueError(f"{piece} needs GPU slot {slot}, but this process sees {cuda_count} GPUs "
                         f"({parallel.gpu_slots} slots: {parallel.stages} stages + dedicated decode workers)")
    return [f"cuda:{i}" for i in range(parallel.gpu_slots)]
