"""EngineHost: one pipeline replica driven by its own thread, so GPU / CPU work never blocks the gRPC
event loop. The server talks to it through a bounded inbox; finished chunks come back through a
per-stream sink (called on the engine thread; the server hops them onto its loop).

Frames are decoded (in the engine) and encoded (JPEG / raw RGB) on this thread too.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from PIL import Image

from orchestrator.config import ServiceConfig
from orchestrator.metrics import Metrics
from orchestrator.types import Encoding, StreamSpec
from workers.engine import PipelineEngine
from workers.executor import InProcessExecutor, StageFailure
from workers.model.text import build_text_encoder
from workers.model.vae import build_vae

log = logging.getLogger("streamgen.replica")
MAX_RECOVERIES, RECOVERY_WINDOW_S = 3, 60


@dataclass
class FrameBatch:
    """One finished chunk of one stream, encoded."""

    chunk: int
    prompt_revision: int
    frames: list[bytes]
    width: int
    height: int
    latency_s: float
    ready_at: float
    checkpoint: object = None
    """The stream's StreamCheckpoint after this chunk (replicas in their own process ship it, so the
    orchestrator can continue the stream elsewhere if that process dies)."""


class EngineFailure(Exception):
    """The engine loop failed while the stream was in it."""


Sink = Callable[[FrameBatch | EngineFailure], None]


@dataclass
class Handoff:
    """A stream leaving a replica whose stages could not be rebuilt."""

    stream_id: str
    spec: StreamSpec
    utilisation: float
    sink: Sink
    state: object
    """The live engine stream (driver replicas), its latest StreamCheckpoint (a replica process that is
    gone), or None (no chunk finished yet: it starts over)."""
    prompt_goal: tuple[str, int] | None = None
    """(prompt, revision) the stream's controls asked for last, where they may not have been applied yet."""


class StreamBook:
    """The streams a replica holds (sink and spec of each) and the admission load they carry. Thread-safe:
    the server, the engine thread and the fleet loop all read it."""

    def __init__(self):
        self._sinks: dict[str, tuple[Sink, StreamSpec]] = {}
        self._loads: dict[str, float] = {}
        self._lock = threading.Lock()
        self.rehome: Callable[["StreamBook", list[Handoff]], None] | None = None  # set by the service

    def _register(self, stream_id: str, spec: StreamSpec, utilisation: float, sink: Sink) -> None:
        with self._lock:
            self._loads[stream_id] = utilisation
            self._sinks[stream_id] = (sink, spec)

    def _unregister(self, stream_id: str) -> tuple[Sink, StreamSpec, float] | None:
        with self._lock:
            entry = self._sinks.pop(stream_id, None)
            load = self._loads.pop(stream_id, 0.0)
        return None if entry is None else (*entry, load)

    def _send_away(self, handoffs: list[Handoff]) -> None:
        """Streams leaving this replica: the service continues each elsewhere (or ends it)."""
        if self.rehome is None:
            for h in handoffs:
                h.sink(EngineFailure("replica lost"))
            return
        self.rehome(self, handoffs)

    def load(self) -> float:
        with self._lock:
            return sum(self._loads.values())

    def active(self) -> int:
        with self._lock:
            return len(self._sinks)


class EngineHost(StreamBook):
    def __init__(self, cfg: ServiceConfig, metrics: Metrics, index: int = 0, placement_group=None,
                 first_bundle: int = 0, checkpoints: bool = False):
        """``placement_group`` / ``first_bundle``: stage slots reserved by the caller (a Serve replica);
        ``checkpoints``: attach a StreamCheckpoint to every delivered chunk."""
        self.cfg = cfg
        self.metrics = metrics
        self.index = index
        self._placement = (placement_group, first_bundle)
        self.checkpoints = checkpoints
        gen = cfg.generation
        self.executor = self._build_executor(None)
        self.engine = PipelineEngine(gen, self.executor, build_text_encoder(gen.model, gen.text_encoder_path),
                                     build_vae(gen.model, gen.vae_path), cfg.engine)
        self.engine.calibrate()  # block split from measured costs, and a calibrated latency model
        self._inbox: queue.Queue = queue.Queue(maxsize=10_000)
        StreamBook.__init__(self)
        self.opened = 0  # streams ever opened on the engine (tests: bad input makes zero engine calls)
        self.draining = False  # set by the autoscaler: no new streams; removed when the last one ends
        self.broken = False  # its stages could not be rebuilt: out of service
        self.healthy = True  # the last readiness probe passed
        self.recovering = False  # rebuilding its stages (bounded by placement_timeout_s)
        self._stage_failure: StageFailure | None = None  # met by a call on the engine thread (a probe)
        self._probing = threading.Event()
        self._recoveries: list[float] = []  # times of recent stage rebuilds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine-{index}", daemon=True)
        self._thread.start()

    def _build_executor(self, split):
        gen, cfg = self.cfg.generation, self.cfg
        if cfg.executor == "ray":
            from workers.ray_executor import RayExecutor

            return RayExecutor(gen.model, cfg.stages, split, threads_per_stage=cfg.threads_per_stage,
                               num_cpus_per_stage=cfg.cpus_per_stage, num_gpus_per_stage=cfg.gpus_per_stage,
                               device="cuda" if cfg.gpus_per_stage and _cuda() else "cpu",
                               weights_path=gen.model_path, call_timeout_s=cfg.stage_call_timeout_s,
                               placement_timeout_s=cfg.placement_timeout_s, placement_group=self._placement[0],
                               first_bundle=self._placement[1])
        return InProcessExecutor(gen.model, cfg.stages, split, weights_path=gen.model_path)

    # called from the server (any thread) ------------------------------------------------------------

    def open(self, stream_id: str, spec: StreamSpec, utilisation: float, sink: Sink) -> None:
        self._register(stream_id, spec, utilisation, sink)
        self.opened += 1
        self._inbox.put(("open", stream_id, spec))

    def close(self, stream_id: str) -> None:
        self._unregister(stream_id)
        self._inbox.put(("close", stream_id, None))

    def set_prompt(self, stream_id: str, prompt: str) -> None:
        self._inbox.put(("prompt", stream_id, prompt))

    def set_steps(self, stream_id: str, steps: int) -> None:
        self._inbox.put(("steps", stream_id, steps))

    def adopt(self, handoff: Handoff) -> None:
        """Continue a stream from another replica (called from any thread)."""
        self._register(handoff.stream_id, handoff.spec, handoff.utilisation, handoff.sink)
        self._inbox.put(("adopt", handoff.stream_id, handoff.state))

    def consumed(self, stream_id: str) -> None:
        self._inbox.put(("consumed", stream_id, None))

    def max_streams(self, fps: float, steps: int) -> int:
        return self.engine.max_streams(fps, steps)

    def predicted_chunk_latency(self, steps: int) -> float:
        return self.engine.predicted_chunk_latency(steps)

    def cache_bytes(self) -> list[int]:
        """Cache bytes per stage (asks the stages; for tests and the leak check)."""
        return self._on_engine_thread(self.executor.cache_bytes, 10.0)

    def probe(self, timeout_s: float) -> bool:
        """Readiness: a real forward on every stage, run by the engine thread within ``timeout_s``. A
        live process with a stuck loop or a hung stage fails it."""
        if self._probing.is_set():  # the last probe has not even started: not ready
            self.healthy = False
            return False
        self._probing.set()
        try:
            stats = self._on_engine_thread(
                lambda: self.executor.profile(self.engine.grid, 1, self.cfg.generation.cache), timeout_s)
        except Exception:  # noqa: BLE001 - any failure is "not ready"
            self.healthy = False
        else:
            self.healthy = len(stats) == self.cfg.stages and all(s.compute_s > 0 for s in stats)
        finally:
            self._probing.clear()
        return self.healthy

    def hand_off(self, timeout_s: float) -> None:
        """Give every stream on this healthy replica to the service to continue elsewhere (an operator's
        drain): finish what is in flight and deliver it, move the streams, free their caches here."""
        def move_all():
            for out in self.engine.drain():
                self._deliver(out)
            stream_ids = list(self.engine.streams)
            self._hand_off_all()
            for sid in stream_ids:
                self.executor.close_stream(sid)

        self._on_engine_thread(move_all, timeout_s)

    def _on_engine_thread(self, fn, timeout_s: float):
        """Run ``fn`` on the engine thread; a call whose caller gave up is skipped, never run late."""
        done, given_up = threading.Event(), threading.Event()
        out: list = []

        def call():
            if given_up.is_set():
                return
            try:
                out.append((True, fn()))
            except StageFailure as err:  # a probe met a dead or hung stage: the loop rebuilds, as for a step
                self._stage_failure = err
                out.append((False, err))
            except Exception as err:  # noqa: BLE001 - handed to the caller
                out.append((False, err))

        self._inbox.put(("call", call, done))
        if not done.wait(timeout_s):
            given_up.set()
            raise TimeoutError("engine thread did not answer")
        ok, value = out[0]
        if not ok:
            raise value
        return value

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.executor.shutdown()

    # the engine thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox(block=self.engine.idle)
            try:
                if self._stage_failure is not None:
                    failure, self._stage_failure = self._stage_failure, None
                    raise failure
                outputs = self.engine.step(wait=True)
            except StageFailure as err:
                log.warning("replica %d: %s; rebuilding its stages", self.index, err)
                self.metrics.stage_errors.labels(err.kind).inc()
                now = time.monotonic()
                self._recoveries = [t for t in self._recoveries if now - t < RECOVERY_WINDOW_S] + [now]
                if len(self._recoveries) > MAX_RECOVERIES:  # a failure that rebuilding does not cure
                    log.error("replica %d: %d failures in %d s; ending its streams", self.index,
                              len(self._recoveries), RECOVERY_WINDOW_S)
                    self._fail_all()
                    continue
                self._recover()
                continue
            except Exception:  # noqa: BLE001 - fail the streams, keep serving
                log.exception("engine step failed")
                self.metrics.engine_errors.labels("exception").inc()
                self._fail_all()
                continue
            stats = self.engine.stats
            if stats.last_stage_stats:
                self.metrics.observe_stage_stats(stats.last_stage_stats)
                stats.last_stage_stats = []
            self.metrics.stage_queue_depth.labels(str(self.index)).set(stats.inflight)
            for out in outputs:
                self._deliver(out)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.02) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, stream_id, value) -> None:
        engine = self.engine
        if kind == "open":
            sampler = engine.cfg.sampler
            if value.steps != sampler.num_steps:
                sampler = replace(sampler, denoising_steps=_step_list(value.steps))
            engine.add_stream(stream_id, value.prompt, value.seed, value.fps, sampler,
                              max_ahead=self.cfg.server.output_chunks_ahead)
        elif kind == "close":
            if stream_id in engine.streams:
                engine.remove_stream(stream_id)
        elif kind == "prompt":
            engine.set_prompt(stream_id, value)
        elif kind == "steps":
            engine.set_steps(stream_id, _step_list(value))
        elif kind == "consumed":
            engine.consumed(stream_id)
        elif kind == "adopt":
            try:
                engine.restore(value)
            except Exception:  # noqa: BLE001 - e.g. this replica failed too: the stream ends
                log.exception("replica %d could not adopt stream", self.index)
                self._fail(stream_id)
        elif kind == "call":
            try:
                stream_id()
            finally:
                value.set()

    def _deliver(self, out) -> None:
        with self._lock:
            entry = self._sinks.get(out.stream_id)
        if entry is None:
            return
        sink, spec = entry
        frames = out.frames.numpy()  # [N, H, W, 3] uint8
        data = [_encode(f, spec) for f in frames]
        self.metrics.chunk_latency.observe(out.latency_s)
        checkpoint = self.engine.checkpoint(out.stream_id) if self.checkpoints else None
        sink(FrameBatch(out.chunk, out.prompt_revision, data, frames.shape[2], frames.shape[1], out.latency_s,
                        time.monotonic(), checkpoint))

    def _recover(self) -> None:
        """New stage actors with the same split; streams re-cache their recent clean latents on them and
        go on from their first unfinished chunk. If the stages cannot be rebuilt, the streams end."""
        self.recovering = True
        try:
            split = self.executor.split()
            self.executor.kill()  # every stage: survivors may be stuck in recv from the dead one, or stopped
            try:
                self.executor = self._build_executor(split)
                self.engine.replace_executor(self.executor)
                self.metrics.stream_migrations.labels("ok").inc(len(self.engine.streams))
            except Exception:  # noqa: BLE001
                log.exception("replica %d: could not rebuild its stages; moving its streams", self.index)
                self.broken = self.draining = True
                self._hand_off_all()
        finally:
            self.recovering = False

    def _hand_off_all(self) -> None:
        """Give every stream to the service to continue on another replica (or end it)."""
        handoffs = []
        with self._lock:
            stream_ids = list(self._sinks)
        for sid in stream_ids:
            entry = self._unregister(sid)
            if entry is not None and sid in self.engine.streams:
                sink, spec, load = entry
                handoffs.append(Handoff(sid, spec, load, sink, self.engine.checkpoint(sid)))
                self.engine.streams.pop(sid)
        self.engine.abandon_inflight()
        self._send_away(handoffs)

    def _fail(self, stream_id: str) -> None:
        entry = self._unregister(stream_id)
        if entry is not None:
            entry[0](EngineFailure("replica lost"))
        if stream_id in self.engine.streams:
            self.engine.remove_stream(stream_id)

    def _fail_all(self) -> None:
        with self._lock:
            stream_ids = list(self._sinks)
        for sid in stream_ids:
            self._fail(sid)
        try:
            self.engine.drain()
        except Exception:  # noqa: BLE001 - the executor is broken; nothing left to collect
            self.engine.abandon_inflight()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _step_list(steps: int) -> tuple[float, ...]:
    """Evenly spaced step list of ``steps`` entries from 1000 (warped by the sampler's shift)."""
    return tuple(1000.0 * (steps - i) / steps for i in range(steps))


def _encode(frame: np.ndarray, spec: StreamSpec) -> bytes:
    if spec.encoding is Encoding.RAW_RGB:
        return frame.tobytes()
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=spec.jpeg_quality)
    return buf.getvalue()
