"""Per-stream caches: the rolling self-attention KV cache of each block and the cross-attention cache.

Layout of one block's buffer (frames, tokens per frame T, channels C = heads * head_dim):

    [ sink (S frames) | window (W frames) | staging (frames of the forward in progress) ]
      positions 0..S-1   S..S+W-1            n..n+Fs-1, where n = committed frames (<= S+W)

Keys are stored RMS-normed and rotated at their slot's temporal position, so a chunk simply attends
to ``buf[:n + Fs]``. Positions never exceed S + W + in-flight frames: when the window slides by E
frames, the surviving window keys are re-rotated by -E once per commit (not once per forward). Until
the first eviction every frame sits at its absolute index, so streaming equals the full-sequence
block-causal forward exactly.
"""

from __future__ import annotations

from typing import Iterable

import torch

from streamgen_kernels.reference import rope
from workers.config import CacheConfig, ModelConfig
from workers.model.rope import temporal_shift_tables


class BlockKVCache:
    """One block's K/V for one stream: a pinned sink plus a rolling window, fixed memory."""

    def __init__(self, cfg: CacheConfig, head_dim: int):
        self.cfg = cfg
        self.head_dim = head_dim
        self.sink = cfg.pinned_frames
        self.capacity = cfg.capacity_frames
        self.k: torch.Tensor | None = None  # [capacity + staging, T, C]
        self.v: torch.Tensor | None = None
        self.frames = 0  # committed frames, <= capacity
        self._ema_slot = 0  # next sink slot an evicted frame is blended into (ema_sink)

    def stage(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Place this forward's K/V [Fs, T, C] after the committed frames.

        Returns (keys, values) views [n + Fs, T, C]: everything this forward's queries may attend to.
        """
        n, fs = self.frames, k.shape[0]
        self._reserve(fs, k)
        self.k[n:n + fs] = k
        self.v[n:n + fs] = v
        return self.k[:n + fs], self.v[:n + fs]

    def commit(self, count: int) -> None:
        """Make the first ``count`` staged frames part of the cache, evicting the oldest window frames."""
        if count <= 0:
            return
        total = self.frames + count
        evict = total - self.capacity
        if evict > 0:
            s = self.sink
            if self.cfg.policy == "ema_sink":
                self._blend_into_sink(evict)
            # window + new frames [s+E, total) slide to [s, capacity); positions move by -E.
            cos, sin = temporal_shift_tables(-evict, self.head_dim, self.k.device)
            self.k[s:self.capacity] = rope(self.k[s + evict:total], cos, sin)
            self.v[s:self.capacity] = self.v[s + evict:total].clone()
            total = self.capacity
        self.frames = total

    def reset(self, keep_sink: bool = False) -> None:
        """Forget committed frames (buffers are kept); optionally keep the sink frames."""
        self.frames = min(self.frames, self.sink) if keep_sink else 0
        self._ema_slot = 0

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    def _blend_into_sink(self, evict: int) -> None:
        # Evicted frame j sits at position s + j; sink slot i at position i. Rotation is linear, so
        # rotating the evicted key onto the slot's position and blending equals blending un-rotated keys.
        a = self.cfg.ema_alpha
        for j in range(evict):
            slot = self._ema_slot % self.sink
            cos, sin = temporal_shift_tables(slot - (self.sink + j), self.head_dim, self.k.device)
            ev = self.sink + j
            ek = rope(self.k[ev:ev + 1], cos, sin)
            self.k[slot:slot + 1] = a * self.k[slot:slot + 1] + (1 - a) * ek
            self.v[slot:slot + 1] = a * self.v[slot:slot + 1] + (1 - a) * self.v[ev:ev + 1]
            self._ema_slot += 1

    def _reserve(self, staged: int, like: torch.Tensor) -> None:
        need = self.capacity + staged
        if self.k is not None and self.k.shape[0] >= need and self.k.shape[1:] == like.shape[1:] \
                and self.k.dtype == like.dtype and self.k.device == like.device:
            return
        if self.k is not None and self.k.shape[1:] != like.shape[1:]:
            raise ValueError(f"stream cache holds frames of shape {tuple(self.k.shape[1:])}, "
                             f"got {tuple(like.shape[1:])}")
        k = like.new_zeros((need,) + tuple(like.shape[1:]))
        v = like.new_zeros((need,) + tuple(like.shape[1:]))
        if self.k is not None:  # staging grew (a longer segment): keep what is committed
            k[:self.frames] = self.k[:self.frames]
            v[:self.frames] = self.v[:self.frames]
        self.k, self.v = k, v


class StreamCache:
    """Everything one stream keeps on one model slice: KV per owned block and cross-attention K/V."""

    def __init__(self, cfg: CacheConfig, block_ids: Iterable[int], head_dim: int):
        self.cfg = cfg
        self.kv: dict[int, BlockKVCache] = {i: BlockKVCache(cfg, head_dim) for i in block_ids}
        self.context: torch.Tensor | None = None  # [L, dim] text embedded by the model
        self.context_version = 0  # bumped with each new context (a CUDA graph bakes in its cross-attention K/V)
        self.xattn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block -> (k, v) [L, C]

    @property
    def frames(self) -> int:
        """Committed frames (identical in every block: all blocks commit together)."""
        counts = {c.frames for c in self.kv.values()}
        if len(counts) > 1:
            raise RuntimeError(f"blocks of one stream disagree on cached frames: {sorted(counts)}")
        return counts.pop() if counts else 0

    def set_context(self, context: torch.Tensor) -> None:
        """A new prompt's embedded text [L, dim]: cross-attention K/V are recomputed lazily per block."""
        self.context = context
        self.context_version += 1
        self.xattn.clear()

    def reset(self, keep_sink: bool = False) -> None:
        for c in self.kv.values():
            c.reset(keep_sink)

    def nbytes(self) -> int:
        kv = sum(c.nbytes() for c in self.kv.values())
        xa = sum(k.nbytes + v.nbytes for k, v in self.xattn.values())
        return kv + xa


def kv_bytes_per_frame(cfg: ModelConfig, height: int, width: int, bytes_per_element: int = 2) -> int:
    """Self-attention K+V bytes one latent frame occupies across all blocks (bf16: 2 bytes)."""
    return cfg.num_layers * 2 * cfg.tokens_per_frame(height, width) * cfg.dim * bytes_per_element
