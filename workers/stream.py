"""Per-stream sampling program: what the next forward of a stream holds. Bookkeeping only, no tensors in
flight: the latents live on the stages (``workers.denoise``), and the driver gets each chunk's clean x0 once.

Every executor (the single-process reference, the pipeline engine) asks ``next_work()``, runs the forward,
and hands the finished chunks to ``complete()``. The program advances when a forward is *issued*, so the
next forward of the same stream can be issued at once: stage 0 takes its latents from the ring when they
arrive, and nothing waits for a round trip through the driver.

Modes (``SamplerConfig.mode``):

* ``sequential`` (Self-Forcing): chunk c runs its steps one forward each, then a context pass of its
  clean x0 at t=0 commits its K/V; chunk c+1 starts after. Every step of chunk c attends to the
  clean context of all earlier chunks (within the cache window).
* ``stream_batch`` (documented variant of StreamDiffusionV2's stream batch): one forward per tick
  holds [clean context chunk | in-flight chunks oldest -> newest], block-causal by chunk. A new chunk
  enters at step 0 every tick; the oldest leaves after its last step and is committed by the next
  tick's context entry. Chunk c at step i therefore attends to clean context of chunks <= c-i-1 and to
  chunks c-i..c-1 *in flight* (less noisy than itself), like Rolling Forcing's window. One KV cache per
  stream (not one per step slot). With ``lanes`` L > 1 the stream keeps L independent forwards in flight:
  lane l holds chunks c = l mod L, each forward sees its lane's in-flight chunks and everything committed
  before it, whichever lane committed it.

Video-to-video streams (``video``) take a chunk's input from ``add_input`` (its frames, or their latents, and
its noise scale s): the chunk enters step 0 at the controller's step, int(1000 s) - 100, as eps s + z (1 - s);
a forward that would admit a chunk waits for its input, so the forwards a stream makes do not depend on
when its inputs arrive. After ``end_input`` the chunks in flight finish without new ones.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

import torch

from workers.config import CacheConfig, SamplerConfig
from workers.batch import CONTEXT, ChunkInput, Work
from workers.model.schedule import FlowMatchSchedule
from workers.v2v import first_step


@dataclass
class _Lane:
    inflight: list[list[int]] = field(default_factory=list)  # [chunk, step of its next forward], oldest first
    pending_context: int | None = None  # finished chunk whose context pass is this lane's next entry
    issued: int = 0  # forwards issued and not yet completed


class StreamProgram:
    """Sampler state of one stream: per lane the chunks in flight and the pending context pass, plus the
    recent clean latents (re-cache, checkpoints).

    Forwards are issued round-robin over ``lanes``; forward k belongs to lane k mod lanes. New chunks
    enter one per forward.
    """

    def __init__(self, sampler: SamplerConfig, cache: CacheConfig, seed: int, latent_shape: tuple[int, int, int],
                 start_chunk: int = 0, history: list[tuple[int, torch.Tensor]] | None = None, epoch: int = 0,
                 video: bool = False):
        self.sampler = sampler
        self.seed = int(seed)
        self.latent_shape = tuple(latent_shape)  # (C, h, w)
        self.schedule = FlowMatchSchedule(sampler)
        self.sigmas = tuple(self.schedule.step_sigmas())
        self.next_chunk = start_chunk
        self.epoch = epoch
        self.lanes = [_Lane() for _ in range(sampler.lanes)]
        self.turn = 0  # lane of the next forward
        keep = cache.recache_frames // sampler.chunk_frames
        self.history: deque[tuple[int, torch.Tensor]] = deque(history or [], maxlen=keep)
        self.finishing: set[int] = set()  # chunks whose last step is issued, clean latents not yet back
        self.recache_pending = bool(self.history)
        self.recache_out = False
        self.video = video
        self.inputs: dict[int, ChunkInput] = {}  # video: chunk -> its input, until the chunk finishes
        self.input_ended = False
        self._next_input = start_chunk

    @property
    def f(self) -> int:
        return self.sampler.chunk_frames

    @property
    def steps(self) -> int:
        return len(self.sigmas)

    def add_input(self, noise_scale: float, pixels: torch.Tensor | None = None) -> int:
        """Video: the next chunk's input (uint8 frames [N, H, W, 3]) at noise scale s; returns its chunk index."""
        chunk, self._next_input = self._next_input, self._next_input + 1
        self.inputs[chunk] = ChunkInput(chunk, noise_scale, pixels)
        return chunk

    def end_input(self) -> None:
        """Video: no more inputs; the chunks in flight still finish."""
        self.input_ended = True

    @property
    def outstanding(self) -> int:
        """Forwards issued and not yet completed."""
        return sum(lane.issued for lane in self.lanes) + int(self.recache_out)

    def ready(self) -> bool:
        """Whether ``next_work`` may be called now (a re-cache goes alone: the cache is rebuilt first; a video
        forward that admits a chunk waits for its input)."""
        if self.recache_pending:
            return self.outstanding == 0
        if not self.video:
            return True
        lane = self.lanes[self.turn]
        if self.sampler.mode == "sequential" and (lane.pending_context is not None or lane.inflight):
            return True  # the chunk in hand goes on
        if self.next_chunk in self.inputs:
            return True
        # no input for a new chunk: after the end, a stream batch still finishes what it holds
        return self.input_ended and self.sampler.mode == "stream_batch" and \
            (lane.pending_context is not None or bool(lane.inflight))

    def chained(self) -> bool:
        """Whether the next forward depends on one still in flight (stage 0 will wait for its latents)."""
        return self.recache_out or self.lanes[self.turn].issued > 0

    def next_work(self, stream_id: str = "") -> Work:
        """The stream's next forward (call only when ``ready()``); the program moves on as if it completed."""
        if not self.ready():
            raise RuntimeError("stream is not ready for another forward")
        if self.recache_pending:
            self.recache_pending, self.recache_out = False, True
            return self._recache_work(stream_id)
        lane_id = self.turn
        lane = self.lanes[lane_id]
        context = lane.pending_context
        if self.sampler.mode == "sequential":
            if context is None and not lane.inflight:
                self._admit(lane)
            entries = [] if context is not None else lane.inflight[:1]
        else:
            if not self.video or self.next_chunk in self.inputs:
                self._admit(lane)
            entries = list(lane.inflight)
        work = self._build(stream_id, context, entries, lane_id)
        lane.pending_context = None
        for entry in entries:  # advance: the next forward of this lane sees the next step
            entry[1] += 1
            if entry[1] == len(self.sigmas):
                lane.inflight.remove(entry)
                lane.pending_context = entry[0]
                self.finishing.add(entry[0])
        lane.issued += 1
        self.turn = (self.turn + 1) % len(self.lanes)
        return work

    def complete(self, work: Work, finished: list[tuple[int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
        """A forward came back with the chunks it finished, (chunk, x0 [f, C, h, w]); returns them."""
        if work.reset_cache:
            self.recache_out = False
            return []
        self.lanes[work.lane].issued -= 1
        for chunk, x0 in finished:
            self.finishing.discard(chunk)
            self.history.append((chunk, x0))
            self.inputs.pop(chunk, None)
        return finished

    def encoded(self, chunk: int, latents: torch.Tensor) -> None:
        """Video: stage 0 encoded the chunk's frames; a restart of the chunk sends these latents instead."""
        inp = self.inputs.get(chunk)
        if inp is not None:
            inp.latents, inp.pixels = latents, None

    def restart_unfinished(self, lost: bool = False) -> None:
        """A prompt change: unfinished chunks start over (same noise) and the cache is rebuilt from the
        recent clean latents under the new context (LongLive re-cache, sink re-encoded too). Call with
        no forward outstanding, or with ``lost`` when the outstanding forwards died with their stages
        (recovery: the same re-cache rebuilds the caches on new stages). With no finished chunk yet
        nothing is cached, so nothing is re-cached."""
        if self.outstanding and not lost:
            raise RuntimeError("restart_unfinished with forwards outstanding: drain them first")
        self.next_chunk = self.first_unfinished()
        self.lanes = [_Lane() for _ in self.lanes]
        self.turn = 0
        self.finishing.clear()
        self.epoch += 1
        self.recache_out = False
        self.recache_pending = bool(self.history)

    def change_steps(self, steps: tuple[float, ...]) -> None:
        """A steps change: the schedule takes the new step list and unfinished chunks start over under it, as
        on a prompt change (``restart_unfinished``; a video stream keeps its inputs and waits for the next)."""
        self.sampler = replace(self.sampler, denoising_steps=tuple(steps))
        self.schedule = FlowMatchSchedule(self.sampler)
        self.sigmas = tuple(self.schedule.step_sigmas())
        self.restart_unfinished()

    def first_unfinished(self) -> int:
        """The oldest chunk whose clean latents are not back yet (in flight, or the next to start)."""
        in_flight = [e[0] for lane in self.lanes for e in lane.inflight] + list(self.finishing)
        return min(in_flight, default=self.next_chunk)

    # ----------------------------------------------------------------------------------------------

    def _admit(self, lane: _Lane) -> None:
        lane.inflight.append([self.next_chunk, 0])
        self.next_chunk += 1

    def _build(self, stream_id: str, context: int | None, entries: list[list[int]], lane: int) -> Work:
        pairs, ts, sigmas, inp = [], [], [], None
        if context is not None:
            pairs.append((context, CONTEXT))
            ts.append(self.sampler.context_timestep)
            sigmas.append((0.0, 0.0))
        for chunk, step in sorted(entries):
            pairs.append((chunk, step))
            after = self.sigmas[step + 1] if step + 1 < self.steps else 0.0
            if step == 0 and self.video:  # the chunk's own first step, from its noise scale
                inp = self.inputs[chunk]
                t = self.schedule.timestep_of(self._first_step(inp.noise_scale))
                ts.append(t)
                sigmas.append((self.schedule.sigma(t), after))
            else:
                ts.append(self.schedule.timesteps[step])
                sigmas.append((self.sigmas[step], after))
        return Work(stream_id, self.epoch, self.seed, tuple(pairs), tuple(ts), tuple(sigmas), self.steps, self.f,
                    commit_frames=self.f if context is not None else 0, lane=lane,
                    independent=self.sampler.mode == "stream_batch" and self.sampler.batch_attention == "clean",
                    input=inp)

    def _first_step(self, noise_scale: float) -> float:
        """int(1000 s) - 100, kept above the list's second step (the steps stay decreasing) and in (0, 1000]."""
        steps = self.sampler.denoising_steps
        floor = steps[1] + 1 if len(steps) > 1 else 1.0
        return min(1000.0, max(first_step(noise_scale), floor))

    def _recache_work(self, stream_id: str) -> Work:
        lat = torch.cat([x0 for _, x0 in self.history])  # [K f, C, h, w]
        entries = tuple((c, CONTEXT) for c, _ in self.history)
        return Work(stream_id, self.epoch, self.seed, entries, (self.sampler.context_timestep,) * len(entries),
                    ((0.0, 0.0),) * len(entries), self.steps, self.f, commit_frames=lat.shape[0], reset_cache=True,
                    inline=lat)
