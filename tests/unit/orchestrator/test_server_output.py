"""Generate and Transform driven with a fake replica and a fake gRPC context: what overflows a stream's output
queue is counted and gives its look-ahead slot back; a stream closed at its ``yield`` ends for the caller's reason;
every refused start is counted; a Transform whose request reader fails ends INTERNAL, and one waiting for input
does not poll. GetCapacity answers for the stream kind asked."""

import asyncio
import logging

import grpc
import numpy as np
import pytest

from orchestrator import transform
from orchestrator.auth import _CALLER, Caller
from orchestrator.client import encode_input
from orchestrator.clock import FakeClock
from orchestrator.metrics import Metrics
from orchestrator.server import MALFORMED, StreamService
from protos.streamgen.v1 import stream_pb2
from tests.integration.test_server import service_config
from orchestrator.tokens import OPEN
from workers.core_messages import FrameBatch


class FakeReplica:
    index, draining, healthy, broken, in_service = 0, False, True, False, True

    def __init__(self):
        self.sinks, self.consumed_calls = {}, 0
        self.pushed: list[int] = []  # video-to-video: each input chunk's frame count

    def open(self, stream_id, spec, *rest):  # the sink is the last argument
        self.sinks[stream_id] = rest[-1]

    def close(self, stream_id):
        self.sinks.pop(stream_id, None)

    def consumed(self, stream_id):
        self.consumed_calls += 1

    def set_prompt(self, stream_id, prompt):
        pass

    def set_steps(self, stream_id, steps):
        pass

    def push_input(self, stream_id, frames, metas, due):
        self.pushed.append(len(metas))

    def end_input(self, stream_id):
        pass

    def max_streams(self, fps, steps, video=False):
        return 4

    def predicted_chunk_latency(self, steps, video=False):
        return 0.01

    def load(self):
        return 0.0

    def active(self):
        return len(self.sinks)


class FakeContext:
    def time_remaining(self):
        return None

    def set_trailing_metadata(self, md):
        pass

    async def abort(self, code, details):
        raise RuntimeError(f"{code}: {details}")


def batch(stream_id: str, chunk: int) -> FrameBatch:
    return FrameBatch(stream_id, chunk, 0, [b"\0" * 12] * 12, 2, 2, 0.01, 0.0)


async def opened(replica, calls: list) -> None:
    """Let ``calls`` (their first frame asked for) run until each opened its stream on ``replica``."""
    for _ in range(1000):
        if len(replica.sinks) == len(calls) or any(c.done() for c in calls):
            break
        await asyncio.sleep(0)
    assert len(replica.sinks) == len(calls), calls


async def open_stream(context) -> tuple:
    """A service over one FakeReplica and one Generate call on it, its first frame asked for: (service,
    metrics, replica, the call, the pending first frame, stream id, the replica's sink for it)."""
    _CALLER.set(Caller(OPEN, "test"))  # what the guard sets for each call (it is not in this path)
    metrics, replica = Metrics(), FakeReplica()
    service = StreamService(service_config(), [replica], metrics, health_servicer=None)
    gen = service.Generate(stream_pb2.GenerateRequest(prompt="a fox", fps=16.0), context)
    reader = asyncio.ensure_future(gen.__anext__())
    await opened(replica, [reader])
    (stream_id, sink), = replica.sinks.items()
    return service, metrics, replica, gen, reader, stream_id, sink


def test_an_overflowing_output_queue_counts_the_dropped_chunk_and_frees_its_look_ahead_slot():
    async def run():
        service, metrics, replica, gen, reader, stream_id, sink = await open_stream(FakeContext())
        await service.Control(stream_pb2.ControlRequest(stream_id=stream_id, paused=True), FakeContext())
        sink(batch(stream_id, 0))  # taken off the queue, then output waits on the pause
        for _ in range(20):
            await asyncio.sleep(0)
        assert replica.consumed_calls == 1
        capacity = service.cfg.server.output_chunks_ahead + 8
        for chunk in range(1, capacity + 3):  # the queue holds `capacity`: 2 overflow
            sink(batch(stream_id, chunk))
        for _ in range(20):
            await asyncio.sleep(0)
        dropped = metrics.registry.get_sample_value("streamgen_frames_total", {"outcome": "dropped_overflow"})
        reader.cancel()
        try:
            await reader
        except (asyncio.CancelledError, StopAsyncIteration):
            pass
        await gen.aclose()
        return replica.consumed_calls, dropped

    consumed, dropped = asyncio.run(run())
    assert dropped == 2 * 12  # both overflowing chunks' frames are counted
    assert consumed == 1 + 2  # the taken chunk, and one look-ahead slot back per dropped chunk


class DeadlineContext(FakeContext):
    def __init__(self, remaining):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining


@pytest.mark.parametrize("remaining, reason", [(None, "client_cancel"), (5.0, "client_cancel"), (0.1, "deadline")])
def test_a_stream_closed_at_its_yield_ends_as_the_callers_cancel_or_deadline(remaining, reason):
    """gRPC cancels its own task when the call goes while it writes a frame: the handler is then closed at its
    ``yield`` (GeneratorExit), not cancelled at an await. The stream still ends for the caller's reason, and
    its replica lets it go."""
    async def run():
        service, metrics, replica, gen, first, stream_id, sink = await open_stream(DeadlineContext(remaining))
        sink(batch(stream_id, 0))
        frame = await asyncio.wait_for(first, 5.0)
        assert frame.stream_id == stream_id and service.streams  # suspended at its yield, the stream live
        await gen.aclose()
        ended = {r: metrics.registry.get_sample_value("streamgen_streams_ended_total", {"reason": r})
                 for r in ("client_cancel", "deadline", "internal")}
        return ended, replica.sinks, service.streams

    ended, sinks, streams = asyncio.run(run())
    assert ended[reason] == 1 and ended["internal"] in (None, 0.0)
    assert not sinks and not streams


def rejected(metrics, reason: str) -> tuple[float, float]:
    return (metrics.registry.get_sample_value("streamgen_stream_starts_total", {"result": "rejected"}),
            metrics.registry.get_sample_value("streamgen_stream_rejections_total", {"reason": reason}))


async def one(*items):
    for item in items:
        yield item


@pytest.mark.parametrize("how, reason, code", [
    ("generate_malformed", "invalid", grpc.StatusCode.INTERNAL),
    ("transform_malformed", "invalid", grpc.StatusCode.INTERNAL),
    ("deadline_expired", "budget", grpc.StatusCode.DEADLINE_EXCEEDED)])
def test_every_refused_start_is_counted(how, reason, code):
    """Each refusal is a rejected start with a reason (RELIABILITY R14: the reason counters add up to the
    refused calls), not only an audit line."""
    _CALLER.set(Caller(OPEN, "test"))
    metrics, replica = Metrics(), FakeReplica()
    service = StreamService(service_config(), [replica], metrics, health_servicer=None)
    call = {"generate_malformed": lambda: service.Generate(MALFORMED, FakeContext()),
            "transform_malformed": lambda: service.Transform(one(MALFORMED), FakeContext()),
            "deadline_expired": lambda: service.Generate(stream_pb2.GenerateRequest(prompt="a fox", fps=16.0),
                                                         DeadlineContext(0.0))}[how]()
    with pytest.raises(RuntimeError) as err:  # FakeContext.abort
        asyncio.run(call.__anext__())
    assert str(err.value).startswith(str(code)) and not replica.sinks
    assert rejected(metrics, reason) == (1.0, 1.0)


def frame_request(index: int) -> stream_pb2.TransformRequest:
    return stream_pb2.TransformRequest(frame=encode_input(np.zeros((8, 8, 3), np.uint8), index, 0, "raw_rgb"))


async def open_transform(context, clock=None) -> tuple:
    """A service over one FakeReplica and one Transform call on it, its first frame asked for: (service, metrics,
    replica, the call, the pending first frame, the stream's VideoStream, the queue its requests come from)."""
    _CALLER.set(Caller(OPEN, "test"))
    metrics, replica = Metrics(), FakeReplica()
    service = StreamService(service_config(), [replica], metrics, health_servicer=None, clock=clock)
    requests: asyncio.Queue = asyncio.Queue()

    async def request_stream():
        yield stream_pb2.TransformRequest(config=stream_pb2.TransformConfig(prompt="a fox", fps=16.0,
                                                                            encoding=stream_pb2.RAW_RGB))
        while True:
            yield await requests.get()

    call = service.Transform(request_stream(), context)
    first = asyncio.ensure_future(call.__anext__())
    await opened(replica, [first])
    (live,) = service.streams.values()
    return service, metrics, replica, call, first, live.video, requests


async def until(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


async def close(call, first) -> None:
    first.cancel()
    try:
        await first
    except (asyncio.CancelledError, StopAsyncIteration):
        pass
    await call.aclose()


def test_a_transform_whose_request_reader_fails_ends_internal_not_ok(monkeypatch, caplog):
    """An unexpected error reading the requests (a bug) ends the stream INTERNAL with an opaque message, logged
    with its traceback; it is never the client's clean end (OK, client_done)."""
    def broken(*args):
        raise RuntimeError("a bug in decoding")

    monkeypatch.setattr(transform, "decode_frame", broken)

    async def run():
        service, metrics, replica, call, first, video, requests = await open_transform(FakeContext())
        await requests.put(frame_request(0))
        try:
            await asyncio.wait_for(first, 5.0)
            status = "a frame"
        except StopAsyncIteration:  # the call ended without an error
            status = "OK"
        except RuntimeError as err:  # FakeContext.abort
            status = str(err)
        ended = {r: metrics.registry.get_sample_value("streamgen_streams_ended_total", {"reason": r})
                 for r in ("internal", "client_done")}
        return status, ended, service.streams

    with caplog.at_level(logging.ERROR, logger="streamgen.transform"):
        status, ended, streams = asyncio.run(run())
    assert status == f"{grpc.StatusCode.INTERNAL}: internal error"
    assert ended == {"internal": 1.0, "client_done": 0.0} and not streams
    assert [r.exc_info[0] for r in caplog.records] == [RuntimeError]


def test_a_transform_past_its_next_chunk_time_but_short_of_frames_does_not_poll():
    """The next chunk's earliest time has passed but too few frames are queued for it: only a new frame (or the
    idle timeout) can change that, so the reader waits for one instead of waking every millisecond."""
    clock = FakeClock()

    async def run():
        service, metrics, replica, call, first, video, requests = await open_transform(FakeContext(), clock)
        for i in range(9):  # the first chunk: 1 + 4 (3 - 1) frames
            await requests.put(frame_request(i))
        await until(lambda: replica.pushed == [9])
        clock.advance(1.0)  # past the next chunk's earliest time (0.9 of its 12 frames at 16 fps)
        await requests.put(frame_request(9))  # 1 of the 12 it needs
        await until(lambda: video.ingress.last_index == 9)
        feeds = 0
        feed = video._feed

        def counted():
            nonlocal feeds
            feeds += 1
            feed()

        video._feed = counted
        await asyncio.sleep(0.3)
        await close(call, first)
        return feeds, replica.pushed

    feeds, pushed = asyncio.run(run())
    assert feeds <= 2, f"{feeds} feeds in 0.3 s with nothing new to build"
    assert pushed == [9]


class VideoPricedReplica(FakeReplica):
    """Video-to-video streams cost more here (each chunk's encode on stage 0)."""

    def max_streams(self, fps, steps, video=False):
        return 1 if video else 3

    def predicted_chunk_latency(self, steps, video=False):
        return 0.05 if video else 0.01


def test_get_capacity_answers_for_the_stream_kind_asked():
    _CALLER.set(Caller(OPEN, "test"))
    service = StreamService(service_config(), [VideoPricedReplica(), VideoPricedReplica()], Metrics(),
                            health_servicer=None)
    text = asyncio.run(service.GetCapacity(stream_pb2.CapacityRequest(fps=16.0), FakeContext()))
    video = asyncio.run(service.GetCapacity(stream_pb2.CapacityRequest(fps=16.0, video=True), FakeContext()))
    cap = service.cfg.server.max_streams_per_replica
    assert text.streams_max == 2 * min(3, cap) and text.predicted_chunk_latency_s == pytest.approx(0.01)
    assert video.streams_max == 2 and video.predicted_chunk_latency_s == pytest.approx(0.05)


class StepsPricedReplica(FakeReplica):
    """Sustains 4 streams at 1 step, 1 at 8; its load follows the steps of the streams it holds."""

    def __init__(self):
        super().__init__()
        self.steps: dict[str, int] = {}

    def open(self, stream_id, spec, *rest):
        super().open(stream_id, spec, *rest)
        self.steps[stream_id] = spec.steps

    def set_steps(self, stream_id, steps):
        self.steps[stream_id] = steps

    def max_streams(self, fps, steps, video=False):
        return 4 if steps <= 1 else 1

    def share(self, stream_id):
        return 1 / self.max_streams(16.0, self.steps[stream_id])

    def load(self):
        return sum(1 / self.max_streams(16.0, s) for s in self.steps.values())


def test_a_steps_change_is_admitted_like_a_start():
    """More steps than the stream's replica has room for are refused (RESOURCE_EXHAUSTED) and change nothing;
    fewer are taken."""
    _CALLER.set(Caller(OPEN, "test"))
    replica = StepsPricedReplica()
    service = StreamService(service_config(), [replica], Metrics(), health_servicer=None)

    async def run():
        calls = [service.Generate(stream_pb2.GenerateRequest(prompt="a fox", fps=16.0, steps=1), FakeContext())
                 for _ in range(2)]
        pending = [asyncio.ensure_future(c.__anext__()) for c in calls]
        await opened(replica, pending)
        sid = next(iter(replica.sinks))
        with pytest.raises(RuntimeError) as err:  # 0.25 + 1.0 > the 0.9 headroom
            await service.Control(stream_pb2.ControlRequest(stream_id=sid, steps=8), FakeContext())
        refused = str(err.value)
        steps_after_refusal = dict(replica.steps)
        await service.Control(stream_pb2.ControlRequest(stream_id=sid, steps=1), FakeContext())
        for call, first in zip(calls, pending):
            await close(call, first)
        return refused, steps_after_refusal

    refused, steps = asyncio.run(run())
    assert refused.startswith(str(grpc.StatusCode.RESOURCE_EXHAUSTED)) and "steps" in refused
    assert set(steps.values()) == {1}
