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
  grow with the number of steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from orchestrator.config import CacheConfig, SamplerConfig
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

    @property
    def frames(self) -> int:
        return self.latents.shape[0]


@dataclass
class _InFlight:
    chunk: int
    step: int
    x_t: torch.Tensor  # [f, C, h, w]


class StreamProgram:
    """Sampler state of one stream: in-flight chunks, pending context pass, recent clean latents."""

    def __init__(self, sampler: SamplerConfig, cache: CacheConfig, seed: int, latent_shape: tuple[int, int, int],
                 start_chunk: int = 0, history: list[tuple[int, torch.Tensor]] | None = None):
        self.sampler = sampler
        self.seed = int(seed)
        self.latent_shape = tuple(latent_shape)  # (C, h, w)
        self.schedule = FlowMatchSchedule(sampler)
        self.sigmas = self.schedule.step_sigmas()
        self.next_chunk = start_chunk
        self.inflight: list[_InFlight] = []
        self.pending_context: tuple[int, torch.Tensor] | None = None
        keep = cache.recache_frames // sampler.chunk_frames
        self.history: deque[tuple[int, torch.Tensor]] = deque(history or [], maxlen=keep)
        self.recache_pending = bool(self.history)

    @property
    def f(self) -> int:
        return self.sampler.chunk_frames

    def next_work(self) -> Work:
        """The stream's next forward."""
        if self.recache_pending:
            return self._recache_work()
        if self.sampler.mode == "sequential":
            if self.pending_context is not None:
                return self._build([], with_context=True)
            if not self.inflight:
                self._admit()
            return self._build(self.inflight[:1], with_context=False)
        self._admit()
        return self._build(self.inflight, with_context=self.pending_context is not None)

    def complete(self, work: Work, flow: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Apply a forward's flow [F, C, h, w]: x0, re-noise, finish chunks. Returns finished (chunk, x0 [f, C, h, w])."""
        if work.reset_cache:
            self.recache_pending = False
            return []
        finished = []
        by_chunk = {e.chunk: e for e in self.inflight}
        for i, (chunk, step) in enumerate(work.entries):
            if step == CONTEXT:
                self.pending_context = None
                continue
            entry = by_chunk[chunk]
            x0 = to_x0(entry.x_t, flow[i * self.f:(i + 1) * self.f].float(), self.sigmas[step])
            if step + 1 == len(self.sigmas):
                finished.append((chunk, x0))
                self.inflight.remove(entry)
            else:
                noise = chunk_noise(self.seed, chunk, step + 1, x0.shape)
                entry.x_t = renoise(x0, noise, self.sigmas[step + 1])
                entry.step = step + 1
        for chunk, x0 in finished:
            self.pending_context = (chunk, x0)
            self.history.append((chunk, x0))
        return finished

    def restart_unfinished(self) -> None:
        """A prompt change: unfinished chunks start over (same noise), the cache is rebuilt from the
        recent clean latents under the new context (LongLive re-cache, sink re-encoded too)."""
        if self.inflight:
            self.next_chunk = min(e.chunk for e in self.inflight)
        self.inflight.clear()
        self.pending_context = None
        self.recache_pending = True

    # ----------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        c = self.next_chunk
        self.inflight.append(_InFlight(c, 0, chunk_noise(self.seed, c, 0, (self.f,) + self.latent_shape)))
        self.next_chunk += 1

    def _build(self, inflight: list[_InFlight], with_context: bool) -> Work:
        lat, ts, entries = [], [], []
        if with_context:
            chunk, x0 = self.pending_context
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
        lat = torch.cat([x0 for _, x0 in self.history]) if self.history else \
            torch.zeros((0,) + self.latent_shape)
        t = torch.full((lat.shape[0],), self.sampler.context_timestep, dtype=torch.float32)
        entries = [(c, CONTEXT) for c, _ in self.history]
        return Work(lat, t, entries, self.f, commit_frames=lat.shape[0], reset_cache=True)
