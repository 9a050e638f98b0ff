"""CUDA graphs of a stage's DiT forward: captured per forward layout, replayed when it comes again.

A 1.3B block launches a few dozen kernels for well under a millisecond of math each, so a forward is bound
by the host launching them (bench/results/h200-2026-11-26). A graph replays the whole slice in one launch.

What a captured forward depends on makes up its key: the shapes, each stream's cache state (committed
frames, whose Python value picks the slots written, and the buffers' addresses), its text context version
(cross-attention K/V are cached tensors) and the slice's blocks. Python-side effects of a forward (a
cache commit's frame count) happen at capture; a key is graphed only where they leave the Python state as
they found it (a full rolling cache, sink or none policy), so a replay, which runs no Python, is exact.
A layout is run eagerly the first time it is seen (that also fills the RoPE and timestep tables the graph
reads), captured the second time, replayed after. Nothing of this runs on CPU (``cuda_graphs`` auto).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from workers.model.dit import Activation, Segment

MAX_GRAPHS = 32
"""Graphs kept per stage (LRU); they share one memory pool."""


def graph_key(segments: list[Segment], stream_ids: list[str], inputs, block_range: tuple[int, int]) -> tuple | None:
    """The key a forward is captured under, or None when it must run eagerly (its Python state moves)."""
    parts = []
    for sid, seg in zip(stream_ids, segments):
        cache = seg.cache
        if cache is None or cache.cfg.policy == "ema_sink":  # ema_sink moves its slot counter every commit
            return None
        kv = next(iter(cache.kv.values()), None)
        if kv is None or kv.k is None or kv.k.shape[0] < kv.capacity + seg.frames:  # its buffers would grow
            return None
        full = kv.frames == kv.capacity
        if seg.commit_frames and not full:  # the commit raises the frame count: next forward's layout differs
            return None
        parts.append((sid, seg.frames, seg.block_frames, seg.commit_frames, seg.independent, seg.offsets,
                      kv.frames, kv.k.data_ptr(), cache.context_version))
    shapes = tuple(t.shape for t in inputs) if isinstance(inputs, Activation) else (inputs.shape,)
    return tuple(parts), shapes, block_range


class ForwardGraphs:
    """One stage's captured forwards, by key (LRU)."""

    def __init__(self, device: torch.device, enabled: bool, max_graphs: int = MAX_GRAPHS):
        self.enabled = enabled and device.type == "cuda"
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (graph, static inputs, static output)
        self._seen: set[tuple] = set()
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self.captures = self.replays = 0

    def run(self, key: tuple | None, forward: Callable, inputs, t: torch.Tensor | None):
        """``forward(inputs, t)`` eagerly, or through the graph of ``key``."""
        if not self.enabled or key is None:
            return forward(inputs, t)
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:  # first sight: eager (warms the tables and the allocator)
                self._seen.add(key)
                return forward(inputs, t)
            entry = self._capture(key, forward, inputs, t)
        else:
            self._graphs.move_to_end(key)
            static_in, static_t = entry[1]
            for dst, src in zip(_flat(static_in), _flat(inputs)):
                dst.copy_(src)
            if static_t is not None:
                static_t.copy_(t)
        entry[0].replay()
        self.replays += 1
        return _clone(entry[2])

    def _capture(self, key: tuple, forward: Callable, inputs, t) -> tuple:
        static_in = _clone(inputs)
        static_t = None if t is None else t.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.current_stream().synchronize()
        # thread_local: decode workers run on their own threads (workers/decode.py) and may allocate or sync while
        # this thread captures; the default "global" mode let them invalidate the capture (H200, 2026-12-04:
        # DiT + wan decode, and the service, failed with cudaErrorStreamCaptureInvalidated)
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = forward(static_in, static_t)  # the forward's Python effects happen here, once
        entry = (graph, (static_in, static_t), static_out)
        self._graphs[key] = entry
        self.captures += 1
        if len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return entry

    def drop_stream(self, stream_id: str) -> None:
        """The stream's caches are going away: graphs that write them must never replay again."""
        for key in [k for k in self._graphs if any(p[0] == stream_id for p in k[0])]:
            del self._graphs[key]
        self._seen = {k for k in self._seen if not any(p[0] == stream_id for p in k[0])}

    def clear(self) -> None:
        """The slice's blocks changed (a rebalance): every graph baked in the old weights."""
        self._graphs.clear()
        self._seen.clear()


def _flat(x) -> list[torch.Tensor]:
    return list(x) if isinstance(x, Activation) else [x]


def _clone(x):
    return Activation(*(v.clone() for v in x)) if isinstance(x, Activation) else x.clone()
