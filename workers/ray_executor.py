"""RayExecutor: one Ray actor per stage; activations hop stage to stage over torch.distributed
(gloo on CPU, NCCL on CUDA), never through Ray's object store, and the ring closes the same way.

The driver submits every micro-batch to every stage actor at once (P calls a micro-batch). Ray runs an
actor's tasks from one caller in submission order, and each stage blocks in ``recv`` until its
predecessor sends, so stage s works on micro-batch m while stage s+1 works on m-1: the pipeline fills
by itself. The last stage computes x0 and the re-noise and sends the next step's latents to stage 0
(``RING_TAG``); stage 0 posts that receive as soon as it has run the micro-batch and waits on it only
when a later forward needs those latents. Only finished chunks' clean latents and per-stage stats come
back through Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from workers.config import CacheConfig, ModelConfig
from workers import denoise
from workers.batch import Finished, MicroBatch, StageStats
from workers.executor import Executor, StageFailure, moves
from workers.model.dit import Activation
from workers.plan import even_split
from workers.stage import StageWorker


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


def _rendezvous_file() -> str:
    """A FileStore path for one replica's process group. Its stages share a node (STRICT_PACK), so a file
    in /tmp is a rendezvous without a TCP store, whose server would listen on every interface."""
    return f"/tmp/streamgen-pg-{uuid.uuid4().hex}"


log = logging.getLogger("streamgen.ray_executor")
RING_TAG = 1
"""Tag of the last stage -> stage 0 messages; stage to stage activations use tag 0."""
SHUTDOWN_WAIT = timedelta(seconds=5)


def payload_shapes(mb: MicroBatch, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Shapes of what stage s sends to s+1: hidden [F, T, C], e_time [F, C], e0 [F, 6, C], contexts [L, C]."""
    f, t, c = mb.frames, mb.grid[0] * mb.grid[1], cfg.dim
    return [(f, t, c), (f, c), (f, 6, c)] + [(cfg.text_len, c)] * len(mb.texts)


class StageActorBody:
    """The actor: a StageWorker plus its torch.distributed endpoints."""

    def __init__(self, model_cfg: ModelConfig, block_range: tuple[int, int], stage: int, num_stages: int,
                 rendezvous: str, threads: int = 1, device: str = "cpu", weights_path: str = "",
                 dtype: torch.dtype = torch.float32, use_ema: bool = False):
        torch.set_num_threads(threads)
        self.cfg = model_cfg
        self.stage, self.num_stages = stage, num_stages
        self.worker = StageWorker(model_cfg, block_range, stage, num_stages, device, dtype, weights_path, use_ema)
        self.dtype = self.worker.model.dtype
        self.device = torch.device(device)
        self._sends: deque = deque()  # (isend work, buffer): buffers stay alive until their send completes
        self._ring: deque = deque()  # stage 0: (micro-batch, irecv work, buffer) posted, oldest first
        if num_stages > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a replica's stages share one node
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
            dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=stage,
                                    world_size=num_stages)

    def ready(self) -> tuple[int, int]:
        return self.worker.block_range

    def locate(self) -> tuple[str, int]:
        """(Ray node id, process id) of this stage."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def pid(self) -> int:
        return os.getpid()

    def run(self, mb: MicroBatch) -> tuple[int, list | None, StageStats]:
        """One micro-batch through this stage: (seq, finished chunks per segment on the last stage, stats)."""
        first, last = self.stage == 0, self.stage == self.num_stages - 1
        if first:
            latents, t = self.worker.first_inputs(mb, wait=self._unpack_ring)
            inputs, contexts = latents, None
        else:
            inputs, latents, contexts = self._recv(mb)
            t = None
        out, contexts, stats = self.worker.forward(mb, inputs, contexts, t)
        if not last:
            self._send(mb, out, latents, contexts)
            if mb.ring_frames():
                self._post_ring(mb)
            return mb.seq, None, stats
        ring, finished = denoise.advance(mb, latents, out)
        if ring is not None and first:  # P = 1: the ring is this stage's own store
            self.worker.store.put(mb, ring)
        elif ring is not None:
            self._isend(ring.contiguous(), dst=0, tag=RING_TAG)
            stats.bytes_sent = ring.nbytes
        return mb.seq, [[(c, x.cpu()) for c, x in seg] for seg in finished], stats

    def _recv(self, mb: MicroBatch) -> tuple[Activation, torch.Tensor, dict]:
        shapes = payload_shapes(mb, self.cfg)
        buf = torch.empty(sum(torch.Size(s).numel() for s in shapes), dtype=self.dtype, device=self.device)
        dist.recv(buf, src=self.stage - 1)
        latents = torch.empty((mb.frames,) + self.worker.latent_shape(mb.grid), device=self.device)
        dist.recv(latents, src=self.stage - 1)  # float32, for x0 on the last stage
        parts, off = [], 0
        for s in shapes:
            n = torch.Size(s).numel()
            parts.append(buf[off:off + n].view(s))
            off += n
        return Activation(*parts[:3]), latents, dict(zip(mb.texts, parts[3:]))

    def _send(self, mb: MicroBatch, act: Activation, latents: torch.Tensor, contexts: dict) -> None:
        tensors = list(act) + [contexts[sid] for sid in mb.texts]
        self._isend(torch.cat([t.reshape(-1).to(self.dtype) for t in tensors]), dst=self.stage + 1)
        self._isend(latents.float().contiguous(), dst=self.stage + 1)

    def _isend(self, buf: torch.Tensor, dst: int, tag: int = 0) -> None:
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()
        self._sends.append((dist.isend(buf, dst=dst, tag=tag), buf))

    def _post_ring(self, mb: MicroBatch) -> None:
        """Stage 0: post the receive of ``mb``'s ring latents now, so the last stage never waits on it."""
        buf = torch.empty((mb.ring_frames(),) + self.worker.latent_shape(mb.grid), device=self.device)
        self._ring.append((mb, dist.irecv(buf, src=self.num_stages - 1, tag=RING_TAG), buf))

    def _unpack_ring(self) -> bool:
        """Stage 0: wait for the oldest ring message and unpack it into the store; False when none is posted."""
        if not self._ring:
            return False
        mb, work, buf = self._ring.popleft()
        work.wait()
        self.worker.store.put(mb, buf)
        return True

    # streams and rebalance: thin forwards to the worker
    def open_stream(self, stream_id: str, cache_cfg: CacheConfig) -> None:
        self.worker.open_stream(stream_id, cache_cfg)

    def close_stream(self, stream_id: str) -> int:
        return self.worker.close_stream(stream_id)

    def cache_bytes(self) -> int:
        return self.worker.cache_bytes()

    def num_parameters(self) -> int:
        return self.worker.num_parameters()

    def owned_parameter_names(self) -> list[str]:
        return self.worker.owned_parameter_names()

    def profile(self, grid, frames, cache_cfg) -> StageStats:
        return self.worker.profile(grid, frames, cache_cfg)

    def release_blocks(self, ids: list[int]):
        return self.worker.release_blocks(ids)

    def adopt_blocks(self, released) -> tuple[int, int]:
        self.worker.adopt_blocks(*released)  # (blocks, caches) as returned by release_blocks
        return self.worker.block_range

    def shutdown(self) -> None:
        for work, _ in self._sends:
            work.wait(SHUTDOWN_WAIT)
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class DriverTraffic:
    """What crosses between the driver and the stage actors (tests count it)."""

    calls: int = 0
    """Stage actor calls made for micro-batches."""
    latent_bytes_out: int = 0
    """Latent bytes sent with micro-batches (re-cache only)."""
    latent_bytes_in: int = 0
    """Latent bytes received: finished chunks' clean latents."""


class RayExecutor(Executor):
    """P stage actors in Ray; submission-ordered, at most P micro-batches in flight (the engine's bound)."""

    def __init__(self, model_cfg: ModelConfig, num_stages: int = 1, split: list[tuple[int, int]] | None = None,
                 threads_per_stage: int = 1, num_cpus_per_stage: float = 0, num_gpus_per_stage: float = 0,
                 device: str = "cpu", weights_path: str = "", resources_per_stage: dict | None = None,
                 call_timeout_s: float = 30.0, placement_timeout_s: float = 120.0,
                 placement_group=None, first_bundle: int = 0, dtype: torch.dtype = torch.float32,
                 use_ema: bool = False):
        """``placement_group``: reserved by someone else (a Serve replica's placement_group_bundles); stage i
        runs in its bundle ``first_bundle + i`` and the group outlives this executor. Otherwise, with any
        resources per stage, the executor reserves its own STRICT_PACK group and removes it on kill."""
        import ray

        split = split or even_split(model_cfg.num_layers, num_stages)
        if len(split) != num_stages:
            raise ValueError(f"split has {len(split)} ranges for {num_stages} stages")
        self._ray = ray
        self.num_stages = num_stages
        self.call_timeout_s = call_timeout_s
        rendezvous = self._rendezvous = _rendezvous_file()
        actor_cls = ray.remote(StageActorBody)
        bundle = {k: v for k, v in (("CPU", num_cpus_per_stage), ("GPU", num_gpus_per_stage)) if v}
        bundle.update(resources_per_stage or {})
        self.placement_group, self._first_bundle = placement_group, first_bundle
        self._owns_placement_group = placement_group is None and bool(bundle)
        if self._owns_placement_group:  # a replica's stages reserve their slots together on one node (NVLink)
            from ray.util.placement_group import placement_group

            self.placement_group = placement_group([dict(bundle) for _ in range(num_stages)], strategy="STRICT_PACK")
            if not self.placement_group.wait(timeout_seconds=placement_timeout_s):
                ray.util.remove_placement_group(self.placement_group)
                raise StageFailure("unplaceable", f"no node has {num_stages} x {bundle} free")
        self.actors = []
        for i, rng in enumerate(split):
            options = dict(num_cpus=num_cpus_per_stage, num_gpus=num_gpus_per_stage,
                           resources=resources_per_stage or {})
            if self.placement_group is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.placement_group,
                                                                                  self._first_bundle + i)
            self.actors.append(actor_cls.options(**options).remote(
                model_cfg, rng, i, num_stages, rendezvous, threads_per_stage, device, weights_path, dtype, use_ema))
        self._split = list(self._get([a.ready.remote() for a in self.actors], timeout=120))
        self._stage_procs = self._get([a.locate.remote() for a in self.actors], timeout=30)
        self._inflight: deque = deque()  # (seq, [result ref per stage])
        self.traffic = DriverTraffic()

    def submit(self, mb: MicroBatch) -> None:
        light = replace(mb, segments=[replace(w, inline=None) for w in mb.segments],
                        texts={sid: torch.empty(0) for sid in mb.texts})
        refs = [actor.run.remote(mb if i == 0 else light) for i, actor in enumerate(self.actors)]
        self.traffic.calls += len(refs)
        self.traffic.latent_bytes_out += sum(w.inline.nbytes for w in mb.segments if w.inline is not None)
        self._inflight.append((mb.seq, refs))

    def collect(self, wait: bool) -> list[Finished]:
        out = []
        while self._inflight:
            seq, refs = self._inflight[0]
            if not self._wait_all(refs, block=wait and not out):
                break
            self._inflight.popleft()
            results = self._get(refs)
            finished = results[-1][1]
            self.traffic.latent_bytes_in += sum(x.nbytes for seg in finished for _, x in seg)
            out.append(Finished(seq, finished, [r[2] for r in results]))
        return out

    def _wait_all(self, refs: list, block: bool) -> bool:
        """Whether every stage finished this micro-batch. A stage that died fails fast (its peers would
        wait in recv forever); one that does not answer within the call timeout counts as dead."""
        deadline = time.monotonic() + self.call_timeout_s
        while True:
            ready, pending = self._ray.wait(refs, num_returns=len(refs), timeout=0.05 if block else 0)
            for ref in ready:  # surface a death now, even while later stages still wait
                self._get([ref])
            if not pending:
                return True
            if not block:
                return False
            if time.monotonic() > deadline:
                raise StageFailure("timeout", f"no answer from a stage within {self.call_timeout_s:g} s")

    def _get(self, refs: list, timeout: float | None = None):
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return self._ray.get(refs, timeout=timeout if timeout is not None else self.call_timeout_s)
        except RayActorError as err:
            raise StageFailure("died", type(err).__name__) from None
        except RayTaskError as err:  # e.g. a send to a peer that died: the pipeline is broken either way
            raise StageFailure("error", str(err.cause)[:200] if err.cause else type(err).__name__) from None
        except GetTimeoutError:
            raise StageFailure("timeout", f"no answer within {self.call_timeout_s:g} s") from None

    def open_stream(self, stream_id: str, cache_cfg: CacheConfig) -> None:
        self._get([a.open_stream.remote(stream_id, cache_cfg) for a in self.actors])

    def close_stream(self, stream_id: str) -> list[int]:
        return self._get([a.close_stream.remote(stream_id) for a in self.actors])

    def cache_bytes(self) -> list[int]:
        return self._get([a.cache_bytes.remote() for a in self.actors])

    def pids(self) -> list[int]:
        return self._get([a.pid.remote() for a in self.actors])

    def num_parameters(self) -> list[int]:
        return self._get([a.num_parameters.remote() for a in self.actors])

    def owned_parameter_names(self) -> list[list[str]]:
        return self._get([a.owned_parameter_names.remote() for a in self.actors])

    def split(self) -> list[tuple[int, int]]:
        return list(self._split)

    def profile(self, grid: tuple[int, int], frames: int, cache_cfg: CacheConfig) -> list[StageStats]:
        return self._get([a.profile.remote(grid, frames, cache_cfg) for a in self.actors])

    def rebalance(self, split: list[tuple[int, int]]) -> None:
        if self._inflight:
            raise RuntimeError("rebalance with micro-batches in flight")
        for src, dst, blocks in moves(self._split, split):
            released = self.actors[src].release_blocks.remote(blocks)
            self._get([self.actors[dst].adopt_blocks.remote(released)])
        self._split = list(self._get([a.ready.remote() for a in self.actors]))

    def shutdown(self) -> None:
        try:
            self._ray.get([a.shutdown.remote() for a in self.actors], timeout=5)
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
        for node, pid in getattr(self, "_stage_procs", []) if sigkill else []:
            if node == here:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for a in self.actors:
            try:
                self._ray.kill(a, no_restart=True)
            except (ValueError, self._ray.exceptions.RayError):  # already gone
                log.debug("stage actor already gone", exc_info=True)
        self._inflight.clear()
        try:  # the rendezvous file, where the stages ran on this node (a local Ray)
            os.remove(self._rendezvous)
        except OSError:
            pass
        if self.placement_group is not None and self._owns_placement_group:
            self._ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None
