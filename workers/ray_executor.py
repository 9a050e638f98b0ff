"""RayExecutor: one Ray actor per stage and per decode worker; activations hop stage to stage over
torch.distributed (gloo on CPU, NCCL on CUDA), never through Ray's object store, and the ring closes the
same way.

The driver submits every micro-batch to every stage actor at once (P calls a micro-batch, or P calls for
``ParallelConfig.micro_batches_per_call`` of them), plus one call to each decode worker the call finishes
chunks for. Ray runs an actor's tasks from one caller in submission order, and each stage blocks in ``recv``
until its predecessor sends, so stage s works on micro-batch m while stage s+1 works on m-1: the pipeline
fills by itself. The last stage computes x0 and the re-noise, sends the next step's latents to stage 0
(``RING_TAG``) and finished chunks' latents to their decode workers (ranks P.., ``DECODE_TAG``); stage 0
posts the ring receive as soon as it has run the micro-batch and waits on it only when a later forward needs
those latents, and every later stage posts the receive of its next input before it runs a forward
(``workers.stage_link``). Only finished chunks' clean latents, encoded frames and stats come back through Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from workers.config import CacheConfig, GenerationConfig, ParallelConfig
from workers import denoise
from workers.batch import Collected, DecodedChunk, DecodeJob, Finished, MicroBatch, OutputFormat, StageStats
from workers.decode import DecodeRouter, DecodeWorker
from workers.executor import Executor, StageFailure, moves
from workers.host import claim_cores, keep_heap, take_serving_priority
from workers.plan import even_split
from workers.stage import StageWorker
from workers.stage_link import DECODE_TAG, RING_TAG, StageLink


def start_local_ray(num_cpus: int | None = None, num_gpus: float | None = None, resources: dict | None = None):
    """Start a Ray instance on this machine, bound to loopback (tests, the embedded default).

    Never use this to join a real cluster: the loopback switch must not be set there.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # must precede `import ray`: GCS/raylet on 127.0.0.1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    # address="local": always a new instance, whatever RAY_ADDRESS or a `ray start` left in /tmp/ray says
    return ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, resources=resources,
                    include_dashboard=False, configure_logging=False, log_to_driver=False,
                    _node_ip_address="127.0.0.1")


def max_inflight(num_stages: int, per_call: int = 1) -> int:
    """Micro-batches in flight at most, in calls of ``per_call``: enough calls to cover the P stages plus one
    that waits in stage 0's task queue, so stage 0 starts it as soon as it is free instead of after the driver
    hears the oldest call came back and submits the next (P + 1 micro-batches one to a call; 2 calls once a
    call holds P or more)."""
    return per_call * (1 + -(-num_stages // per_call))


def _rendezvous_file() -> str:
    """A FileStore path for one replica's process group. Its stages share a node (STRICT_PACK), so a file
    in /tmp is a rendezvous without a TCP store, whose server would listen on every interface."""
    return f"/tmp/streamgen-pg-{uuid.uuid4().hex}"


log = logging.getLogger("streamgen.ray_executor")
PEER_DEATH_WAIT_S = 1.0
"""How long a stage's error waits for a peer's call to fail as a death (the error's likely cause)."""


class _Peer:
    """What every actor of a replica shares: its torch.distributed endpoint and identity."""

    def _join(self, rank: int, world: int, rendezvous: str, device: torch.device) -> None:
        self.rank, self.world = rank, world
        if world > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a replica's actors share one node
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
            dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world)

    def locate(self) -> tuple[str, int]:
        """(Ray node id, process id) of this actor."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class StageActorBody(_Peer):
    """A stage actor: a StageWorker plus its torch.distributed endpoints (rank = stage)."""

    def __init__(self, gen: GenerationConfig, parallel: ParallelConfig, block_range: tuple[int, int], stage: int,
                 rendezvous: str):
        torch.set_num_threads(parallel.threads_per_stage)
        self.stage, self.num_stages = stage, parallel.stages
        self.device = torch.device(parallel.stage_device(torch.cuda.is_available()))  # what this process sees
        self.cores = claim_cores(parallel.threads_per_stage) if parallel.pin_cores and self.device.type == "cpu" \
            else None  # before the model is built, so its weights are first touched on those cores
        self.heap_kept = self.device.type == "cpu" and keep_heap()  # a CPU forward's transients stay mapped
        dtype, world = getattr(torch, parallel.dtype), parallel.stages + parallel.decode_workers
        self.worker = StageWorker(gen, block_range, stage, self.num_stages, self.device, dtype,
                                  parallel.cuda_graphs == "auto")
        self.link = StageLink(stage, self.num_stages, gen.model, self.device, self.worker.model.dtype,
                              max_inflight(self.num_stages, parallel.micro_batches_per_call))
        self._join(stage, world, rendezvous, self.device)
        self._nice = parallel.serving_nice

    def link_stats(self) -> dict[str, int]:
        return self.link.stats()

    def pinned_cores(self) -> tuple[int, ...] | None:
        return None if self.cores is None else self.cores.cores

    def kept_heap(self) -> bool:
        return self.heap_kept

    def ready(self) -> tuple[int, int]:
        take_serving_priority(self._nice)  # started at Ray's 15; from here on it serves
        return self.worker.block_range

    def free_memory(self) -> int | None:
        return torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None

    def run(self, mbs: list[MicroBatch]) -> list[tuple[int, list | None, StageStats, dict]]:
        """The call's micro-batches through this stage, in order (``_run_one`` each)."""
        return [self._run_one(mb) for mb in mbs]

    def _run_one(self, mb: MicroBatch) -> tuple[int, list | None, StageStats, dict]:
        """One micro-batch through this stage: (seq, finished chunks per segment on the last stage, stats,
        stage 0's encoded video chunks: stream -> (chunk, z))."""
        first, last = self.stage == 0, self.stage == self.num_stages - 1
        self.link.settle(mb.seq)
        encoded, shape = {}, self.worker.latent_shape(mb.grid)
        if first:
            latents, t, encoded = self.worker.first_inputs(mb, wait=self._unpack_ring)
            encoded = {sid: (c, z.cpu()) for sid, (c, z) in encoded.items()}
            inputs, contexts = latents, None
        else:
            inputs, latents, contexts = self.link.recv_activation(mb, shape)
            t = None
        out, contexts, stats = self.worker.forward(mb, inputs, contexts, t)
        if not last:
            if mb.ring_frames():  # before the send: see post_ring
                self.link.post_ring(mb, shape)
            self.link.send_activation(mb, out, latents, contexts)
            return mb.seq, None, stats, encoded
        ring, finished = denoise.advance(mb, latents, out)
        if ring is not None and first:  # P = 1: the ring is this stage's own store
            self.worker.store.put(mb, ring)
        elif ring is not None:
            self.link.send(ring.contiguous(), 0, mb.seq, RING_TAG)
            stats.bytes_sent = ring.nbytes
        for work, done in zip(mb.segments, finished):  # finished chunks to their decode workers
            if work.stream_id in mb.decode_to:
                for _, x0 in done:
                    self.link.send(x0.contiguous(), self.num_stages + mb.decode_to[work.stream_id], mb.seq, DECODE_TAG)
        return mb.seq, [[(c, x.cpu()) for c, x in seg] for seg in finished], stats, encoded

    def _unpack_ring(self) -> bool:
        """Stage 0: wait for the oldest ring message and unpack it into the store; False when none is posted."""
        got = self.link.next_ring()
        if got is not None:
            self.worker.store.put(*got)
        return got is not None

    def shutdown(self) -> None:
        self.link.close()
        if self.cores is not None:
            self.cores.release()
        super().shutdown()

    # streams and rebalance: thin forwards to the worker
    def open_stream(self, stream_id: str, cache_cfg: CacheConfig, video: bool = False) -> None:
        self.worker.open_stream(stream_id, cache_cfg, video)

    def close_stream(self, stream_id: str) -> int:
        return self.worker.close_stream(stream_id)

    def cache_bytes(self) -> int:
        return self.worker.cache_bytes()

    def num_parameters(self) -> int:
        return self.worker.num_parameters()

    def owned_parameter_names(self) -> list[str]:
        return self.worker.owned_parameter_names()

    def profile(self, grid, frames, cache_cfg, repeats: int = 1, streams: int = 1) -> StageStats:
        return self.worker.profile(grid, frames, cache_cfg, repeats, streams)

    def release_blocks(self, ids: list[int]):
        return self.worker.release_blocks(ids)

    def adopt_blocks(self, released) -> tuple[int, int]:
        self.worker.adopt_blocks(*released)  # (blocks, caches) as returned by release_blocks
        return self.worker.block_range


class DecodeActorBody(_Peer):
    """A decode worker actor (rank = stages + its index): receives finished chunks' latents from the last
    stage, decodes and encodes them, and returns bytes."""

    def __init__(self, gen: GenerationConfig, parallel: ParallelConfig, index: int, rendezvous: str):
        torch.set_num_threads(parallel.threads_per_stage)
        self.device = torch.device(parallel.stage_device(torch.cuda.is_available()))
        if self.device.type == "cpu":
            keep_heap()  # a CPU decode's transients stay mapped
        self.worker = DecodeWorker(gen, self.device, getattr(torch, parallel.dtype), index)
        self.num_stages = parallel.stages
        self._join(parallel.stages + index, parallel.stages + parallel.decode_workers, rendezvous, self.device)
        self._nice = parallel.serving_nice

    def ready(self) -> int:
        take_serving_priority(self._nice)
        return self.worker.index

    def free_memory(self) -> int | None:
        return torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None

    def decode(self, jobs: list[DecodeJob], latent_shape: tuple[int, int, int]) -> list[DecodedChunk]:
        """One stage call's finished chunks for this worker, in the order the last stage sends them."""
        out = []
        for job in jobs:
            latents = torch.empty((job.frames,) + tuple(latent_shape), device=self.device)
            dist.recv(latents, src=self.num_stages - 1, tag=DECODE_TAG)
            decoded = self.worker.decode(job, latents)
            if decoded is not None:
                out.append(decoded)
        return out

    def redecode(self, job: DecodeJob, latents: torch.Tensor) -> list[DecodedChunk]:
        decoded = self.worker.decode(job, latents)
        return [] if decoded is None else [decoded]

    def open_stream(self, stream_id: str, output: OutputFormat, warm: list[torch.Tensor]) -> None:
        self.worker.open_stream(stream_id, output, warm)

    def close_stream(self, stream_id: str) -> None:
        self.worker.close_stream(stream_id)

    def profile(self, latent_shape: tuple[int, int, int], frames: int, repeats: int = 1) -> float:
        return self.worker.profile(latent_shape, frames, repeats)


@dataclass
class DriverTraffic:
    """What crosses between the driver and the stage actors (tests count it)."""

    calls: int = 0
    """Stage actor calls made for micro-batches."""
    decode_calls: int = 0
    """Decode worker calls (one per worker a stage call finishes chunks for)."""
    latent_bytes_out: int = 0
    """Latent bytes sent with micro-batches (re-cache only)."""
    latent_bytes_in: int = 0
    """Latent bytes received: finished chunks' clean latents."""


class RayExecutor(Executor):
    """P stage actors and the decode worker actors in Ray; submission-ordered, at most ``max_inflight``
    micro-batches in flight (the engine's bound), in calls of ``micro_batches_per_call``."""

    def __init__(self, gen: GenerationConfig, parallel: ParallelConfig, split: list[tuple[int, int]] | None = None,
                 placement_group=None, first_bundle: int = 0):
        """``placement_group``: reserved by someone else (a Serve replica's placement_group_bundles); GPU slot
        i (``workers.devicemap``) runs in its bundle ``first_bundle + i`` and the group outlives this
        executor. Otherwise, with any resources per stage, the executor reserves its own STRICT_PACK group
        and removes it on kill."""
        import ray

        num_stages = parallel.stages
        split = split or even_split(gen.model.num_layers, num_stages)
        if len(split) != num_stages:
            raise ValueError(f"split has {len(split)} ranges for {num_stages} stages")
        self._ray = ray
        self.cfg = gen.model
        self.num_stages = num_stages
        self.decode_workers = parallel.decode_workers
        self.decode_shared = parallel.decode == "shared"
        self.per_call = parallel.micro_batches_per_call
        # a call runs per_call forwards, and a stream's open or close waits behind the calls in flight
        self.call_timeout_s = parallel.stage_call_timeout_s * self.per_call
        self._pending: list[MicroBatch] = []  # submitted, not yet flushed
        self.router = DecodeRouter(self.decode_workers)
        rendezvous = self._rendezvous = _rendezvous_file()
        bundle = {k: v for k, v in (("CPU", parallel.cpus_per_stage), ("GPU", parallel.gpus_per_stage)) if v}
        self.placement_group, self._first_bundle = placement_group, first_bundle
        self._owns_placement_group = placement_group is None and bool(bundle)
        if self._owns_placement_group:  # a replica's slots are reserved together on one node (NVLink)
            from ray.util.placement_group import placement_group

            self.placement_group = placement_group([dict(bundle) for _ in range(parallel.gpu_slots)],
                                                   strategy="STRICT_PACK")
            if not self.placement_group.wait(timeout_seconds=parallel.placement_timeout_s):
                ray.util.remove_placement_group(self.placement_group)
                raise StageFailure("unplaceable", f"no node has {parallel.gpu_slots} x {bundle} free")
        # shared decode: the last stage's slot is split between the stage and its decode workers
        gpus, cpus, last = parallel.gpus_per_stage, parallel.cpus_per_stage, num_stages - 1
        share = 2 if self.decode_shared and self.decode_workers else 1
        self.actors, self.decoders = [], []
        self._inflight: deque = deque()  # per call, oldest first: ([seq per micro-batch], [result ref per stage])
        self._answers: dict = {}  # result ref -> its value, fetched once, when it is first seen ready
        self._decoding: list[deque] = []  # per decode worker: (seq, ref) of its decode calls
        self.traffic = DriverTraffic()
        try:
            for i, rng in enumerate(split):
                g = gpus / share if i == last else gpus
                self.actors.append(ray.remote(StageActorBody).options(**self._slot(i, cpus, g)).remote(
                    gen, parallel, rng, i, rendezvous))
            for w in range(self.decode_workers):
                slot, g, c = (last, gpus / (share * self.decode_workers), 0.0) if self.decode_shared else \
                    (num_stages + w, gpus, cpus)
                self.decoders.append(ray.remote(DecodeActorBody).options(**self._slot(slot, c, g)).remote(
                    gen, parallel, w, rendezvous))
            self._decoding = [deque() for _ in self.decoders]
            self._split = list(self._get([a.ready.remote() for a in self.actors], timeout=120))
            self._get([d.ready.remote() for d in self.decoders], timeout=120)
            self._procs = self._get([a.locate.remote() for a in self.actors + self.decoders], timeout=30)
        except BaseException:  # stages that failed to start: their actors, slots and rendezvous file go too
            self.kill()
            raise

    @property
    def max_inflight(self) -> int:
        return max_inflight(self.num_stages, self.per_call)

    def _slot(self, slot: int, cpus: float, gpus: float) -> dict:
        """Ray options of an actor on GPU slot ``slot`` (its placement-group bundle, if any)."""
        options = dict(num_cpus=cpus, num_gpus=gpus)
        if self.placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.placement_group,
                                                                              self._first_bundle + slot)
        return options

    def submit(self, mb: MicroBatch) -> None:
        """Held until ``flush``, which sends it with the others submitted since, ``per_call`` to a call."""
        if self.decoders:
            mb.decode_to = self.router.routes({w.stream_id for w in mb.segments})
        self._pending.append(mb)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), self.per_call):
            self._call(pending[i:i + self.per_call])

    def _call(self, mbs: list[MicroBatch]) -> None:
        """One call per stage for ``mbs`` (in order), and one per decode worker they finish chunks for."""
        light = [replace(mb, segments=[replace(w, inline=None, input=None) for w in mb.segments])  # stage 0 only
                 for mb in mbs]
        refs = [actor.run.remote(mbs if i == 0 else light) for i, actor in enumerate(self.actors)]
        self.traffic.calls += len(refs)
        self.traffic.latent_bytes_out += sum(w.inline.nbytes for mb in mbs for w in mb.segments
                                             if w.inline is not None)
        self._inflight.append(([mb.seq for mb in mbs], refs))
        jobs: dict[int, list[DecodeJob]] = {}
        for mb in mbs:
            for work in mb.segments:  # in the order the last stage sends them
                if work.stream_id in mb.decode_to:
                    for chunk in work.finishes():
                        jobs.setdefault(mb.decode_to[work.stream_id], []).append(
                            DecodeJob(work.stream_id, chunk, work.chunk_frames))
        grid = mbs[0].grid
        shape = (self.cfg.in_channels, grid[0] * self.cfg.patch_size[1], grid[1] * self.cfg.patch_size[2])
        for w, batch in jobs.items():
            self._decoding[w].append((mbs[-1].seq, self.decoders[w].decode.remote(batch, shape)))
            self.traffic.decode_calls += 1

    def collect(self, wait: bool) -> Collected:
        if wait:
            self._wait_any()
        out = Collected()
        while self._inflight and self._ready(self._inflight[0][1]):
            seqs, refs = self._inflight.popleft()
            per_stage = [self._answers.pop(r) for r in refs]  # _ready fetched every one
            for i, seq in enumerate(seqs):
                results = [answers[i] for answers in per_stage]
                finished = results[-1][1]
                self.traffic.latent_bytes_in += sum(x.nbytes for seg in finished for _, x in seg)
                out.finished.append(Finished(seq, finished, [r[2] for r in results], results[0][3]))
        for queue in self._decoding:  # in order per worker, so per stream
            while queue and self._handed_out(queue[0][0]) and self._ready([queue[0][1]]):
                out.decoded += self._answers.pop(queue.popleft()[1])
        return out

    def _handed_out(self, seq: int) -> bool:
        """Whether micro-batch ``seq`` came back to the engine: its chunks' frames may go out only after the
        chunks themselves (the decode worker can finish before the driver hears from the last stage)."""
        return not self._inflight or seq < self._inflight[0][0][0]

    @property
    def decoding(self) -> int:
        return sum(len(q) for q in self._decoding)

    def _wait_any(self) -> None:
        """Block until the oldest call has every stage's answer or a decode worker's next result is in,
        whichever comes first: a chunk's frames go out as soon as they are decoded, not after the next forward.
        Event-driven (``ray.wait`` for the first of them); no answer within the call timeout counts as dead."""
        deadline = time.monotonic() + self.call_timeout_s
        while True:
            waiting = []
            if self._inflight:
                refs = self._inflight[0][1]
                ready, waiting = self._ray.wait(refs, num_returns=len(refs), timeout=0)
                if not waiting:
                    return
                self._surface_deaths(ready, refs)
            heads = [q[0][1] for q in self._decoding if q and self._handed_out(q[0][0])]
            if heads and self._ray.wait(heads, num_returns=len(heads), timeout=0)[0]:
                return
            if not waiting and not heads:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise StageFailure("timeout", f"no answer from a stage within {self.call_timeout_s:g} s")
            self._ray.wait(waiting + heads, num_returns=1, timeout=left)

    def _ready(self, refs: list) -> bool:
        """Whether every call finished, without waiting."""
        ready, pending = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        self._surface_deaths(ready, refs)
        return not pending

    def _surface_deaths(self, ready: list, refs: list) -> None:
        """Fetch each answer once, as soon as it is ready: a stage that died fails fast, even while later
        stages still wait (its peers would wait in recv forever)."""
        for ref in ready:
            if ref not in self._answers:
                self._answers[ref] = self._get([ref], peers=[r for r in refs if r != ref])[0]

    def _get(self, refs: list, timeout: float | None = None, peers: list = ()):
        """``peers``: the other calls of the same micro-batch. A stage's error may be a send or recv to a
        peer that died; the peer's own call then fails as a death within moments, and that is the cause."""
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return self._ray.get(refs, timeout=timeout if timeout is not None else self.call_timeout_s)
        except RayActorError as err:
            raise StageFailure("died", type(err).__name__) from None
        except RayTaskError as err:
            if peers:
                done, _ = self._ray.wait(list(peers), num_returns=len(peers), timeout=PEER_DEATH_WAIT_S)
                for ref in done:
                    try:
                        self._ray.get(ref)
                    except RayActorError as death:
                        raise StageFailure("died", type(death).__name__) from None
                    except RayTaskError:
                        pass
            raise StageFailure("error", str(err.cause)[:200] if err.cause else type(err).__name__) from None
        except GetTimeoutError:
            raise StageFailure("timeout", f"no answer within {self.call_timeout_s:g} s") from None

    def open_stream(self, stream_id: str, cache_cfg: CacheConfig, output: OutputFormat | None = None,
                    warm: list[torch.Tensor] = (), video: bool = False) -> None:
        refs = [a.open_stream.remote(stream_id, cache_cfg, video) for a in self.actors]
        if self.decoders:
            w = self.router.assign(stream_id)
            refs.append(self.decoders[w].open_stream.remote(stream_id, output or OutputFormat(),
                                                            [x.cpu() for x in warm]))
        self._get(refs)

    def close_stream(self, stream_id: str) -> list[int]:
        if self.decoders and stream_id in self.router.routes([stream_id]):
            self.decoders[self.router.assign(stream_id)].close_stream.remote(stream_id)  # ordered after its decodes
        self.router.release(stream_id)
        return self._get([a.close_stream.remote(stream_id) for a in self.actors])

    def redecode(self, stream_id: str, chunk: int, latents: torch.Tensor) -> None:
        if self.decoders:
            w = self.router.assign(stream_id)
            self._decoding[w].append((-1, self.decoders[w].redecode.remote(  # its chunk finished long ago
                DecodeJob(stream_id, chunk, latents.shape[0]), latents.cpu())))

    def cache_bytes(self) -> list[int]:
        return self._get([a.cache_bytes.remote() for a in self.actors])

    def link_stats(self) -> list[dict[str, int]]:
        """Per stage: its ``StageLink.stats``."""
        return self._get([a.link_stats.remote() for a in self.actors])

    def pinned_cores(self) -> list[tuple[int, ...] | None]:
        """Per stage: the cores it claimed (``ParallelConfig.pin_cores``), or None where it floats."""
        return self._get([a.pinned_cores.remote() for a in self.actors])

    def kept_heaps(self) -> list[bool]:
        """Per stage: whether its malloc keeps freed memory (``workers.host.keep_heap``; CPU stages on glibc)."""
        return self._get([a.kept_heap.remote() for a in self.actors])

    def pids(self) -> list[int]:
        return self._get([a.pid.remote() for a in self.actors])

    def decoder_pids(self) -> list[int]:
        return self._get([d.pid.remote() for d in self.decoders])

    def num_parameters(self) -> list[int]:
        return self._get([a.num_parameters.remote() for a in self.actors])

    def owned_parameter_names(self) -> list[list[str]]:
        return self._get([a.owned_parameter_names.remote() for a in self.actors])

    def free_memory(self) -> list[int | None]:
        return self._get([a.free_memory.remote() for a in self.actors]
                         + ([] if self.decode_shared else [d.free_memory.remote() for d in self.decoders]))

    def split(self) -> list[tuple[int, int]]:
        return list(self._split)

    def profile(self, grid: tuple[int, int], frames: int, cache_cfg: CacheConfig,
                repeats: int = 1, streams: int = 1) -> list[StageStats]:
        return self._get([a.profile.remote(grid, frames, cache_cfg, repeats, streams) for a in self.actors])

    def profile_decode(self, latent_shape: tuple[int, int, int], frames: int, repeats: int = 1) -> float | None:
        if not self.decoders:
            return None
        return self._get([self.decoders[0].profile.remote(latent_shape, frames, repeats)])[0]

    def rebalance(self, split: list[tuple[int, int]]) -> None:
        if self._inflight or self._pending:
            raise RuntimeError("rebalance with micro-batches in flight")
        for src, dst, blocks in moves(self._split, split):
            released = self.actors[src].release_blocks.remote(blocks)
            self._get([self.actors[dst].adopt_blocks.remote(released)])
        self._split = list(self._get([a.ready.remote() for a in self.actors]))

    def shutdown(self) -> None:
        try:
            self._ray.get([a.shutdown.remote() for a in self.actors + self.decoders], timeout=5)
        except (self._ray.exceptions.RayError, TimeoutError) as err:  # dead or hung stages: the hard way
            log.info("stages did not shut down cleanly (%s); killing them", type(err).__name__)
            self.kill()
        else:
            self.kill(sigkill=False)  # they answered: Ray's kill ends them without a crash report

    def kill(self, sigkill: bool = True) -> None:
        """End every stage process now (a failed pipeline: survivors may be stuck in recv, or stopped).

        With ``sigkill``, stages on this node get SIGKILL first: Ray's own kill waits seconds for a stopped
        (hung) process, and a rebuild into the same placement-group bundles waits for their slots."""
        here = self._ray.get_runtime_context().get_node_id()
        for node, pid in getattr(self, "_procs", []) if sigkill else []:
            if node == here:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for a in self.actors + getattr(self, "decoders", []):
            try:
                self._ray.kill(a, no_restart=True)
            except (ValueError, self._ray.exceptions.RayError):  # already gone
                log.debug("stage actor already gone", exc_info=True)
        self._inflight.clear()
        self._pending.clear()
        self._answers.clear()
        for queue in getattr(self, "_decoding", []):
            queue.clear()
        try:  # the rendezvous file, where the stages ran on this node (a local Ray)
            os.remove(self._rendezvous)
        except OSError:
            pass
        if self.placement_group is not None and self._owns_placement_group:
            self._ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None
