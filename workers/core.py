"""EngineCore: one pipeline replica's engine loop (one engine core with its P stages).

One thread owns the PipelineEngine. Everything else talks to it through a bounded inbox of typed control
messages (``workers.core_messages``) and gets typed outputs back through one ``emit`` callback, called on
the engine thread: encoded frame batches, failed and evicted streams, each carrying the CoreStats
measured since the last output. The core knows nothing of Prometheus, gRPC or Ray Serve: the same class
runs in the orchestrator's process or inside a Serve replica, and the hosts (``orchestrator.replica_client*``)
only move these structs.

The loop:  apply inbox messages -> engine.step() (schedule, dispatch, collect) -> emit finished chunks (their
frames already encoded by the decode workers). A StageFailure (a dead or hung stage or decode worker, met by
a step or a probe) rebuilds them with the same split and every stream re-caches its recent clean latents on
them; when they cannot be rebuilt the core is broken and evicts every stream with its checkpoint, for the
orchestrator to continue elsewhere.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Callable

import torch

from workers import devicemap
from workers.config import MAX_STEPS, CacheConfig, EngineConfig, GenerationConfig, ParallelConfig
from workers.core_messages import (Call, CloseStream, Consumed, CoreOutput, CoreStats, EndInput, FrameBatch, Message,
                                   OpenStream, PushInput, RestoreStream, SetNoiseScale, SetPrompt, SetSteps, Stop,
                                   StreamEvicted, StreamFailed)
from workers.engine import ChunkOutput, PipelineEngine
from workers.executor import Executor, StageFailure, build_executor
from workers.plan import Capacity
from workers.v2v import video_sampler

log = logging.getLogger("streamgen.core")
MAX_RECOVERIES, RECOVERY_WINDOW_S = 3, 60
INBOX_SIZE = 10_000
PROBE_CACHE = CacheConfig(policy="none", window_frames=1)
"""The readiness probe's cache: a profile forward first fills its stream's cache, and a probe checks health,
not costs, so an idle replica's probe stays one frame of context."""
MAX_STAGE_SAMPLES = 4_096  # stage stats kept for the next output (older ones dropped when nobody takes them)

Emit = Callable[[CoreOutput], None]


def step_list(steps: int) -> tuple[float, ...]:
    """Evenly spaced step list of ``steps`` entries from 1000 (warped by the sampler's shift)."""
    return tuple(1000.0 * (steps - i) / steps for i in range(steps))


class EngineCore:
    def __init__(self, generation: GenerationConfig, engine_cfg: EngineConfig, parallel: ParallelConfig, emit: Emit,
                 index: int = 0, max_ahead: int | None = None, placement_group=None, first_bundle: int = 0,
                 checkpoints: bool = False):
        """Builds the stages (blocking: actors, weights, calibration) and starts the engine thread.

        ``emit``: receives every output, on the engine thread. ``max_ahead``: finished chunks a stream may
        have waiting for ``Consumed``. ``placement_group`` / ``first_bundle``: stage slots reserved by the
        host (a Serve replica). ``checkpoints``: attach the stream's checkpoint to every frame batch."""
        self.generation, self.engine_cfg, self.parallel = generation, engine_cfg, parallel
        self.index, self.max_ahead, self.checkpoints = index, max_ahead, checkpoints
        self._emit = emit
        self.build_executor: Callable[[object], Executor] = \
            lambda split: build_executor(generation, parallel, split, placement_group, first_bundle)
        self._init_engine()
        self._init_state()
        self._thread = threading.Thread(target=self._run, name=f"engine-{index}", daemon=True)
        self._thread.start()

    def _init_engine(self) -> None:
        self.executor = self.build_executor(None)
        self.engine = PipelineEngine(self.generation, self.executor, self.engine_cfg)
        self.engine.calibrate()  # block split from measured costs, and a calibrated latency model
        # memory: each stream's caches and decoder state against what the slots have free after loading
        self.device_map = devicemap.plan(self.generation, self.parallel, self.executor.split())
        self.memory_streams = self.device_map.max_streams(self.executor.free_memory())

    def _init_state(self) -> None:
        self._inbox: queue.Queue[Message] = queue.Queue(maxsize=INBOX_SIZE)
        self._open: set[str] = set()  # streams open here (engine thread only)
        self._stats = CoreStats()
        self._stats_lock = threading.Lock()
        self.broken = False  # its stages could not be rebuilt: out of service
        self.recovering = False  # rebuilding its stages (bounded by placement_timeout_s)
        self._stage_failure: StageFailure | None = None  # met by a call on the engine thread (a probe)
        self._probing = threading.Event()
        self._completed_at_probe = 0  # engine micro-batches completed when the last probe passed
        self._recoveries: list[float] = []  # times of recent stage rebuilds

    # any thread --------------------------------------------------------------------------------------

    def submit(self, msg: Message) -> None:
        """Queue a message for the engine thread (blocks only while the bounded inbox is full)."""
        self._inbox.put(msg)

    def call(self, fn, timeout_s: float):
        """Run ``fn`` on the engine thread and return its result (or raise its exception); TimeoutError if
        the thread does not answer within ``timeout_s`` (the call is then skipped, never run late)."""
        call = Call(fn)
        self._inbox.put(call)
        if not call.done.wait(timeout_s):
            call.given_up.set()
            raise TimeoutError("engine thread did not answer")
        if not call.ok:
            raise call.value
        return call.value

    def probe(self, timeout_s: float) -> bool:
        """Readiness: proof of real work through every stage since the last probe. Micro-batches of streams
        that came back from every stage are that proof; an idle core runs a probe forward on every stage on
        the engine thread within ``timeout_s`` (a stuck loop or a hung stage fails it, so a stall is caught
        by the second probe after it at the latest; a stage failure it meets starts a rebuild, as one met
        by a step). Serving streams thus costs no probe forwards."""
        completed = self.engine.stats.completed
        if completed > self._completed_at_probe and not self.recovering and not self.broken:
            self._completed_at_probe = completed
            return True
        if self._probing.is_set():  # the last probe has not even started: not ready
            return False
        self._probing.set()
        try:
            stats = self.call(lambda: self.executor.profile(self.engine.grid, 1, PROBE_CACHE), timeout_s)
        except (TimeoutError, StageFailure) as err:
            log.warning("replica %d failed its probe: %s", self.index, err)
            return False
        except Exception:  # noqa: BLE001 - any other failure is "not ready" too
            log.warning("replica %d: probe raised", self.index, exc_info=True)
            return False
        finally:
            self._probing.clear()
        self._completed_at_probe = self.engine.stats.completed
        return len(stats) == self.parallel.stages and all(s.compute_s > 0 for s in stats)

    def hand_off(self, timeout_s: float) -> int:
        """Finish what is in flight and deliver it, then evict every stream with its checkpoint (an
        operator's drain). Returns the number of streams evicted."""
        def move_all() -> int:
            for out in self.engine.drain():
                self._deliver(out)
            return self._evict_all("hand-off")

        return self.call(move_all, timeout_s)

    def take_stats(self) -> CoreStats:
        """The stats measured since the last call (or the last output), and start a new count."""
        with self._stats_lock:
            stats, self._stats = self._stats, CoreStats()
        stats.inflight = self.engine.stats.inflight
        return stats

    def max_streams(self, fps: float, steps: int, video: bool = False) -> int:
        """Streams of ``fps`` at ``steps`` (video-to-video ones for ``video``) this replica sustains: by time
        (the latency model) and by memory (every stream's caches and decoder state must fit on every slot)."""
        by_time = self.engine.max_streams(fps, steps, video)
        return by_time if self.memory_streams is None else min(by_time, self.memory_streams)

    def predicted_chunk_latency(self, steps: int, video: bool = False) -> float:
        return self.engine.predicted_chunk_latency(steps, video)

    def capacity(self) -> Capacity:
        """``max_streams`` and ``predicted_chunk_latency`` for every step count and stream kind, as data (what a
        Serve-hosted core reports at each probe)."""
        return self.engine.capacity(MAX_STEPS, self.memory_streams)

    def cache_bytes(self, timeout_s: float = 10.0) -> list[int]:
        """Cache bytes per stage (asks the stages; tests and the leak check)."""
        return self.call(self.executor.cache_bytes, timeout_s)

    def shutdown(self) -> None:
        self._inbox.put(Stop())
        self._thread.join(timeout=10)
        self.executor.shutdown()

    # the engine thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        idle = True
        while True:
            for msg in self._take_inbox(block=idle):
                if isinstance(msg, Stop):
                    return
                self._apply_or_fail(msg)
            if self.broken:  # no stages: only messages (closes, calls) until shut down
                idle = True
                continue
            outputs, progressed = self._step()
            # block on the inbox only when a step neither dispatched nor collected anything and nothing is
            # in flight: then only a message (a new stream, a consumed chunk, a control) can make progress
            idle = not progressed and self.engine.idle
            for out in outputs:
                self._deliver(out)

    def _take_inbox(self, block: bool) -> list[Message]:
        try:
            msgs = [self._inbox.get() if block else self._inbox.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                msgs.append(self._inbox.get_nowait())
            except queue.Empty:
                return msgs

    def _step(self) -> tuple[list[ChunkOutput], bool]:
        """One engine step: (finished chunks, whether it dispatched or collected anything). A failed step
        counts as progress (recovery done, or the streams ended): the loop looks again."""
        dispatched = self.engine.stats.micro_batches
        try:
            if self._stage_failure is not None:
                failure, self._stage_failure = self._stage_failure, None
                raise failure
            outputs = self.engine.step(wait=True)
        except StageFailure as err:
            self._on_stage_failure(err)
            return [], True
        except Exception:  # noqa: BLE001 - fail the streams, keep serving
            log.exception("replica %d: engine step failed", self.index)
            with self._stats_lock:
                self._stats.engine_errors += 1
            self._fail_all("engine error")
            return [], True
        stage_stats = self.engine.stats.last_stage_stats  # set by every collected micro-batch
        if stage_stats:
            with self._stats_lock:
                self._stats.stage_stats = (self._stats.stage_stats + stage_stats)[-MAX_STAGE_SAMPLES:]
            self.engine.stats.last_stage_stats = []
        return outputs, bool(outputs or stage_stats or self.engine.stats.micro_batches != dispatched)

    def _apply_or_fail(self, msg: Message) -> None:
        """Apply ``msg``; one that raises ends its stream (StreamFailed), never the engine thread. A dead stage
        met here (opening a stream on it) is rebuilt by the next step, as one a probe meets."""
        try:
            self._apply(msg)
        except Exception as err:  # noqa: BLE001 - logged; the stream ends, the core serves on
            sid = getattr(msg, "stream_id", None)
            log.exception("replica %d: %s of stream %s failed", self.index, type(msg).__name__, (sid or "-")[:8])
            if isinstance(err, StageFailure):
                self._stage_failure = err
            if sid is not None and not isinstance(msg, CloseStream):
                self._open.discard(sid)
                if sid in self.engine.streams:
                    self.engine.remove_stream(sid)
                self._emit(StreamFailed(sid, f"{type(msg).__name__} failed", self.take_stats()))

    def _apply(self, msg: Message) -> None:
        engine = self.engine
        match msg:
            case OpenStream():
                if self.broken:
                    self._emit(StreamFailed(msg.stream_id, "replica out of service", self.take_stats()))
                    return
                sampler = engine.cfg.sampler
                if msg.video is not None:
                    sampler = video_sampler(sampler, msg.steps)
                elif msg.steps != sampler.num_steps:
                    sampler = replace(sampler, denoising_steps=step_list(msg.steps))
                engine.add_stream(msg.stream_id, msg.prompt, msg.seed, msg.fps, sampler, max_ahead=self.max_ahead,
                                  output=msg.output, video=msg.video)
                self._open.add(msg.stream_id)
            case RestoreStream():
                sid = msg.checkpoint.stream_id
                try:
                    if self.broken:
                        raise RuntimeError("replica out of service")
                    engine.restore(replace(msg.checkpoint, max_ahead=self.max_ahead, output=msg.output))
                except Exception:  # noqa: BLE001 - e.g. this replica failed too: the stream ends
                    log.exception("replica %d could not restore stream %s", self.index, sid[:8])
                    self._emit(StreamFailed(sid, "restore failed", self.take_stats()))
                    return
                self._open.add(sid)
            case CloseStream():
                self._open.discard(msg.stream_id)
                if msg.stream_id in engine.streams:
                    engine.remove_stream(msg.stream_id)
            case SetPrompt() if msg.stream_id in self._open:
                engine.set_prompt(msg.stream_id, msg.prompt)
            case SetSteps() if msg.stream_id in self._open:
                video = engine.streams[msg.stream_id].video is not None
                steps = video_sampler(engine.cfg.sampler, msg.steps).denoising_steps if video else step_list(msg.steps)
                engine.set_steps(msg.stream_id, steps)
            case PushInput() if msg.stream_id in self._open:  # a chunk of the wrong shape fails its stream
                engine.push_input(msg.stream_id, torch.as_tensor(msg.frames), msg.meta, msg.due)
            case EndInput() if msg.stream_id in self._open:
                engine.end_input(msg.stream_id)
            case SetNoiseScale() if msg.stream_id in self._open:
                engine.set_noise_scale(msg.stream_id, msg.noise_scale)
            case Consumed() if msg.stream_id in self._open:
                engine.consumed(msg.stream_id, msg.chunks)
            case Call():
                self._run_call(msg)

    def _run_call(self, call: Call) -> None:
        try:
            if call.given_up.is_set():
                return
            if not self.broken:
                self.engine.apply_controls()  # the call sees every message sent before it in effect (a close)
            call.value, call.ok = call.fn(), True
        except StageFailure as err:  # a probe met a dead or hung stage: the loop rebuilds, as for a step
            self._stage_failure = err
            call.value = err
        except Exception as err:  # noqa: BLE001 - not swallowed: Call.value is raised in the caller
            call.value = err
        finally:
            call.done.set()

    def _deliver(self, out: ChunkOutput) -> None:
        if out.stream_id not in self._open:  # closed meanwhile
            return
        with self._stats_lock:
            self._stats.chunk_latency_s.append(out.latency_s)
            self._stats.decode_s.append(out.decode_s)
        checkpoint = self.engine.checkpoint(out.stream_id) if self.checkpoints else None
        self._emit(FrameBatch(out.stream_id, out.chunk, out.prompt_revision, out.frames or [], out.width, out.height,
                              out.latency_s, time.monotonic(), checkpoint, self.take_stats(), out.input,
                              out.repeated))

    def _on_stage_failure(self, err: StageFailure) -> None:
        log.warning("replica %d: %s; rebuilding its stages", self.index, err)
        with self._stats_lock:
            self._stats.stage_errors[err.kind] = self._stats.stage_errors.get(err.kind, 0) + 1
        now = time.monotonic()
        self._recoveries = [t for t in self._recoveries if now - t < RECOVERY_WINDOW_S] + [now]
        if len(self._recoveries) > MAX_RECOVERIES:  # a failure that rebuilding does not cure
            log.error("replica %d: %d failures in %d s; ending its streams, out of service", self.index,
                      len(self._recoveries), RECOVERY_WINDOW_S)
            self.executor.kill()  # its in-flight calls would raise the same failure at every step
            self.broken = True  # the fleet replaces it
            self.engine.abandon_inflight()
            self._fail_all("repeated stage failures")
            return
        self._recover()

    def _recover(self) -> None:
        """New stages with the same split; streams re-cache their recent clean latents on them and go on
        from their first unfinished chunk. If the stages cannot be rebuilt, the core is broken and evicts
        every stream."""
        self.recovering = True
        try:
            split = self.executor.split()
            started = time.monotonic()
            self.executor.kill()  # every stage: survivors may be stuck in recv from the dead one, or stopped
            try:
                self.executor = self.build_executor(split)
                self.engine.replace_executor(self.executor)
            except Exception:  # noqa: BLE001 - no slots, or the new stages failed: move the streams
                log.exception("replica %d: could not rebuild its stages; moving its streams", self.index)
                self.broken = True
                self.engine.abandon_inflight()
                self._evict_all("stages could not be rebuilt")
                return
            with self._stats_lock:
                self._stats.migrations += len(self.engine.streams)
                self._stats.stage_rebuild_s.append(time.monotonic() - started)
        finally:
            self.recovering = False

    def _evict_all(self, reason: str) -> int:
        """Every stream leaves with its checkpoint; its caches here are freed by the next step (if any)."""
        stream_ids = [sid for sid in self._open if sid in self.engine.streams]
        for sid in stream_ids:
            checkpoint = self.engine.checkpoint(sid)
            self._open.discard(sid)
            self.engine.remove_stream(sid)
            self._emit(StreamEvicted(sid, checkpoint, reason, self.take_stats()))
        return len(stream_ids)

    def _fail_all(self, reason: str) -> None:
        for sid in list(self._open):
            self._open.discard(sid)
            if sid in self.engine.streams:
                self.engine.remove_stream(sid)
            self._emit(StreamFailed(sid, reason, self.take_stats()))
        try:
            self.engine.drain()
        except Exception:  # noqa: BLE001 - the executor is broken; nothing left to collect
            log.warning("replica %d: nothing to collect after the failure", self.index, exc_info=True)
            self.engine.abandon_inflight()

