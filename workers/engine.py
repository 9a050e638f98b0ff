"""PipelineEngine: one per pipeline replica. Its loop reads like the architecture diagram:

    step():  apply controls -> schedule (EDF micro-batches) -> dispatch (<= max_inflight) -> flush -> collect -> update

Executors (``workers.executor``) share one contract: in-process (all stages in this process) and Ray
(one actor per stage and decode worker, torch.distributed between them). The engine owns the per-stream
sampling programs (bookkeeping only); stages own weights, caches, the text encoder (stage 0) and the
latents in flight: the last stage sends each next step's latents to stage 0 and finished chunks to the
decode workers, so a micro-batch comes back to the engine only with the clean latents of the chunks it
finished, and their frames come back encoded from the decode workers.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from workers.config import EngineConfig, GenerationConfig, SamplerConfig
from workers.batch import DecodedChunk, Finished, MicroBatch, OutputFormat, StageStats, Work
from workers.executor import Executor
from workers.plan import Capacity, LatencyModel, balanced_split, batch_streams, stage_costs
from workers.stream import StreamProgram
from workers.v2v import VideoInput, VideoParams


class LostMicroBatches(RuntimeError):
    """Micro-batches the engine waits for that its executor no longer holds (lost with an error)."""


CALIBRATE_REPEATS = 3
"""Timed forwards per stage (and decodes) at calibration; the fastest counts. One sample of a small model's
blocks (milliseconds) can land on another process's time slice and skew the split it picks."""


@dataclass
class ChunkOutput:
    """A finished chunk of one stream."""

    stream_id: str
    chunk: int
    latents: torch.Tensor
    """Clean latents [f, C, h, w]."""
    frames: list[bytes] | None
    """Its video frames, encoded per the stream's output format (None: the executor has no decode workers)."""
    prompt_revision: int
    latency_s: float = 0.0
    """From the dispatch of the chunk's first denoising step to its frames (or clean latents without decode)."""
    width: int = 0
    height: int = 0
    decode_s: float = 0.0
    """Decode plus encode seconds on its decode worker."""
    started: float | None = None
    """When its first denoising step was dispatched (the engine's clock)."""
    input: object = None
    """Video-to-video: what the caller pushed with the input chunk this output restyles."""
    repeated: bool = False
    """Video-to-video: the similarity filter skipped the input chunk; these are the previous output's frames."""


@dataclass
class _Stream:
    stream_id: str
    program: StreamProgram
    prompt: str
    fps: float
    started: float
    output: OutputFormat = field(default_factory=OutputFormat)
    frames_per_latent: int = 4  # video frames per latent frame (the VAE's temporal stride)
    revision: int = 0
    send_text: bool = True  # the next micro-batch carries this stream's text to every stage
    pending: list = field(default_factory=list)  # controls waiting for the stream to drain
    max_ahead: int | None = None  # chunks produced and not yet consumed before the stream waits
    produced: int = 0  # chunks whose last step is issued (counted at issue, so the bound holds in flight)
    delivered: int = 0
    consumed: int = 0
    outstanding: dict[int, Work] = field(default_factory=dict)  # micro-batch seq -> work
    chunk_started: dict[int, float] = field(default_factory=dict)  # chunk -> dispatch time of its step 0
    decoding: dict[int, ChunkOutput] = field(default_factory=dict)  # finished chunks waiting for their frames
    video: VideoInput | None = None  # video-to-video: the input side (filter, noise controller, output order)
    outputs: dict[int, ChunkOutput] = field(default_factory=dict)  # video: finished, waiting for their turn
    input_due: dict[int, float] = field(default_factory=dict)  # video: chunk -> when its first frame is due

    def due(self) -> float:
        """When the stream's next unfinished chunk is due (earliest deadline first)."""
        if self.video is not None:
            return min(self.input_due.values(), default=float("inf"))
        frames_per_chunk = self.frames_per_latent * self.program.f
        return self.started + self.program.next_chunk * frames_per_chunk / self.fps


@dataclass
class StreamCheckpoint:
    """What another engine (another process or node) needs to continue a stream: small, picklable, taken
    after each finished chunk. Recovery re-caches ``history`` under ``prompt`` on the new stages and goes
    on from ``next_chunk`` with the same noise; the decoder is re-warmed on ``history``."""

    stream_id: str
    prompt: str
    revision: int
    fps: float
    age_s: float
    """Seconds since the stream started, so deadlines carry over to another clock."""
    sampler: SamplerConfig
    seed: int
    next_chunk: int
    """The oldest chunk not yet finished."""
    history: list[tuple[int, torch.Tensor]]
    """Recent clean latents (chunk, [f, C, h, w]), at most ``cache.recache_frames`` frames."""
    max_ahead: int | None = None
    output: OutputFormat | None = None
    video: VideoParams | None = None
    """Video-to-video: its input settings (the restored stream takes new input from ``next_chunk`` on)."""
    inputs_received: int = 0
    """Video-to-video: input chunks it had received (the next is not a stream's first)."""


@dataclass
class EngineStats:
    forwards: int = 0
    micro_batches: int = 0
    chunks: int = 0
    last_stage_stats: list[StageStats] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)
    idle_s: list[float] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    inflight: int = 0
    """Micro-batches in flight after the last dispatch."""
    max_inflight: int = 0
    ready_streams: int = 0
    """Streams that were ready but not scheduled at the last dispatch (the engine's queue depth)."""
    chained: int = 0
    """Forwards issued while the forward they take latents from was still in flight."""
    completed: int = 0
    """Micro-batches that came back from every stage (proof of real work, for readiness)."""

    @property
    def compute_per_micro_batch(self) -> list[float]:
        """Per stage: compute seconds per completed micro-batch so far (a real or a simulated executor's)."""
        return [s / max(self.completed, 1) for s in self.compute_s]


class PipelineEngine:
    def __init__(self, cfg: GenerationConfig, executor: Executor, engine_cfg: EngineConfig | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.engine_cfg = engine_cfg or EngineConfig()
        self.executor = executor
        self.clock = clock
        lh, lw = cfg.model.latent_grid(cfg.height, cfg.width)
        self.latent_shape = (cfg.model.in_channels, lh, lw)
        self.grid = cfg.model.token_grid(cfg.height, cfg.width)
        self.streams: dict[str, _Stream] = {}
        self.controls: deque[tuple[str, str, object]] = deque()
        self.latency = LatencyModel(executor.num_stages, executor.decode_workers, executor.decode_shared)
        self.stats = EngineStats(compute_s=[0.0] * executor.num_stages, idle_s=[0.0] * executor.num_stages,
                                 bytes_sent=[0] * executor.num_stages)
        self._seq = 0
        self._inflight: dict[int, MicroBatch] = {}
        self.block_cost: dict[int, float] = {}  # EWMA seconds per token, per block
        self.stage_overhead: dict[int, float] = {}  # EWMA non-block seconds per token, per stage
        self.rebalances = 0
        self.recoveries = 0
        self._target_split: list[tuple[int, int]] | None = None
        self._last_check = 0  # micro-batches // rebalance_every at the last split check
        self._proposed_split: list[tuple[int, int]] | None = None  # the last check's plan, awaiting a second

    # control plane ---------------------------------------------------------------------------------

    def add_stream(self, stream_id: str, prompt: str, seed: int, fps: float = 16.0,
                   sampler: SamplerConfig | None = None, max_ahead: int | None = None,
                   output: OutputFormat | None = None, video: VideoParams | None = None) -> None:
        """Open a stream. With ``max_ahead`` it stops being scheduled while that many finished chunks
        are waiting for ``consumed`` (the consumer's pace bounds the work done ahead of it). ``output``:
        how its frames are encoded (default JPEG). ``video``: a video-to-video stream, whose chunks come
        from ``push_input`` (``sampler`` then holds its step list)."""
        if stream_id in self.streams:
            raise ValueError(f"stream {stream_id!r} already exists")
        sampler = sampler or self.cfg.sampler
        program = StreamProgram(sampler, self.cfg.cache, seed, self.latent_shape, video=video is not None)
        output = output or OutputFormat()
        self.executor.open_stream(stream_id, self.cfg.cache, output, video=video is not None)
        t = self.cfg.model.vae_stride[0]
        self.streams[stream_id] = _Stream(stream_id, program, prompt, fps, self.clock(), output, t,
                                          max_ahead=max_ahead,
                                          video=None if video is None else VideoInput(video, seed, sampler.chunk_frames, t))

    def push_input(self, stream_id: str, frames: torch.Tensor, meta: object = None, due: float | None = None) -> None:
        """Video-to-video: the stream's next input chunk, uint8 frames [N, H, W, 3] at its size (N: see
        ``VideoInput.frames_needed``). ``meta`` comes back on its output; ``due``: when its first output frame
        is due (the engine's clock; earliest deadline first). A chunk the similarity filter skips costs no
        forward: its output is the previous one again, in order."""
        stream = self.streams[stream_id]
        chunk = stream.video.push(frames, meta, stream.program)
        if chunk is None:
            stream.produced += 1  # an output to come, with no work
        else:
            stream.input_due[chunk] = self.clock() if due is None else due

    def end_input(self, stream_id: str) -> None:
        """Video-to-video: no more input; the chunks in flight still come out."""
        self.streams[stream_id].program.end_input()

    def set_noise_scale(self, stream_id: str, noise_scale: float) -> None:
        """Video-to-video: the noise controller's s_init, from the next input chunk on."""
        self.streams[stream_id].video.controller.s_init = noise_scale

    def consumed(self, stream_id: str, chunks: int = 1) -> None:
        """The consumer took ``chunks`` finished chunks of the stream (frees its look-ahead)."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.consumed += chunks

    @property
    def idle(self) -> bool:
        """Nothing in flight, nothing being decoded."""
        return not self._inflight and not self.executor.decoding

    def remove_stream(self, stream_id: str) -> None:
        """Control: end the stream now; its in-flight results are discarded, caches freed on every stage."""
        self.controls.append((stream_id, "remove", None))

    def set_prompt(self, stream_id: str, prompt: str) -> None:
        """Control: switch prompt. Unfinished chunks restart under it after a re-cache of recent latents."""
        self.controls.append((stream_id, "prompt", prompt))

    def set_steps(self, stream_id: str, steps: tuple[float, ...]) -> None:
        """Control: change the denoising step list from the next unfinished chunk on."""
        self.controls.append((stream_id, "steps", tuple(steps)))

    def apply_controls(self) -> None:
        """Apply the controls queued so far (each step starts with this; so does the core before it runs a
        call, which thus sees every message sent before it, e.g. a closed stream's caches freed)."""
        for _ in range(len(self.controls)):
            sid, kind, value = self.controls.popleft()
            stream = self.streams.get(sid)
            if stream is None:
                continue
            if kind == "remove":
                del self.streams[sid]
                self.executor.close_stream(sid)
            else:
                stream.pending.append((kind, value))
        for stream in self.streams.values():
            if stream.pending and stream.program.outstanding == 0:
                self._apply_pending(stream)

    # the loop ---------------------------------------------------------------------------------------

    def step(self, wait: bool = True) -> list[ChunkOutput]:
        """One iteration: controls, then fill the pipeline, then collect what finished."""
        self.apply_controls()
        self._maybe_rebalance()
        try:
            while self._target_split is None and len(self._inflight) < self.executor.max_inflight:
                mb = self._schedule()
                if mb is None:
                    break
                self._dispatch(mb)
        finally:  # what was submitted goes out even if scheduling the next one raised: the engine waits for it
            self.executor.flush()
        return self._collect(wait=wait and not self.idle)

    def _collect(self, wait: bool) -> list[ChunkOutput]:
        got = self.executor.collect(wait)
        outputs = []
        for done in got.finished:
            outputs += self._update(done)
        for decoded in got.decoded:
            outputs += self._decoded(decoded)
        for stream in self.streams.values():  # video: skipped chunks whose turn came
            if stream.video is not None and stream.video.order and stream.video.order[0][1] is None:
                outputs += self._release(stream)
        return outputs

    def run_chunks(self, n_chunks: dict[str, int], on_output: Callable[[ChunkOutput], None] | None = None,
                   max_steps: int = 100_000) -> dict[str, list[ChunkOutput]]:
        """Drive the loop until each listed stream has produced n chunks (tests, benchmarks)."""
        got: dict[str, list[ChunkOutput]] = {sid: [] for sid in n_chunks}
        for _ in range(max_steps):
            if all(len(got[s]) >= n for s, n in n_chunks.items()):
                return got
            for out in self.step():
                if out.stream_id in got and len(got[out.stream_id]) < n_chunks[out.stream_id]:
                    got[out.stream_id].append(out)
                    if on_output:
                        on_output(out)
        raise RuntimeError(f"run_chunks did not finish in {max_steps} steps")

    def replace_executor(self, executor: Executor) -> None:
        """Recovery: the old executor's stages are gone with every micro-batch in flight. Open every
        stream on ``executor`` and rebuild its caches by re-caching its recent clean latents; unfinished
        chunks start over (same noise), finished ones are not redone."""
        if executor.num_stages != self.executor.num_stages:
            raise ValueError("a replacement executor must have the same number of stages")
        self.executor = executor
        self.abandon_inflight()
        self._target_split = None
        for stream in self.streams.values():
            stream.outstanding.clear()
            stream.chunk_started.clear()
            stream.program.restart_unfinished(lost=True)
            stream.produced = stream.delivered + len(stream.decoding)
            stream.send_text = True
            # the decoder state is rebuilt on the chunks already decoded; chunks whose frames were lost with
            # the old decode workers are decoded again from the latents kept here
            lost = set(stream.decoding)
            executor.open_stream(stream.stream_id, self.cfg.cache, stream.output,
                                 warm=[x0 for c, x0 in stream.program.history if c not in lost],
                                 video=stream.video is not None)
            for chunk in sorted(lost):
                executor.redecode(stream.stream_id, chunk, stream.decoding[chunk].latents)
        self.recoveries += 1

    def checkpoint(self, stream_id: str) -> StreamCheckpoint:
        """The stream's recovery point now (cheap: references to immutable clean latents). It resumes at the
        oldest chunk whose frames have not come out: a chunk finished but still decoding is done again."""
        stream = self.streams[stream_id]
        prog = stream.program
        next_chunk = min([prog.first_unfinished(), *stream.decoding, *stream.outputs])
        history = [(c, x0) for c, x0 in prog.history if c < next_chunk]
        video = None if stream.video is None else VideoParams(stream.video.controller.s_init,
                                                             stream.video.controller.motion_aware,
                                                             stream.video.filter.threshold)
        return StreamCheckpoint(stream_id, stream.prompt, stream.revision, stream.fps, self.clock() - stream.started,
                                prog.sampler, prog.seed, next_chunk, history, stream.max_ahead, stream.output, video,
                                stream.video.received if stream.video is not None else 0)

    def restore(self, ckpt: StreamCheckpoint) -> None:
        """Continue a stream from a checkpoint taken by another engine: re-cache its recent clean latents
        under its prompt, then unfinished chunks start over with the same noise."""
        if ckpt.stream_id in self.streams:
            raise ValueError(f"stream {ckpt.stream_id!r} already exists")
        program = StreamProgram(ckpt.sampler, self.cfg.cache, ckpt.seed, self.latent_shape,
                                start_chunk=ckpt.next_chunk, history=list(ckpt.history), video=ckpt.video is not None)
        output = ckpt.output or OutputFormat()
        # causal convolutions: the decoder's caches are warmed on the recent latents
        self.executor.open_stream(ckpt.stream_id, self.cfg.cache, output, warm=[x0 for _, x0 in ckpt.history],
                                  video=ckpt.video is not None)
        t = self.cfg.model.vae_stride[0]
        video = None
        if ckpt.video is not None:  # new input goes on from the next input chunk (those in flight are lost)
            video = VideoInput(ckpt.video, ckpt.seed, ckpt.sampler.chunk_frames, t)
            video.received = ckpt.inputs_received
        self.streams[ckpt.stream_id] = _Stream(ckpt.stream_id, program, ckpt.prompt, ckpt.fps,
                                               self.clock() - ckpt.age_s, output, t, revision=ckpt.revision,
                                               max_ahead=ckpt.max_ahead, video=video)

    def abandon_inflight(self) -> None:
        """Forget micro-batches that will never come back (their stages are gone)."""
        self._inflight.clear()
        self.stats.inflight = 0

    def drain(self) -> list[ChunkOutput]:
        """Collect every in-flight micro-batch and every decode without dispatching more. Raises
        ``LostMicroBatches`` when a wait brings nothing back and the executor holds nothing more to wait for
        (its results were lost with an error): waiting again would spin."""
        outputs = []
        while not self.idle:
            before = (len(self._inflight), self.executor.decoding)
            outputs += self._collect(wait=True)
            if (len(self._inflight), self.executor.decoding) == before:
                raise LostMicroBatches(f"micro-batches {sorted(self._inflight)} will not come back")
        return outputs

    # helpers ----------------------------------------------------------------------------------------

    def _apply_pending(self, stream: _Stream) -> None:
        prog = stream.program
        for kind, value in stream.pending:
            if kind == "prompt":
                stream.prompt = value
                stream.revision += 1
                stream.send_text = True
                prog.restart_unfinished()
            elif kind == "steps":  # unfinished chunks restart with the new list; cache rebuilt as on a prompt change
                prog.change_steps(value)
        stream.pending.clear()

    def _schedule(self) -> MicroBatch | None:
        """Earliest-deadline-first among ready streams, those with nothing in flight to wait for first;
        sized so P micro-batches can be in flight."""
        ready = [s for s in self.streams.values() if not s.pending and s.program.ready()
                 and (s.max_ahead is None or s.produced - s.consumed < s.max_ahead)]
        if not ready:
            return None
        # streams with nothing in flight first (earliest deadline first), then chained ones by the age of the
        # forward they wait on: the oldest is the likeliest to be back when stage 0 gets to this one
        ready.sort(key=lambda s: (s.program.chained(), max(s.outstanding, default=-1) if s.program.chained() else -1,
                                  s.due(), s.stream_id))
        size = batch_streams(len(self.streams), self.executor.num_stages, self.engine_cfg.max_batch_streams)
        self.stats.ready_streams = max(0, len(ready) - size)
        works, prompts, now = [], {}, self.clock()
        for stream in ready[:size]:
            self.stats.chained += stream.program.chained()
            work = stream.program.next_work(stream.stream_id)
            stream.outstanding[self._seq] = work
            stream.produced += len(work.finishes())
            for chunk, step in work.entries:
                if step == 0:
                    stream.chunk_started.setdefault(chunk, now)
            works.append(work)
            if stream.send_text:
                prompts[stream.stream_id] = stream.prompt
                stream.send_text = False
        every = self.engine_cfg.profile_every
        mb = MicroBatch(self._seq, works, self.grid, prompts, profile=bool(every) and self._seq % every == 0)
        self._seq += 1
        return mb

    def _dispatch(self, mb: MicroBatch) -> None:
        self.executor.submit(mb)  # first: a micro-batch whose submit raised is not waited for (nor sent)
        self._inflight[mb.seq] = mb
        self.stats.micro_batches += 1
        self.stats.forwards += len(mb.segments)
        self.stats.inflight = len(self._inflight)
        self.stats.max_inflight = max(self.stats.max_inflight, self.stats.inflight)

    def _update(self, done: Finished) -> list[ChunkOutput]:
        mb = self._inflight.pop(done.seq)
        self.stats.completed += 1
        self.stats.inflight = len(self._inflight)
        stats = done.stats
        for s in stats:
            self.latency.observe(s.stage, s.tokens, s.compute_s - s.encode_s)
            if s.encode_s > 0 and done.encoded:
                self.latency.observe_encode(s.encode_s / len(done.encoded))
            self.stats.compute_s[s.stage] += s.compute_s
            self.stats.idle_s[s.stage] += s.idle_s
            self.stats.bytes_sent[s.stage] += s.bytes_sent
        self.stats.last_stage_stats = stats
        self._observe_costs(stats)
        outputs = []
        for sid, (chunk, z) in done.encoded.items():
            if sid in self.streams:
                self.streams[sid].program.encoded(chunk, z)
        for work, finished in zip(mb.segments, done.chunks):
            stream = self.streams.get(work.stream_id)
            if stream is None or stream.outstanding.pop(done.seq, None) is None:  # removed or lost meanwhile
                continue
            for chunk, x0 in stream.program.complete(work, finished):
                stream.input_due.pop(chunk, None)
                out = ChunkOutput(stream.stream_id, chunk, x0, None, stream.revision,
                                  started=stream.chunk_started.pop(chunk, None))
                if self.executor.decode_workers:  # its frames come from the decode worker
                    stream.decoding[chunk] = out
                    continue
                outputs += self._finish(stream, out)
        return outputs

    def _decoded(self, decoded: DecodedChunk) -> list[ChunkOutput]:
        stream = self.streams.get(decoded.stream_id)
        out = stream.decoding.pop(decoded.chunk, None) if stream is not None else None
        if out is None:  # removed meanwhile
            return []
        out.frames, out.width, out.height, out.decode_s = decoded.frames, decoded.width, decoded.height, \
            decoded.decode_s
        self.latency.observe_decode(decoded.decode_s)
        return self._finish(stream, out)

    def _finish(self, stream: _Stream, out: ChunkOutput) -> list[ChunkOutput]:
        """A chunk's output is complete; a video stream's go out in input order (with skipped chunks')."""
        out.latency_s = 0.0 if out.started is None else self.clock() - out.started
        self.stats.chunks += 1
        if stream.video is None:
            stream.delivered += 1
            return [out]
        stream.outputs[out.chunk] = out
        return self._release(stream)

    def _release(self, stream: _Stream) -> list[ChunkOutput]:
        outputs = []
        for meta, out, repeated, frames in stream.video.release(stream.outputs):
            if repeated:  # the previous output again: frame for frame, or its last frame for each input frame
                shown = out.frames if out.frames is None or len(out.frames) == frames else [out.frames[-1]] * frames
                out = replace(out, frames=shown, repeated=True, latency_s=0.0, decode_s=0.0)
            outputs.append(replace(out, input=meta))
            stream.delivered += 1
        return outputs

    # block scheduler and latency model ----------------------------------------------------------------

    def calibrate(self) -> list[tuple[int, int]]:
        """Time every block on one chunk, feed the latency model, and apply the best split now (unless
        ``rebalance_every`` is 0: a fixed split). Call before streams are added (start-up); returns the split
        in use."""
        if self._inflight:
            raise RuntimeError("calibrate with micro-batches in flight")
        stats = self.executor.profile(self.grid, self.cfg.sampler.chunk_frames, self.cfg.cache, CALIBRATE_REPEATS)
        self._observe_costs(stats)
        for s in stats:
            self.latency.observe(s.stage, s.tokens, s.compute_s)
        decode_s = self.executor.profile_decode(self.latent_shape, self.cfg.sampler.chunk_frames, CALIBRATE_REPEATS)
        if decode_s is not None:
            self.latency.observe_decode(decode_s)
        plan = self.planned_split() if self.engine_cfg.rebalance_every else None  # 0: the split stays as built
        if plan is not None and plan[0] != self.executor.split():
            self.executor.rebalance(plan[0])
            self.rebalances += 1
        return self.executor.split()

    def _forwards_and_tokens(self, num_steps: int) -> tuple[float, int]:
        """Forwards per finished chunk and tokens per forward, for this engine's mode and resolution."""
        f = self.cfg.sampler.chunk_frames
        tokens = f * self.grid[0] * self.grid[1]
        if self.cfg.sampler.mode == "sequential":
            return num_steps + 1.0, tokens
        return 1.0, (num_steps + 1) * tokens  # one forward per tick: context + one entry per step

    def predicted_chunk_latency(self, num_steps: int | None = None, video: bool = False) -> float:
        """Seconds from a chunk's first forward (its encode, for a ``video`` stream) to its frames (decode
        included), from the latency model."""
        steps = num_steps or self.cfg.sampler.num_steps
        forwards, tokens = self._forwards_and_tokens(steps)
        if self.cfg.sampler.mode == "stream_batch":  # a chunk waits `steps` ticks of its lane
            encode = self.latency.encode_time() if video else 0.0
            return encode + steps * self.latency.forward_latency(tokens) + self.latency.decode_time()
        return self.latency.chunk_latency(forwards, tokens, video)

    @property
    def video_frames_per_chunk(self) -> int:
        return self.cfg.model.vae_stride[0] * self.cfg.sampler.chunk_frames

    def frame_rate(self, num_steps: int | None = None, video: bool = False, streams_per_batch: int = 1) -> float:
        """Video frames per second this pipeline sustains over all its streams (decode included; all of them
        video-to-video for ``video``) with micro-batches of ``streams_per_batch`` streams, from the latency
        model."""
        forwards, tokens = self._forwards_and_tokens(num_steps or self.cfg.sampler.num_steps)
        return self.latency.frame_rate(self.video_frames_per_chunk, forwards, tokens, streams_per_batch, video)

    def max_streams(self, fps: float, num_steps: int | None = None, video: bool = False) -> int:
        """Streams of ``fps`` video frames/s each (video-to-video ones for ``video``) this pipeline sustains,
        from the latency model, batched as the scheduler batches them."""
        steps = num_steps or self.cfg.sampler.num_steps
        forwards, tokens = self._forwards_and_tokens(steps)
        return self.latency.max_streams(fps, self.video_frames_per_chunk, forwards, tokens,
                                        self.engine_cfg.max_batch_streams, video)

    def capacity(self, max_steps: int, memory_streams: int | None = None) -> Capacity:
        """``max_streams`` and ``predicted_chunk_latency`` for 1..``max_steps`` steps and both stream kinds, as
        data (``memory_streams``: the memory cap the caller applies)."""
        keys = [(n, video) for n in range(1, max_steps + 1) for video in (False, True)]
        sizes = range(1, self.engine_cfg.max_batch_streams + 1)
        return Capacity({k: tuple(self.frame_rate(*k, size) for size in sizes) for k in keys},
                        {k: self.predicted_chunk_latency(*k) for k in keys}, self.executor.num_stages, memory_streams)

    def _observe_costs(self, stats: list[StageStats]) -> None:
        d = self.engine_cfg.cost_decay
        for s in stats:
            if not s.block_s or s.tokens == 0:
                continue
            for b, sec in s.block_s.items():
                prev = self.block_cost.get(b)
                value = sec / s.tokens
                self.block_cost[b] = value if prev is None else d * prev + (1 - d) * value
            extra = max(0.0, s.compute_s - sum(s.block_s.values())) / s.tokens
            prev = self.stage_overhead.get(s.stage)
            self.stage_overhead[s.stage] = extra if prev is None else d * prev + (1 - d) * extra

    def planned_split(self) -> tuple[list[tuple[int, int]], float, float] | None:
        """(best split, its slowest stage, the current split's slowest stage) from measured costs, or None."""
        n = self.cfg.model.num_layers
        if len(self.block_cost) < n:
            return None
        costs = [self.block_cost[b] for b in range(n)]
        first = self.stage_overhead.get(0, 0.0)
        last = self.stage_overhead.get(self.executor.num_stages - 1, 0.0)
        if self.executor.decode_shared:  # decode shares the last stage's device: its time per token counts there
            forwards, tokens = self._forwards_and_tokens(self.cfg.sampler.num_steps)
            last += self.latency.decode_time() / forwards / tokens
        split = balanced_split(costs, self.executor.num_stages, first, last)
        best = max(stage_costs(split, costs, first, last))
        return split, best, max(stage_costs(self.executor.split(), costs, first, last))

    def _maybe_rebalance(self) -> None:
        """Re-plan the block split when measured stage times drift; apply it once the pipeline drains. A move
        drains the pipeline, so it needs the same plan at two checks in a row: one slow block timing (a
        preempted thread) must not move blocks."""
        every = self.engine_cfg.rebalance_every
        due = self.stats.micro_batches // every if every else 0  # a step may dispatch several: count crossings
        if self._target_split is None and due and due != self._last_check:
            self._last_check = due
            plan, proposed, self._proposed_split = self.planned_split(), self._proposed_split, None
            if plan is not None:
                split, best, now = plan
                if split != self.executor.split() and now > (1 + self.engine_cfg.rebalance_threshold) * best:
                    self._target_split, self._proposed_split = (split, None) if split == proposed else (None, split)
        if self._target_split is not None and not self._inflight:
            self.executor.rebalance(self._target_split)
            self._target_split = None
            self.rebalances += 1

