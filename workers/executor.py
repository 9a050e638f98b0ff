"""Executors run micro-batches through a pipeline's stages. One contract, two implementations:

* ``InProcessExecutor``: every stage in this process, no communication (tests, the Ray-free backend);
* ``RayExecutor`` (``workers.ray_executor``): one Ray actor per stage, activations over torch.distributed.

Both close the denoising ring without the driver: the last stage's next-step latents go straight to stage 0
(``workers.denoise``); the driver gets back only the clean latents of the chunks a micro-batch finished.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

import torch

from workers.config import CacheConfig, GenerationConfig, ModelConfig, ParallelConfig
from workers import denoise
from workers.batch import Finished, MicroBatch, StageStats
from workers.plan import even_split
from workers.stage import StageWorker


class StageFailure(RuntimeError):
    """A stage died or stopped answering; every micro-batch in flight is lost."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"stage {kind}: {detail}")
        self.kind = kind  # "died" | "timeout"


class Executor(ABC):
    """Runs micro-batches through P stages, in submission order."""

    num_stages: int

    @abstractmethod
    def submit(self, mb: MicroBatch) -> None:
        """Start ``mb`` on stage 0; it flows through every stage, and the last stage sends the latents of
        its unfinished entries back to stage 0. Called with at most P in flight, in issue order: a work
        whose latents come from an earlier micro-batch's ring may be submitted before that one completes."""

    @abstractmethod
    def collect(self, wait: bool) -> list[Finished]:
        """Completed micro-batches in submission order: the clean latents of the chunks each finished (CPU)
        and per-stage stats. With ``wait`` block until at least one is done (if any is in flight)."""

    @abstractmethod
    def open_stream(self, stream_id: str, cache_cfg: CacheConfig) -> None:
        """Create the stream's caches on every stage."""

    @abstractmethod
    def close_stream(self, stream_id: str) -> list[int]:
        """Free the stream's caches on every stage; bytes released per stage."""

    @abstractmethod
    def cache_bytes(self) -> list[int]:
        """Cache bytes held per stage."""

    @abstractmethod
    def split(self) -> list[tuple[int, int]]:
        """Current block range per stage."""

    @abstractmethod
    def rebalance(self, split: list[tuple[int, int]]) -> None:
        """Move blocks (weights and every stream's KV caches) to match ``split``. Call with nothing in flight."""

    @abstractmethod
    def profile(self, grid: tuple[int, int], frames: int, cache_cfg: CacheConfig) -> list[StageStats]:
        """Per-stage block timings on random inputs of one chunk (the block scheduler's start-up costs)."""

    def shutdown(self) -> None:
        """Release processes and resources."""

    def kill(self) -> None:
        """Release at once, without asking stages to finish (they may be dead or hung)."""
        self.shutdown()


def moves(old: list[tuple[int, int]], new: list[tuple[int, int]]) -> list[tuple[int, int, list[int]]]:
    """Hand-overs (from stage, to stage, block ids) between neighbours that turn split ``old`` into ``new``.

    Boundaries move one block at a time, so every slice stays contiguous after every hop (a slice may be
    empty in between). Consecutive hops of the same pair are merged.
    """
    if len(old) != len(new) or old[0][0] != new[0][0] or old[-1][1] != new[-1][1]:
        raise ValueError(f"splits {old} and {new} do not cover the same blocks with the same stages")
    if any(a >= b for a, b in new) or any(new[i][1] != new[i + 1][0] for i in range(len(new) - 1)):
        raise ValueError(f"split {new} must be contiguous with a block on every stage")
    bounds = [b for _, b in old[:-1]]  # bounds[s]: first block of stage s + 1
    target = [b for _, b in new[:-1]]
    lo, hi = old[0][0], old[-1][1]
    hops: list[tuple[int, int, list[int]]] = []
    while bounds != target:
        for s in range(len(bounds)):
            left = bounds[s - 1] if s > 0 else lo
            right = bounds[s + 1] if s + 1 < len(bounds) else hi
            if bounds[s] > target[s] and bounds[s] > left:  # last block of stage s goes to s + 1
                bounds[s] -= 1
                hop = (s, s + 1, bounds[s])
            elif bounds[s] < target[s] and bounds[s] < right:  # first block of stage s + 1 goes to s
                hop = (s + 1, s, bounds[s])
                bounds[s] += 1
            else:
                continue
            if hops and hops[-1][:2] == hop[:2]:
                hops[-1][2].append(hop[2])
            else:
                hops.append((hop[0], hop[1], [hop[2]]))
    return hops


class InProcessExecutor(Executor):
    """All stages in one process, run back to back when a micro-batch is submitted."""

    def __init__(self, model_cfg: ModelConfig, num_stages: int = 1, split: list[tuple[int, int]] | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, weights_path: str = "",
                 use_ema: bool = False):
        split = split or even_split(model_cfg.num_layers, num_stages)
        if len(split) != num_stages:
            raise ValueError(f"split has {len(split)} ranges for {num_stages} stages")
        self.num_stages = num_stages
        self.stages = [StageWorker(model_cfg, rng, i, num_stages, device, dtype, weights_path, use_ema)
                       for i, rng in enumerate(split)]
        self._done: deque[Finished] = deque()

    def submit(self, mb: MicroBatch) -> None:
        first = self.stages[0]
        latents, t = first.first_inputs(mb)  # a ring entry is always there: earlier work ran to the end
        act, contexts, stats = latents, None, []
        for stage in self.stages:
            act, contexts, st = stage.forward(mb, act, contexts, t)
            stats.append(st)
        ring, finished = denoise.advance(mb, latents, act)
        if ring is not None:
            first.store.put(mb, ring)
            if self.num_stages > 1:
                stats[-1].bytes_sent = ring.nbytes
        self._done.append(Finished(mb.seq, [[(c, x.cpu()) for c, x in seg] for seg in finished], stats))

    def collect(self, wait: bool) -> list[Finished]:
        out = list(self._done)
        self._done.clear()
        return out

    def open_stream(self, stream_id: str, cache_cfg: CacheConfig) -> None:
        for stage in self.stages:
            stage.open_stream(stream_id, cache_cfg)

    def close_stream(self, stream_id: str) -> list[int]:
        return [stage.close_stream(stream_id) for stage in self.stages]

    def cache_bytes(self) -> list[int]:
        return [stage.cache_bytes() for stage in self.stages]

    def split(self) -> list[tuple[int, int]]:
        return [stage.block_range for stage in self.stages]

    def profile(self, grid: tuple[int, int], frames: int, cache_cfg: CacheConfig) -> list[StageStats]:
        return [stage.profile(grid, frames, cache_cfg) for stage in self.stages]

    def rebalance(self, split: list[tuple[int, int]]) -> None:
        for src, dst, blocks in moves(self.split(), split):
            self.stages[dst].adopt_blocks(*self.stages[src].release_blocks(blocks))


def build_executor(gen: GenerationConfig, parallel: ParallelConfig, split: list[tuple[int, int]] | None = None,
                   placement_group=None, first_bundle: int = 0) -> Executor:
    """The one place an executor is made from config (engine core, benchmarks, tests): the layout, device and
    dtype from ``parallel``, the weights (``use_ema`` included) from ``gen``. ``placement_group`` /
    ``first_bundle``: stage slots reserved by the caller (a Serve replica's bundles)."""
    device = parallel.stage_device(torch.cuda.is_available())
    dtype = getattr(torch, parallel.dtype)
    if parallel.executor == "ray":
        from workers.ray_executor import RayExecutor

        return RayExecutor(gen.model, parallel.stages, split, threads_per_stage=parallel.threads_per_stage,
                           num_cpus_per_stage=parallel.cpus_per_stage, num_gpus_per_stage=parallel.gpus_per_stage,
                           device=device, weights_path=gen.model_path, call_timeout_s=parallel.stage_call_timeout_s,
                           placement_timeout_s=parallel.placement_timeout_s, placement_group=placement_group,
                           first_bundle=first_bundle, dtype=dtype, use_ema=gen.use_ema)
    return InProcessExecutor(gen.model, parallel.stages, split, device, dtype, gen.model_path, gen.use_ema)

