"""Wan2.1 causal DiT, written for streaming. State-dict keys are the original Wan names (REFERENCE §2 A.2).

No parallelism lives here. A pipeline stage is this same class built with a block range
``[a, b)`` (other blocks do not exist, so no weights are loaded for them) and with or without the
embeddings and the head.

Hidden states are laid out by latent frame: h [F, T, C] (frames of every stream in the forward,
tokens per frame, channels). A forward carries one or more *segments*, each one stream's frames;
GEMMs and norms run over all frames at once, attention runs per segment against that stream's cache.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from streamgen_kernels import ops
from workers.config import ModelConfig
from workers.model.rope import RopeTables

if TYPE_CHECKING:  # workers.cache imports workers.model.rope
    from workers.cache import StreamCache


@dataclass
class Segment:
    """One stream's frames inside a forward, in order (oldest first)."""

    frames: int
    """Latent frames of this stream in the forward."""
    cache: StreamCache | None = None
    """The stream's caches on this model slice; None runs without a KV cache (full sequence)."""
    context: torch.Tensor | None = None
    """Embedded text [L, dim], used when there is no cache (the cache carries its own context)."""
    block_frames: int | None = None
    """Frames per causal block inside the segment; None = bidirectional over the whole segment."""
    commit_frames: int = 0
    """Leading frames whose K/V join the cache after this forward (the context pass)."""
    independent: bool = False
    """Each causal block attends to the cache, the segment's committing (clean context) block and
    itself only, not to other blocks of the segment."""
    offsets: tuple[int, ...] | None = None
    """Independent segments: each block's first temporal position, in frames after the cache (default
    0, f, 2f, ...). Lets a segment carry a subset of a forward's blocks at their original positions."""


class Activation(NamedTuple):
    """What one slice hands to the next: hidden [F, T, C], time embedding [F, C], modulation [F, 6, C]."""

    hidden: torch.Tensor
    e_time: torch.Tensor
    e0: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    """q, k, v, o projections with q/k RMSNorm across all heads (names as Wan's self_attn / cross_attn)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(d, cfg.eps)
        self.norm3 = nn.LayerNorm(d, cfg.eps, elementwise_affine=True)  # cross-attention pre-norm
        self.cross_attn = Attention(d, cfg.eps)
        self.norm2 = nn.LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.zeros(1, 6, d))


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))


TIME_ROWS_KEPT = 256
"""Distinct timesteps whose embedding ``embed_time`` keeps (a few per sampler; more with a motion-aware noise
controller's continuous steps): past it the rows are computed afresh."""


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding: float64, cat[cos, sin], freqs 10000^(-i/half). t [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=1)


class CausalWanModel(nn.Module):
    """Wan2.1 causal DiT, or a slice of it: blocks [a, b), optionally with embeddings and head."""

    def __init__(self, cfg: ModelConfig, block_range: tuple[int, int] | None = None,
                 with_embed: bool = True, with_head: bool = True):
        super().__init__()
        a, b = block_range if block_range is not None else (0, cfg.num_layers)
        if not (0 <= a <= b <= cfg.num_layers):
            raise ValueError(f"block range [{a}, {b}) is outside the model's {cfg.num_layers} blocks")
        self.cfg = cfg
        self.block_range = (a, b)
        self.with_embed = with_embed
        self.with_head = with_head
        d, p = cfg.dim, cfg.patch_size
        if with_embed:
            self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=p, stride=p)
            self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                                nn.Linear(d, d))
            self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
            self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(a, b)})
        if with_head:
            self.head = Head(cfg)
        self.init_weights(cfg.init_seed)
        self.rope = RopeTables(cfg.head_dim)
        self._time_rows: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}  # t -> (e_time [dim], e0 [6, dim])
        self._time_version: tuple = ()  # the time embedding's weights the rows were computed with

    # ----------------------------------------------------------------------------------------------
    # weights

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seeded random weights, each parameter from its own name, so any slice of the model holds
        exactly the weights the full model holds under the same names."""
        for name, param in self.named_parameters():
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            if name.endswith("modulation"):
                value = torch.randn(param.shape, generator=gen) / self.cfg.dim ** 0.5
            elif name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm3.weight"):
                value = 1 + 0.1 * torch.randn(param.shape, generator=gen)
            elif name.endswith("bias"):
                value = 0.02 * torch.randn(param.shape, generator=gen)
            else:
                fan_in = param[0].numel()
                value = torch.randn(param.shape, generator=gen) / fan_in ** 0.5
            param.copy_(value)

    @property
    def block_ids(self) -> list[int]:
        return list(range(*self.block_range))

    def release_blocks(self, ids: list[int]) -> dict[int, Block]:
        """Remove blocks from either end of this slice and return them (weights move with them)."""
        keep = [i for i in self.block_ids if i not in set(ids)]
        out = {i: self.blocks[str(i)] for i in ids}
        self._set_blocks({i: self.blocks[str(i)] for i in keep})
        return out

    def adopt_blocks(self, blocks: dict[int, Block]) -> None:
        """Add blocks adjacent to this slice (the slice must stay contiguous)."""
        merged = {i: self.blocks[str(i)] for i in self.block_ids}
        merged.update(blocks)
        self._set_blocks(merged)

    def _set_blocks(self, blocks: dict[int, Block]) -> None:
        ids = sorted(blocks)
        if ids and ids != list(range(ids[0], ids[-1] + 1)):
            raise ValueError(f"a slice must hold contiguous blocks, got {ids}")
        self.blocks = nn.ModuleDict({str(i): blocks[i] for i in ids})
        self.block_range = (ids[0], ids[-1] + 1) if ids else (self.block_range[0], self.block_range[0])

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def new_stream_cache(self, cache_cfg) -> StreamCache:
        """Empty caches for one stream on this slice's blocks."""
        from workers.cache import StreamCache

        return StreamCache(cache_cfg, self.block_ids, self.cfg.head_dim)

    # ----------------------------------------------------------------------------------------------
    # embeddings and head (first and last slice)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Text encoder output [..., L, text_dim] -> [..., L, dim]."""
        return self.text_embedding(context.to(self.dtype))

    def embed_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [F, C, H, W] -> tokens [F, T, dim], T = (H/2)(W/2) row-major."""
        x = self.patch_embedding(latents.to(self.dtype).transpose(0, 1)[None])  # [1, dim, F, H/2, W/2]
        # contiguous: a permuted view would be the residual stream's layout through every block of the slice
        # (elementwise ops keep their input's strides), so each norm copies it and each add strides by F*T
        return x[0].flatten(2).permute(1, 2, 0).contiguous()  # [F, T, dim]

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame timesteps [F] -> (e_time [F, dim], e0 [F, 6, dim]).

        On CPU without autograd, each timestep's rows are computed once (alone, so they do not depend on the
        batch) and kept: a stream's chunks repeat the sampler's few steps, and reading the [dim, 6 dim]
        projection for a handful of rows was ~1 ms of a ``small`` first stage's forward on 2 CPUs. Dropped when
        these weights change. On GPU the embedding is a few small kernels inside the stage's CUDA graph, and
        reading ``t`` back to key the rows would synchronise."""
        if t.device.type != "cpu" or torch.is_grad_enabled():
            return self._embed_time(t)
        params = [*self.time_embedding.parameters(), *self.time_projection.parameters()]
        version = tuple((p.data_ptr(), p.dtype, p._version) for p in params)
        if version != self._time_version or len(self._time_rows) >= TIME_ROWS_KEPT:
            self._time_rows, self._time_version = {}, version
        values = t.tolist()
        for v in dict.fromkeys(values):
            if v not in self._time_rows:
                e_time, e0 = self._embed_time(torch.tensor([v], dtype=t.dtype))
                self._time_rows[v] = (e_time[0], e0[0])
        rows = [self._time_rows[v] for v in values]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def _embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e_time = self.time_embedding(sinusoidal_embedding(t, self.cfg.freq_dim).to(self.dtype))
        e0 = self.time_projection(e_time).unflatten(1, (6, self.cfg.dim))
        return e_time, e0

    def apply_head(self, h: torch.Tensor, e_time: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Hidden [F, T, dim] -> flow [F, C_out, H, W] (unpatchify with channel fastest in the head output)."""
        shift, scale = (self.head.modulation + e_time[:, None]).unbind(1)  # [F, dim] each
        out = self.head.head(ops.norm_modulate(h, shift, scale, self.cfg.eps, self.cfg.kernel_backend))
        f = h.shape[0]
        _, ph, pw = self.cfg.patch_size
        out = out.view(f, grid[0], grid[1], ph, pw, self.cfg.out_channels)  # [F, h, w, ph, pw, C]
        return out.permute(0, 5, 1, 3, 2, 4).reshape(f, self.cfg.out_channels, grid[0] * ph, grid[1] * pw)

    # ----------------------------------------------------------------------------------------------
    # forwards

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                frames_per_block: int | None = None) -> torch.Tensor:
        """Full-sequence forward. x [B, C, F, H, W], t [B, F], context [B, L, text_dim] -> flow [B, C, F, H, W].

        Bidirectional unless ``frames_per_block`` is set: then block-causal (bidirectional inside a block
        of that many frames, causal across blocks), positions absolute from 0.
        """
        b, c, f, hh, ww = x.shape
        grid = (hh // self.cfg.patch_size[1], ww // self.cfg.patch_size[2])
        ctx = self.embed_text(context)
        segments = [Segment(frames=f, context=ctx[i], block_frames=frames_per_block) for i in range(b)]
        flow = self.stream_forward(x.transpose(1, 2).reshape(b * f, c, hh, ww), segments, grid, t.reshape(-1))
        return flow.view(b, f, -1, hh, ww).transpose(1, 2)

    def stream_forward(self, inputs: torch.Tensor | Activation, segments: list[Segment],
                       grid: tuple[int, int], t: torch.Tensor | None = None,
                       block_times: dict[int, float] | None = None) -> torch.Tensor | Activation:
        """Run this slice over one forward's segments.

        inputs: latents [F, C, H, W] with per-frame timesteps ``t`` [F] (first slice), or the previous
        slice's Activation. Returns flow [F, C, H, W] if this slice has the head, else an Activation.
        Caches of segments that commit frames are updated in every block of this slice.
        ``block_times``, when given, receives each block's wall time in seconds (synchronised on CUDA).
        """
        if isinstance(inputs, Activation):
            act = inputs
        else:
            if not self.with_embed:
                raise ValueError("this slice has no embeddings: pass the previous slice's Activation")
            e_time, e0 = self.embed_time(t)
            act = Activation(self.embed_latents(inputs), e_time, e0)
        if sum(s.frames for s in segments) != act.hidden.shape[0]:
            raise ValueError(f"segments cover {sum(s.frames for s in segments)} frames, "
                             f"inputs hold {act.hidden.shape[0]}")
        h = self.run_blocks(act.hidden, act.e0, segments, grid, block_times)
        if self.with_head:
            return self.apply_head(h, act.e_time, grid)
        return Activation(h, act.e_time, act.e0)

    def run_blocks(self, h: torch.Tensor, e0: torch.Tensor, segments: list[Segment],
                   grid: tuple[int, int], block_times: dict[int, float] | None = None) -> torch.Tensor:
        """h [F, T, dim], e0 [F, 6, dim] -> h after this slice's blocks."""
        cos, sin = self._segment_rope(segments, grid, h.device)
        for block_id, block in zip(self.block_ids, self.blocks.values()):
            start = _now(h.device) if block_times is not None else 0.0
            h = self._block(block_id, block, h, e0, segments, cos, sin)
            if block_times is not None:
                block_times[block_id] = _now(h.device) - start
        return h

    # ----------------------------------------------------------------------------------------------

    def _segment_rope(self, segments: list[Segment], grid: tuple[int, int],
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [F, T, head_dim/2]: each segment's frames continue after its committed cache."""
        positions: list[int] = []
        for seg in segments:
            start = seg.cache.frames if seg.cache is not None else 0
            if seg.offsets is None:
                positions += range(start, start + seg.frames)
                continue
            bf = seg.block_frames or seg.frames
            if not seg.independent or len(seg.offsets) * bf != seg.frames:
                raise ValueError("block offsets need an independent segment with one offset per block")
            for o in seg.offsets:
                positions += range(start + o, start + o + bf)
        if max(positions) >= self.cfg.rope_max_positions:
            raise ValueError(f"temporal position {max(positions)} exceeds rope_max_positions "
                             f"({self.cfg.rope_max_positions}); use a smaller cache or chunk")
        return self.rope(tuple(positions), grid, device)

    def _block(self, block_id: int, blk: Block, h: torch.Tensor, e0: torch.Tensor,
               segments: list[Segment], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        eps, backend = self.cfg.eps, self.cfg.kernel_backend
        shift1, scale1, gate1, shift2, scale2, gate2 = (blk.modulation + e0).unbind(1)  # [F, dim] each
        y = self._self_attention(block_id, blk, ops.norm_modulate(h, shift1, scale1, eps, backend),
                                 segments, cos, sin)
        # residual + the affine cross-attention pre-norm in one pass: LN(h) * w + b = LN(h) * (1 + (w - 1)) + b
        f = h.shape[0]
        h, x_cross = ops.gated_residual_norm_modulate(h, y, gate1, blk.norm3.bias.expand(f, -1),
                                                      (blk.norm3.weight - 1).expand(f, -1), eps, backend)
        h = h + self._cross_attention(block_id, blk, x_cross, segments)
        y = blk.ffn(ops.norm_modulate(h, shift2, scale2, eps, backend))
        return ops.gated_residual(h, y, gate2, backend)

    def _self_attention(self, block_id: int, blk: Block, x: torch.Tensor, segments: list[Segment],
                        cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        attn, nh = blk.self_attn, self.cfg.num_heads
        q, k = ops.qk_norm_rope(attn.q(x), attn.k(x), attn.norm_q.weight, attn.norm_k.weight, cos, sin,
                                self.cfg.eps, self.cfg.kernel_backend)  # [F, T, dim] each
        v = attn.v(x)
        out, f0 = [], 0
        for seg in segments:
            f1 = f0 + seg.frames
            if seg.cache is not None:
                kv = seg.cache.kv[block_id]
                n = kv.frames
                keys, values = kv.stage(k[f0:f1], v[f0:f1])  # [n + Fs, T, dim]
            else:
                kv, n = None, 0
                keys, values = k[f0:f1], v[f0:f1]
            step = seg.block_frames or seg.frames
            for qb in range(0, seg.frames, step):  # query block qb sees the cache and own frames < qb+step
                qe = min(qb + step, seg.frames)
                if seg.independent and qb > seg.commit_frames:  # the cache, the context block, this block
                    seen = n + seg.commit_frames
                    k_blk = torch.cat((keys[:seen], keys[n + qb:n + qe]))
                    v_blk = torch.cat((values[:seen], values[n + qb:n + qe]))
                else:
                    k_blk, v_blk = keys[:n + qe], values[:n + qe]
                out.append(_attend(q[f0 + qb:f0 + qe], k_blk, v_blk, nh))
            if kv is not None and seg.commit_frames:
                kv.commit(seg.commit_frames)
            f0 = f1
        return attn.o(torch.cat(out))

    def _cross_attention(self, block_id: int, blk: Block, x: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        attn, nh = blk.cross_attn, self.cfg.num_heads
        q = attn.norm_q(attn.q(x))  # [F, T, dim]
        out, f0 = [], 0
        for seg in segments:
            f1 = f0 + seg.frames
            k, v = self._context_kv(block_id, attn, seg)  # [L, dim]
            out.append(_attend(q[f0:f1], k[None], v[None], nh))
            f0 = f1
        return attn.o(torch.cat(out))

    def _context_kv(self, block_id: int, attn: Attention, seg: Segment) -> tuple[torch.Tensor, torch.Tensor]:
        cache = seg.cache
        if cache is not None and block_id in cache.xattn:
            return cache.xattn[block_id]
        ctx = cache.context if cache is not None else seg.context
        if ctx is None:
            raise ValueError("segment has no text context: call StreamCache.set_context first")
        kv = (attn.norm_k(attn.k(ctx)), attn.v(ctx))
        if cache is not None:
            cache.xattn[block_id] = kv
        return kv


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """q [Fq, T, C], k/v [Fk, Tk, C] (all keys visible) -> [Fq, T, C]."""
    fq, t, c = q.shape
    d = c // heads
    qh = q.reshape(1, fq * t, heads, d).transpose(1, 2)  # [1, H, Lq, D]
    kh = k.reshape(1, -1, heads, d).transpose(1, 2)  # [1, H, Lk, D]
    vh = v.reshape(1, -1, heads, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(qh, kh, vh)  # [1, H, Lq, D]
    return o.transpose(1, 2).reshape(fq, t, c)
