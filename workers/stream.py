"""Per-stream sampling program: what the next forward of a stream holds, and what to do with its flow.

It owns no model. Every executor (the single-process reference, the pipeline engine) asks
``next_work()``, runs the forward on the stream's caches, and hands the flow to ``complete()``. That
is what makes a P-stage engine produce the reference's frames.

Modes (``SamplerConfig.mode``):

* ``sequential`` (Self-Forcing): chunk c runs its steps one forward each, then a context pass of its
  clean x0 at t=0 commits its K/V; chunk c+1 starts after. Every step of chunk c attends to the
  clean context of all earlier chunks (within the cache window).
* ``stream_batch`` (documented variant of StreamDiffusionV2's stream batch): one forward per tick
  holds [clean context chunk | in-flight chunks oldest -> newest], block-causal by chunk. A new chunk
  enters at step 0 every tick; the oldest leaves after its last step and is committed by the next
  tick's context entry. Chunk c at step i therefore attends to clean context of chunks <= c-i-1 and to
  chunks c-i..c-1 *in flight* (less noisy than itself), like Rolling Forcing's window. Unlike
  StreamDiffusionV2 there is one KV cache per stream (not one per step slot), so memory does not
  grow with the number of steps. With ``lanes`` L > 1 the stream keeps L forwards in flight (a
  pipeline of L stages stays busy with one stream): lane l holds chunks c = l mod L, each forward
  sees its lane's in-flight chunks and everything committed before it, whichever lane committed it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from workers.config import CacheConfig, SamplerConfig
from workers.model.scheduler import FlowMatchSchedule, chunk_noise, renoise, to_x0

CONTEXT = -1  # step index of a context (cache-writing) entry


@dataclass
class Work:
    """One forward of one stream."""

    latents: torch.Tensor
    """[F, C, h, w] float32: entries concatenated oldest first."""
    t: torch.Tensor
    """[F] per-frame timesteps."""
    entries: list[tuple[int, int]]
    """(chunk index, step index or CONTEXT) per chunk-sized entry, in order."""
    chunk_frames: int
    commit_frames: int = 0
    """Leading frames whose K/V join the cache (context entries)."""
    reset_cache: bool = False
    """Clear the stream's KV cache before this forward (re-cache)."""
    lane: int = 0
    """Which lane issued it (``SamplerConfig.lanes``)."""
    independent: bool = False
    """Entries attend to the clean cache and themselves only (stream_batch, batch_attention 'clean')."""

    @property
    def offsets(self) -> tuple[int, ...] | None:
        """Independent work: each entry's first temporal position, in frames after the cache (None otherwise:
        entries sit back to back)."""
        if not self.independent:
            return None
        return tuple(i * self.chunk_frames for i in range(len(self.entries)))

    @property
    def frames(self) -> int:
        return self.latents.shape[0]


@dataclass
class _InFlight:
    chunk: int
    step: int
    x_t: torch.Tensor  # [f, C, h, w]


@dataclass
class _Lane:
    inflight: list[_InFlight] = field(default_factory=list)
    pending_context: tuple[int, torch.Tensor] | None = None
    busy: bool = False  # a forward of this lane is out


class StreamProgram:
    """Sampler state of one stream: in-flight chunks and pending context pass per lane, recent clean latents.

    Forwards are issued round-robin over ``lanes``; forward k belongs to lane k mod lanes and may be
    issued once that lane's previous forward has completed. New chunks enter one per forward.
    """

    def __init__(self, sampler: SamplerConfig, cache: CacheConfig, seed: int, latent_shape: tuple[int, int, int],
                 start_chunk: int = 0, history: list[tuple[int, torch.Tensor]] | None = None):
        self.sampler = sampler
        self.seed = int(seed)
        self.latent_shape = tuple(latent_shape)  # (C, h, w)
        self.schedule = FlowMatchSchedule(sampler)
        self.sigmas = self.schedule.step_sigmas()
        self.next_chunk = start_chunk
        self.lanes = [_Lane() for _ in range(sampler.lanes)]
        self.turn = 0  # lane of the next forward
        keep = cache.recache_frames // sampler.chunk_frames
        self.history: deque[tuple[int, torch.Tensor]] = deque(history or [], maxlen=keep)
        self.recache_pending = bool(self.history)
        self.recache_out = False

    @property
    def f(self) -> int:
        return self.sampler.chunk_frames

    @property
    def outstanding(self) -> int:
        """Forwards issued and not yet completed."""
        return sum(lane.busy for lane in self.lanes) + int(self.recache_out)

    def ready(self) -> bool:
        """Whether ``next_work`` may be called now."""
        if self.recache_out:
            return False
        if self.recache_pending:
            return self.outstanding == 0
        return not self.lanes[self.turn].busy

    def next_work(self) -> Work:
        """The stream's next forward (call only when ``ready()``)."""
        if not self.ready():
            raise RuntimeError("stream is not ready for another forward")
        if self.recache_pending:
            self.recache_out = True
            return self._recache_work()
        lane_id = self.turn
        lane = self.lanes[lane_id]
        if self.sampler.mode == "sequential":
            if lane.pending_context is not None:
                work = self._build(lane, [], with_context=True)
            else:
                if not lane.inflight:
                    self._admit(lane)
                work = self._build(lane, lane.inflight[:1], with_context=False)
        else:
            self._admit(lane)
            work = self._build(lane, lane.inflight, with_context=lane.pending_context is not None)
        work.lane = lane_id
        work.independent = self.sampler.mode == "stream_batch" and self.sampler.batch_attention == "clean"
        lane.busy = True
        self.turn = (self.turn + 1) % len(self.lanes)
        return work

    def complete(self, work: Work, flow: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Apply a forward's flow [F, C, h, w]: x0, re-noise, finish chunks. Returns finished (chunk, x0 [f, C, h, w])."""
        if work.reset_cache:
            self.recache_out = self.recache_pending = False
            return []
        lane = self.lanes[work.lane]
        lane.busy = False
        finished = []
        by_chunk = {e.chunk: e for e in lane.inflight}
        for i, (chunk, step) in enumerate(work.entries):
            if step == CONTEXT:
                lane.pending_context = None
                continue
            entry = by_chunk[chunk]
            x0 = to_x0(entry.x_t, flow[i * self.f:(i + 1) * self.f].float(), self.sigmas[step])
            if step + 1 == len(self.sigmas):
                finished.append((chunk, x0))
                lane.inflight.remove(entry)
            else:
                noise = chunk_noise(self.seed, chunk, step + 1, x0.shape)
                entry.x_t = renoise(x0, noise, self.sigmas[step + 1])
                entry.step = step + 1
        for chunk, x0 in finished:
            lane.pending_context = (chunk, x0)
            self.history.append((chunk, x0))
        return finished

    def restart_unfinished(self, lost: bool = False) -> None:
        """A prompt change: unfinished chunks start over (same noise) and the cache is rebuilt from the
        recent clean latents under the new context (LongLive re-cache, sink re-encoded too). Call with
        no forward outstanding, or with ``lost`` when the outstanding forwards died with their stages
        (recovery: the same re-cache rebuilds the caches on new stages). With no finished chunk yet
        nothing is cached, so nothing is re-cached."""
        if self.outstanding and not lost:
            raise RuntimeError("restart_unfinished with forwards outstanding: drain them first")
        self.recache_out = False
        self.next_chunk = self.first_unfinished()
        self.lanes = [_Lane() for _ in self.lanes]
        self.turn = 0
        self.recache_pending = bool(self.history)

    def first_unfinished(self) -> int:
        """The oldest chunk not yet finished (in flight, or the next to start)."""
        return min((e.chunk for lane in self.lanes for e in lane.inflight), default=self.next_chunk)

    # ----------------------------------------------------------------------------------------------

    def _admit(self, lane: _Lane) -> None:
        c = self.next_chunk
        lane.inflight.append(_InFlight(c, 0, chunk_noise(self.seed, c, 0, (self.f,) + self.latent_shape)))
        self.next_chunk += 1

    def _build(self, lane: _Lane, inflight: list[_InFlight], with_context: bool) -> Work:
        lat, ts, entries = [], [], []
        if with_context:
            chunk, x0 = lane.pending_context
            lat.append(x0)
            ts.append(self.sampler.context_timestep)
            entries.append((chunk, CONTEXT))
        for e in sorted(inflight, key=lambda e: e.chunk):
            lat.append(e.x_t)
            ts.append(self.schedule.timesteps[e.step])
            entries.append((e.chunk, e.step))
        t = torch.tensor(ts, dtype=torch.float32).repeat_interleave(self.f)
        return Work(torch.cat(lat), t, entries, self.f, commit_frames=self.f if with_context else 0)

    def _recache_work(self) -> Work:
        lat = torch.cat([x0 for _, x0 in self.history])
        t = torch.full((lat.shape[0],), self.sampler.context_timestep, dtype=torch.float32)
        entries = [(c, CONTEXT) for c, _ in self.history]
        return Work(lat, t, entries, self.f, commit_frames=lat.shape[0], reset_cache=True)
