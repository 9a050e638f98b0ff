"""Video-to-video over gRPC on 127.0.0.1 (the local backend, the tiny model, 2 stages): a clip comes back frame
for frame within its budget, a faster input is subsampled to the stream's fps, bad input gets the listed
codes, idle streams end and free their state, a prompt change never goes back, and nothing leaks."""

import asyncio
import time

import grpc
import numpy as np
import pytest

from orchestrator.client import StreamgenClient, encode_input
from orchestrator.config import CacheConfig, GenerationConfig, ParallelConfig, SamplerConfig, ServerConfig, \
    ServiceConfig, get_config
from protos.streamgen.v1 import stream_pb2, stream_pb2_grpc
from tests.integration.test_server import Running, serving, wait_for

FPS = 8.0


def service_config() -> ServiceConfig:
    gen = GenerationConfig(model=get_config("tiny"), sampler=SamplerConfig(chunk_frames=1), cache=CacheConfig())
    return ServiceConfig(generation=gen, server=ServerConfig(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0",
                                                             max_streams_per_replica=4, idle_timeout_s=1.5),
                         parallel=ParallelConfig(stages=2, backend="local"))


@pytest.fixture(scope="module")
def server():
    running = Running(service_config())
    try:
        yield running
    finally:
        running.stop()


def clip(n: int, height: int = 64, width: int = 96) -> list[np.ndarray]:
    """A moving gradient with a square: n uint8 frames [H, W, 3]."""
    ys, xs = np.mgrid[0:height, 0:width]
    out = []
    for i in range(n):
        img = np.stack([(xs * 2 + i * 3) % 256, ys * 3 % 256, np.full_like(xs, 90)], -1).astype(np.uint8)
        img[20:40, (5 + 2 * i) % 80:(5 + 2 * i) % 80 + 12] = 240
        out.append(img)
    return out


async def run_transform(target, frames, input_fps, budget_ms=4000, **kw):
    async with StreamgenClient(target) as client:
        call = client.transform(frames, "a watercolor painting", fps=FPS, seed=1, latency_budget_ms=budget_ms,
                                input_fps=input_fps, encoding="raw_rgb", **kw)
        got = []
        async for frame in call:
            got.append((time.time_ns(), frame))
        return got, dict(await call.trailing_metadata() or ())


def test_a_clip_at_8_fps_comes_back_frame_for_frame_in_order_within_budget(server):
    frames = clip(64)
    got, trailers = asyncio.run(run_transform(server.target, frames, FPS))
    out = [f for _, f in got]
    assert [f.input_index for f in out] == list(range(64))  # every frame, in order
    assert [f.index for f in out] == list(range(64))
    assert all(f.deadline_met for f in out)
    budget_ns = 4000 * 1_000_000
    assert all(t - f.capture_unix_ns <= budget_ns for t, f in got)  # each within its budget from capture
    assert len({f.stream_id for f in out}) == 1 and all(f.width == 96 and f.height == 64 for f in out)
    assert trailers.get("input-accepted") == "64"
    # the output keeps the input's cadence (no bursts): gaps between frames near 1 / fps
    sent = np.array([f.sent_unix_ns for f in out[8:]]) / 1e9
    assert np.median(np.diff(sent)) == pytest.approx(1 / FPS, rel=0.2)


def test_input_at_three_times_the_fps_is_subsampled_not_queued(server):
    frames = clip(3 * 8 * 5)  # 5 s of input at 24 fps into an 8 fps stream
    got, trailers = asyncio.run(run_transform(server.target, frames, 3 * FPS))
    out = [f for _, f in got]
    span = (out[-1].sent_unix_ns - out[0].sent_unix_ns) / 1e9
    rate = (len(out) - 1) / span
    assert rate == pytest.approx(FPS, rel=0.15), rate
    latencies = [(t - f.capture_unix_ns) / 1e9 for t, f in got]
    assert max(latencies) <= 4.0 and np.median(latencies[len(latencies) // 2:]) <= 2 * np.median(latencies[:8]) + 0.5
    idx = [f.input_index for f in out]
    assert idx == sorted(idx) and len(idx) < 120
    dropped = int(trailers["input-dropped-backlog"])
    assert dropped > 0 and int(trailers["input-accepted"]) + dropped == 120  # every input frame has one outcome


def _config(**kw):
    base = dict(prompt="a neon city", seed=2, fps=FPS, encoding=stream_pb2.RAW_RGB)
    base.update(kw)
    return stream_pb2.TransformRequest(config=stream_pb2.TransformConfig(**base))


def _frame(i, image=None, **kw):
    image = clip(1)[0] if image is None else image
    msg = encode_input(image, i, time.time_ns(), "raw_rgb")
    for k, v in kw.items():
        setattr(msg, k, v)
    return stream_pb2.TransformRequest(frame=msg)


def call_with(server, requests, timeout=20):
    with grpc.insecure_channel(server.target) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        call = stub.Transform(iter(requests), timeout=timeout)
        frames = []
        try:
            for f in call:
                frames.append(f)
        except grpc.RpcError as err:
            return frames, err.code(), err.details(), dict(err.trailing_metadata() or ())
        return frames, grpc.StatusCode.OK, "", dict(call.trailing_metadata() or ())


def test_first_message_must_be_config_and_a_second_config_is_refused(server):
    opened = server.service.replicas[0].opened
    _, code, details, _ = call_with(server, [_frame(0)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "first message must be config" in details
    _, code, details, _ = call_with(server, [])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert server.service.replicas[0].opened == opened  # zero engine calls
    _, code, details, _ = call_with(server, [_config(), _frame(0), _config()])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "config" in details
    _, code, details, _ = call_with(server, [_config(noise_scale=3.0)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("noise_scale")
    assert serving(server) == 1


def test_bad_frames_are_dropped_and_counted_and_thirty_in_a_row_end_the_stream(server):
    good = [_frame(i) for i in range(0, 9)]
    bad_len = _frame(9)
    bad_len.frame.data = bad_len.frame.data[:-3]  # B8: byte length != w * h * 3
    bad_jpeg = _frame(10, encoding=stream_pb2.JPEG)  # raw bytes that do not decode as a JPEG
    zero = _frame(11, width=0, height=0)
    backwards = _frame(5)  # B10: an index that does not increase
    dup = _frame(8)
    frames, code, _, trailers = call_with(server, [_config()] + good + [bad_len, bad_jpeg, zero, backwards, dup]
                                          + [_frame(i) for i in range(12, 21)])
    assert code == grpc.StatusCode.OK and len(frames) >= 1
    assert trailers["input-dropped-invalid"] == "3" and trailers["input-dropped-order"] == "2"
    junk = [_frame(i) for i in range(1, 31)]
    for j in junk:
        j.frame.data = b"\x00"
    frames, code, details, _ = call_with(server, [_config(), _frame(0)] + junk)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "frame.data" in details
    assert serving(server) == 1


def test_idle_input_ends_the_stream_and_frees_its_state(server):
    async def idle():
        async with StreamgenClient(server.target) as client:
            queue: asyncio.Queue = asyncio.Queue()

            async def frames():
                for i, image in enumerate(clip(5)):
                    yield image
                await queue.get()  # then nothing: the stream goes idle

            call = client.transform(frames(), "a neon city", fps=FPS, encoding="raw_rgb", input_fps=FPS)
            got, start = [], time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for frame in call:
                    got.append(frame)
            return err.value, time.monotonic() - start, got

    err, elapsed, got = asyncio.run(idle())
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in err.details()
    assert 1.5 <= elapsed <= 1.5 + 0.6 + 1.5  # 5 frames at 8 fps, the 1.5 s timeout, then ended within 1 s
    replica = server.service.replicas[0]
    assert wait_for(lambda: replica.active() == 0, 1.0)
    assert wait_for(lambda: sum(replica.cache_bytes()) == 0, 1.0)


def test_a_prompt_change_mid_stream_never_goes_back(server):
    async def switch():
        async with StreamgenClient(server.target) as client:
            controls: asyncio.Queue = asyncio.Queue()
            call = client.transform(clip(64), "a watercolor painting", fps=FPS, encoding="raw_rgb", input_fps=FPS,
                                    controls=controls, latency_budget_ms=4000)
            revisions = []
            async for frame in call:
                revisions.append(frame.prompt_revision)
                if len(revisions) == 16:
                    await controls.put({"prompt": "a charcoal sketch"})
            return revisions

    revisions = asyncio.run(switch())
    assert 1 in revisions
    first_new = revisions.index(1)
    assert all(r == 1 for r in revisions[first_new:])  # no old-revision frame after the switch
    assert first_new <= 16 + 8 + 4 * 3  # within (pipeline depth + 1) chunks of the control


def test_leak_check_after_the_module(server):
    replica = server.service.replicas[0]
    assert wait_for(lambda: replica.active() == 0, 2.0)
    assert sum(replica.cache_bytes()) == 0
    assert not server.service.servicer.streams
