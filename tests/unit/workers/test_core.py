"""EngineCore with in-process stages: typed messages in, encoded frames and stats out, probes, recovery,
and the one stream-move mechanism (evict with a checkpoint, restore elsewhere)."""

import dataclasses
import queue
import threading
import time

import numpy as np
import pytest

from tests.integration.test_server import service_config
from workers.core import MAX_RECOVERIES, EngineCore
from workers.core_messages import (Call, CloseStream, Consumed, CoreStats, FrameBatch, OpenStream, OutputFormat,
                                   PushInput, RestoreStream, StreamEvicted, StreamFailed)
from workers.engine import PipelineEngine
from workers.executor import InProcessExecutor, StageFailure
from workers.v2v import VideoParams

RAW = OutputFormat("raw_rgb", 90)


def config():
    base = service_config()
    return dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, backend="local", stages=2))


def make_core(out, cfg=None):
    cfg = cfg or config()
    return EngineCore(cfg.generation, cfg.engine, cfg.parallel, out, max_ahead=2)


class Outputs:
    """Collects a core's outputs (the emit callback runs on the engine thread)."""

    def __init__(self):
        self.items: queue.Queue = queue.Queue()

    def __call__(self, item):
        self.items.put(item)

    def next(self, timeout=60.0):
        return self.items.get(timeout=timeout)


@pytest.fixture
def core():
    out = Outputs()
    c = make_core(out)
    c.out = out
    yield c
    c.shutdown()


def frames_of(batch: FrameBatch) -> np.ndarray:
    return np.stack([np.frombuffer(f, np.uint8).reshape(batch.height, batch.width, 3) for f in batch.frames])


def direct_frames(chunks: int) -> list[np.ndarray]:
    cfg = config()
    executor = InProcessExecutor(cfg.generation, cfg.parallel)
    engine = PipelineEngine(cfg.generation, executor)
    engine.add_stream("d", "a fox", 5, output=RAW)
    try:
        return [np.stack([np.frombuffer(f, np.uint8).reshape(o.height, o.width, 3) for f in o.frames])
                for o in engine.run_chunks({"d": chunks})["d"]]
    finally:
        executor.shutdown()


def test_a_stream_gets_encoded_frames_equal_to_the_engine_and_stats_travel_with_them(core):
    core.submit(OpenStream("s", "a fox", 5, 16.0, 4, RAW))
    batches, latencies = [], 0
    for chunk in range(3):
        batch = core.out.next()
        assert isinstance(batch, FrameBatch) and isinstance(batch.stats, CoreStats)
        latencies += len(batch.stats.chunk_latency_s)
        batches.append(batch)
        core.submit(Consumed("s"))
    assert [b.chunk for b in batches] == [0, 1, 2]
    assert latencies == 3  # each chunk's latency came back with an output
    assert any(b.stats.stage_stats for b in batches)  # stage stats too
    for got, want in zip(batches, direct_frames(3)):
        assert np.abs(frames_of(got).astype(int) - want.astype(int)).max() == 0


def test_the_look_ahead_bound_holds_until_chunks_are_consumed(core):
    core.submit(OpenStream("s", "a fox", 5, 16.0, 4, RAW))
    first, second = core.out.next(), core.out.next()
    assert (first.chunk, second.chunk) == (0, 1)
    # max_ahead = 2: the engine thread answers a call, and still no third chunk has come
    core.call(lambda: None, 30.0)
    core.call(lambda: None, 30.0)
    assert core.out.items.empty()
    core.submit(Consumed("s"))
    assert core.out.next().chunk == 2


def test_probe_passes_with_working_stages_and_fails_while_the_loop_is_stuck(core):
    assert core.probe(30.0)
    release = threading.Event()
    threading.Thread(target=lambda: core.call(lambda: release.wait(30), 60), daemon=True).start()
    try:
        assert not core.probe(0.5)
    finally:
        release.set()
    assert core.probe(30.0)


def test_streams_that_get_through_every_stage_are_the_probe_and_an_idle_core_runs_one(core):
    profiled = []
    profile = core.executor.profile
    core.executor.profile = lambda *a: profiled.append(1) or profile(*a)
    assert core.probe(30.0) and len(profiled) == 1  # idle: a probe forward on every stage
    assert core.probe(30.0) and len(profiled) == 2  # still idle: nothing else proves the stages work
    core.submit(OpenStream("s", "a fox", 5, 16.0, 4, RAW))
    core.out.next()
    assert core.probe(30.0) and len(profiled) == 2  # the stream's micro-batches are the proof
    release, stalled = threading.Event(), threading.Event()
    threading.Thread(target=lambda: core.call(lambda: stalled.set() or release.wait(30), 60), daemon=True).start()
    assert stalled.wait(30)
    try:  # the loop stalls: at most one more probe passes on the work done before, the next one fails
        passed = [core.probe(0.5), core.probe(0.5)]
        assert passed[-1] is False and passed.count(True) <= 1
    finally:
        release.set()


def _fail_a_stage():
    raise StageFailure("died", "injected")


def test_a_stage_failure_rebuilds_the_stages_and_the_stream_goes_on(core):
    core.submit(OpenStream("s", "a fox", 5, 16.0, 4, RAW))
    assert core.out.next().chunk == 0
    old = core.executor
    with pytest.raises(StageFailure):
        core.call(_fail_a_stage, 30.0)  # as a probe meeting a dead stage
    core.submit(Consumed("s"))
    batches = [core.out.next(), core.out.next()]
    assert [b.chunk for b in batches] == [1, 2] and core.executor is not old
    stats = [b.stats for b in batches] + [core.take_stats()]
    assert sum(s.stage_errors.get("died", 0) for s in stats) == 1
    assert sum(s.migrations for s in stats) == 1


def test_stages_that_cannot_be_rebuilt_evict_streams_with_checkpoints_another_core_continues(core):
    core.submit(OpenStream("s", "a fox", 5, 16.0, 4, RAW))
    assert core.out.next().chunk == 0
    core.submit(Consumed("s"))
    assert core.out.next().chunk == 1

    def refuse(split):
        raise RuntimeError("no slots (injected)")

    core.build_executor = refuse
    with pytest.raises(StageFailure):
        core.call(_fail_a_stage, 30.0)
    delivered = 1
    evicted = core.out.next()
    while isinstance(evicted, FrameBatch):  # a chunk decoded before the failure still comes out
        assert evicted.chunk == delivered + 1
        delivered = evicted.chunk
        evicted = core.out.next()
    # it resumes right after the last chunk that came out: nothing lost, nothing twice
    assert isinstance(evicted, StreamEvicted) and evicted.checkpoint.next_chunk == delivered + 1 and core.broken
    core.submit(OpenStream("t", "an owl", 1, 16.0, 4, RAW))  # a broken core takes no stream
    assert isinstance(core.out.next(), StreamFailed)

    out = Outputs()
    other = make_core(out)
    try:
        other.submit(RestoreStream(evicted.checkpoint, RAW))
        batch = out.next()
        assert isinstance(batch, FrameBatch) and batch.chunk == delivered + 1
        want = direct_frames(delivered + 2)[delivered + 1]
        assert np.abs(frames_of(batch).astype(int) - want.astype(int)).max() <= 1
    finally:
        other.shutdown()


def test_hand_off_finishes_in_flight_work_then_evicts_and_frees_the_caches(core):
    core.submit(OpenStream("s", "a fox", 5, 16.0, 4, RAW))
    assert core.out.next().chunk == 0
    assert core.hand_off(30.0) == 1
    items = [core.out.next()]
    while not isinstance(items[-1], StreamEvicted):
        items.append(core.out.next())
    assert all(isinstance(i, FrameBatch) for i in items[:-1])
    assert items[-1].checkpoint.stream_id == "s" and not core.broken
    assert core.cache_bytes() == [0, 0]


def test_a_message_that_fails_ends_its_stream_and_the_core_serves_on(core):
    """Opening a stream on a stage that died fails that stream (the next step rebuilds the stages); the
    engine thread lives on and the next stream gets frames."""
    def arm():
        def dead(*args, **kwargs):
            raise StageFailure("died", "injected at open")
        core.executor.open_stream = dead
    core.call(arm, 30.0)
    core.submit(OpenStream("s", "a fox", 5, 16.0, 4, RAW))
    failed = core.out.next(timeout=30)
    assert isinstance(failed, StreamFailed) and failed.stream_id == "s"
    core.submit(OpenStream("t", "an owl", 1, 16.0, 4, RAW))
    batch = core.out.next(timeout=30)
    assert isinstance(batch, FrameBatch) and (batch.stream_id, batch.chunk) == ("t", 0)
    assert core._thread.is_alive() and not core.broken


def test_an_engine_error_fails_the_streams_and_the_core_serves_on(core):
    """A forward that raises loses its micro-batch: the streams fail, and the engine does not wait for it."""
    core.submit(OpenStream("s", "a fox", 5, 16.0, 4, RAW))
    assert core.out.next().chunk == 0

    def arm():
        def boom(*args, **kwargs):
            raise RuntimeError("forward failed (injected)")
        core.executor.stages[1].forward = boom
    core.call(arm, 30.0)
    core.submit(Consumed("s"))
    item = core.out.next(timeout=30)
    while isinstance(item, FrameBatch):  # chunks already finished may still come out first
        item = core.out.next(timeout=30)
    assert isinstance(item, StreamFailed) and item.stream_id == "s"
    core.call(lambda: delattr(core.executor.stages[1], "forward"), 30.0)  # the class's forward again
    core.submit(OpenStream("t", "an owl", 1, 16.0, 4, RAW))
    batch = core.out.next(timeout=30)
    assert isinstance(batch, FrameBatch) and (batch.stream_id, batch.chunk) == ("t", 0)


def test_repeated_stage_failures_put_the_core_out_of_service_without_spinning(core):
    """One failure too many in the window: the streams fail, the stages are killed and the core is broken
    (the fleet replaces it); its dead calls are not collected again at every step."""
    core.submit(OpenStream("s", "a fox", 5, 16.0, 4, RAW))
    assert core.out.next().chunk == 0
    killed = []

    def arm():
        def dead(wait):  # as Ray's executor once its stages died: every collect meets the dead calls
            raise StageFailure("died", "injected")
        executor = core.executor
        executor.collect = dead
        kill = executor.kill
        executor.kill = lambda: (killed.append(True), kill())
        core._recoveries = [time.monotonic()] * MAX_RECOVERIES  # recent: the next failure is one too many
    core.call(arm, 30.0)
    core.submit(Consumed("s"))
    item = core.out.next(timeout=30)
    while isinstance(item, FrameBatch):
        item = core.out.next(timeout=30)
    assert isinstance(item, StreamFailed) and item.stream_id == "s"
    for _ in range(3):
        core.call(lambda: None, 30.0)  # the engine thread answers: it is not stuck
    stats = [item.stats, core.take_stats()]
    assert sum(s.stage_errors.get("died", 0) for s in stats if s is not None) == 1
    assert core.broken and killed == [True]


def test_an_input_chunk_of_the_wrong_shape_fails_its_stream_only(core):
    """A video stream's chunk that its engine refuses (wrong frame count) ends that stream (StreamFailed); the
    core serves on."""
    core.submit(OpenStream("v", "a fox", 5, 16.0, 3, RAW, video=VideoParams(0.8, True)))
    core.submit(PushInput("v", np.zeros((2, 8, 8, 3), np.uint8)))  # the first chunk takes 1 + 4 (f - 1) frames
    failed = core.out.next(timeout=30)
    assert isinstance(failed, StreamFailed) and failed.stream_id == "v"
    core.submit(OpenStream("t", "an owl", 1, 16.0, 4, RAW))
    batch = core.out.next(timeout=30)
    assert isinstance(batch, FrameBatch) and (batch.stream_id, batch.chunk) == ("t", 0)


def test_a_call_sees_a_stream_closed_just_before_it_with_its_caches_freed(core):
    """A close and a call that reach the engine thread in one inbox batch: the call runs after the close took
    effect (the leak check asks for cache bytes right after closing its last stream)."""
    core.submit(OpenStream("s", "a fox", 5, 16.0, 4, RAW))
    core.out.next()
    assert sum(core.cache_bytes()) > 0
    busy, release = threading.Event(), threading.Event()
    threading.Thread(target=lambda: core.call(lambda: (busy.set(), release.wait(30)), 60), daemon=True).start()
    assert busy.wait(30)  # the engine thread is inside that call: what follows queues up as one batch
    core.submit(CloseStream("s"))
    cache_bytes = Call(core.executor.cache_bytes)
    core.submit(cache_bytes)
    release.set()
    assert cache_bytes.done.wait(30) and cache_bytes.ok
    assert sum(cache_bytes.value) == 0
