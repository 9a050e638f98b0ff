"""Executors run micro-batches through a pipeline's stages. One contract, two implementations:

* ``InProcessExecutor``: every stage in this process, no communication (tests, the Ray-free ``local``
  backend); decode workers on their own threads;
* ``RayExecutor`` (``workers.ray_executor``): one Ray actor per stage and per decode worker, tensors over
  torch.distributed.

Both close the denoising ring without the driver: the last stage's next-step latents go straight to stage 0
(``workers.denoise``) and finished chunks' latents to the decode workers (``workers.decode``); the driver
gets back the clean latents of the chunks a micro-batch finished (kept for re-cache) and encoded frames.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

import torch

from workers.config import CacheConfig, GenerationConfig, ParallelConfig
from workers import denoise
from workers.batch import Collected, DecodeJob, Finished, MicroBatch, OutputFormat, StageStats
from workers.decode import DecodePool, DecodeRouter, DecodeWorker
from workers import devicemap
from workers.devicemap import DeviceMap, local_slots
from workers.model.dit import Activation
from workers.plan import even_split
from workers.stage import StageWorker


class StageFailure(RuntimeError):
    """A stage died or stopped answering; every micro-batch in flight is lost."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"stage {kind}: {detail}")
        self.kind = kind  # "died" | "timeout"


class Executor(ABC):
    """Runs micro-batches through P stages, in submission order, and hands finished chunks to its decode
    workers (``decode_workers`` of them; 0: latents only)."""

    num_stages: int
    decode_workers: int = 0
    decode_shared: bool = True
    """Decode workers share the last stage's device (its time counts in the last stage's tick)."""

    @property
    def max_inflight(self) -> int:
        """Micro-batches the engine may have submitted and not collected: one per stage."""
        return self.num_stages

    @abstractmethod
    def submit(self, mb: MicroBatch) -> None:
        """Start ``mb`` on stage 0 (by the next ``flush``); it flows through every stage, and the last stage
        sends the latents of its unfinished entries back to stage 0 and those of its finished chunks to the
        streams' decode workers. Called with at most ``max_inflight`` in flight, in issue order: a work whose
        latents come from an earlier micro-batch's ring may be submitted before that one completes."""

    def flush(self) -> None:
        """Start what ``submit`` was given since the last flush (the engine flushes once per step, after its
        dispatches). An executor may hold submitted micro-batches until then to send several in one call."""

    @abstractmethod
    def collect(self, wait: bool) -> Collected:
        """Completed micro-batches in submission order (the clean latents of the chunks each finished, on the
        CPU, and per-stage stats), and the chunks decoded since the last call (in order per stream). With
        ``wait`` block until at least one of either is there (if any is outstanding)."""

    @property
    @abstractmethod
    def decoding(self) -> int:
        """Chunks handed to decode workers and not yet collected."""

    @abstractmethod
    def open_stream(self, stream_id: str, cache_cfg: CacheConfig, output: OutputFormat | None = None,
                    warm: list[torch.Tensor] = (), video: bool = False) -> None:
        """Create the stream's caches on every stage, its VAE encoder state on stage 0 (``video``) and its
        decoder state on a decode worker, warmed on ``warm`` (recent clean latents [f, C, h, w], oldest first:
        a restored or rebuilt stream)."""

    @abstractmethod
    def close_stream(self, stream_id: str) -> list[int]:
        """Free the stream's caches on every stage (and its decoder state); bytes released per stage."""

    @abstractmethod
    def redecode(self, stream_id: str, chunk: int, latents: torch.Tensor) -> None:
        """Decode a finished chunk from latents the driver sends (a rebuild lost its decode in flight)."""

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
    def profile(self, grid: tuple[int, int], frames: int, cache_cfg: CacheConfig,
                repeats: int = 1, streams: int = 1) -> list[StageStats]:
        """Per-stage block timings on random inputs of one chunk of each of ``streams`` streams in one micro-batch
        (the block scheduler's start-up costs): the fastest of ``repeats`` timed forwards, since interference
        only ever adds time."""

    @abstractmethod
    def profile_decode(self, latent_shape: tuple[int, int, int], frames: int, repeats: int = 1) -> float | None:
        """Seconds one decode worker takes to decode and encode a chunk, the fastest of ``repeats`` (None without
        decode workers)."""

    def free_memory(self) -> list[int | None]:
        """Free device bytes per GPU slot after loading (None: a CPU slot, not bounded)."""
        return [None] * self.num_stages

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
    """All stages in this process, run back to back when a micro-batch is submitted (each on its slot's
    device); decode workers on their own threads (and CUDA streams), so decode overlaps the DiT."""

    def __init__(self, gen: GenerationConfig, parallel: ParallelConfig, split: list[tuple[int, int]] | None = None):
        split = split or even_split(gen.model.num_layers, parallel.stages)
        if len(split) != parallel.stages:
            raise ValueError(f"split has {len(split)} ranges for {parallel.stages} stages")
        self.num_stages = parallel.stages
        torch.set_num_threads(parallel.threads_per_stage)  # this process runs every stage (oversubscribed OMP spins)
        devices = local_slots(parallel, torch.cuda.device_count())
        dtype = getattr(torch, parallel.dtype)
        graphs = parallel.cuda_graphs == "auto"
        self.stages = [StageWorker(gen, rng, i, self.num_stages, devices[i], dtype, graphs) for i, rng in enumerate(split)]
        # CUDA: forwards are queued on the device without waiting for them (timed with events), one more than
        # the stages, so the host prepares the next while the device runs this one
        self.queued = devices[0].startswith("cuda")
        for stage in self.stages:
            stage.sync = not self.queued
        self.decode_workers = parallel.decode_workers
        self.decode_shared = parallel.decode == "shared"
        decode_slots = [self.num_stages - 1 if self.decode_shared else self.num_stages + w
                        for w in range(self.decode_workers)]
        self.pool = DecodePool([DecodeWorker(gen, devices[slot], dtype, w) for w, slot in enumerate(decode_slots)]) \
            if self.decode_workers else None
        self.router = DecodeRouter(self.decode_workers)
        self._done: deque[tuple[Finished, list]] = deque()  # with each stage's (stats, start, end) events

    @property
    def max_inflight(self) -> int:
        return self.num_stages + int(self.queued)

    def submit(self, mb: MicroBatch) -> None:
        first, last = self.stages[0], self.stages[-1]
        latents, t, encoded = first.first_inputs(mb)  # a ring entry is always there: earlier work ran to the end
        act, contexts, stats, timings = latents, None, [], []
        for stage in self.stages:
            stage.last_events = None
            act, contexts, st = stage.forward(mb, _to(act, stage.device), _to(contexts, stage.device), t)
            stats.append(st)
            if stage.last_events is not None:
                timings.append((st, *stage.last_events))
        ring, finished = denoise.advance(mb, latents.to(last.device), act)
        if ring is not None:
            first.store.put(mb, ring.to(first.device))
            if self.num_stages > 1:
                stats[-1].bytes_sent = ring.nbytes
        if self.pool is not None:
            for work, done in zip(mb.segments, finished):
                for chunk, x0 in done:
                    self.pool.submit(self.router.assign(work.stream_id), DecodeJob(work.stream_id, chunk, x0.shape[0]),
                                     x0)
        # queued on CUDA the clean latents stay there (history for re-cache): a copy out would wait for the device
        chunks = [[(c, x if self.queued else x.cpu()) for c, x in seg] for seg in finished]
        self._done.append((Finished(mb.seq, chunks, stats, encoded), timings))

    def collect(self, wait: bool) -> Collected:
        # decoded frames already in do not wait for the device to finish the next micro-batch
        decoded = self.pool.collect(False) if self.pool is not None else []
        finished = []
        while self._done:
            done, timings = self._done[0]
            if timings and not timings[-1][2].query():  # still running on the device
                if not wait or finished or decoded:
                    break
                timings[-1][2].synchronize()
            for st, start, end in timings:  # the device's forward time, plus the encode timed on the host
                st.compute_s = start.elapsed_time(end) / 1000 + st.encode_s
            finished.append(self._done.popleft()[0])
        if self.pool is not None:
            decoded += self.pool.collect(wait and not finished and not decoded)
        return Collected(finished, decoded)

    @property
    def decoding(self) -> int:
        return self.pool.pending if self.pool is not None else 0

    def open_stream(self, stream_id: str, cache_cfg: CacheConfig, output: OutputFormat | None = None,
                    warm: list[torch.Tensor] = (), video: bool = False) -> None:
        for stage in self.stages:
            stage.open_stream(stream_id, cache_cfg, video)
        if self.pool is not None:
            self.pool.open_stream(self.router.assign(stream_id), stream_id, output or OutputFormat(), list(warm))

    def close_stream(self, stream_id: str) -> list[int]:
        if self.pool is not None and stream_id in self.router.routes([stream_id]):
            self.pool.close_stream(self.router.assign(stream_id), stream_id)
        self.router.release(stream_id)
        return [stage.close_stream(stream_id) for stage in self.stages]

    def redecode(self, stream_id: str, chunk: int, latents: torch.Tensor) -> None:
        if self.pool is not None:
            self.pool.submit(self.router.assign(stream_id), DecodeJob(stream_id, chunk, latents.shape[0]), latents)

    def cache_bytes(self) -> list[int]:
        return [stage.cache_bytes() for stage in self.stages]

    def split(self) -> list[tuple[int, int]]:
        return [stage.block_range for stage in self.stages]

    def profile(self, grid: tuple[int, int], frames: int, cache_cfg: CacheConfig,
                repeats: int = 1, streams: int = 1) -> list[StageStats]:
        return [stage.profile(grid, frames, cache_cfg, repeats, streams) for stage in self.stages]

    def profile_decode(self, latent_shape: tuple[int, int, int], frames: int, repeats: int = 1) -> float | None:
        return self.pool.profile(latent_shape, frames, repeats) if self.pool is not None else None

    def free_memory(self) -> list[int | None]:
        devices = [s.device for s in self.stages] + ([w.device for w in self.pool.workers]
                                                     if self.pool is not None and not self.decode_shared else [])
        return [torch.cuda.mem_get_info(d)[0] if d.type == "cuda" else None for d in devices]

    def rebalance(self, split: list[tuple[int, int]]) -> None:
        for src, dst, blocks in moves(self.split(), split):
            self.stages[dst].adopt_blocks(*self.stages[src].release_blocks(blocks))

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _to(x, device: torch.device):
    """An Activation, a contexts dict or a tensor on ``device`` (stages of one process may sit on several)."""
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    if isinstance(x, Activation):
        return Activation(*(v.to(device) for v in x))
    return x.to(device)


def replica_device_map(gen: GenerationConfig, parallel: ParallelConfig,
                       split: list[tuple[int, int]] | None = None) -> DeviceMap:
    """The device map of one replica as this process sees it: the local backend places slots on its own GPUs
    (and knows their memory); over Ray a slot is a placement-group bundle, whose memory is known only from
    ``parallel.gpu_memory_gib`` (each stage also reports what it has free once loaded)."""
    if parallel.backend == "local":
        count = torch.cuda.device_count()
        devices = local_slots(parallel, count)
        capacity = [torch.cuda.get_device_properties(d).total_memory if d.startswith("cuda") else None
                    for d in devices]
    else:
        devices, capacity = [f"bundle {i}" for i in range(parallel.gpu_slots)], None
    return devicemap.plan(gen, parallel, split, capacity, devices)


def build_executor(gen: GenerationConfig, parallel: ParallelConfig, split: list[tuple[int, int]] | None = None,
                   placement_group=None, first_bundle: int = 0) -> Executor:
    """The one place an executor is made from config (engine core, benchmarks, tests): the layout, decode
    workers, device and dtype from ``parallel``, the weights (``use_ema`` included) and the text encoder
    and VAE paths from ``gen``. ``placement_group`` / ``first_bundle``: slots reserved by the caller (a Serve
    replica's bundles). Checks the device map first: a piece that cannot fit fails here, naming it."""
    replica_device_map(gen, parallel, split).check()
    if parallel.backend == "ray":
        from workers.ray_executor import RayExecutor

        return RayExecutor(gen, parallel, split, placement_group=placement_group, first_bundle=first_bundle)
    return InProcessExecutor(gen, parallel, split)
