"""The gRPC service on 127.0.0.1 with local Ray, the tiny model, 2 stages and a real gRPC client."""

import asyncio
import dataclasses
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.app import Service
from orchestrator.config import CacheConfig, EngineConfig, GenerationConfig, ParallelConfig, SamplerConfig, \
    ServerConfig, ServiceConfig, get_config
from orchestrator.metrics import CATALOGUE, CUDA_ONLY
from protos.streamgen.v1 import stream_pb2, stream_pb2_grpc

MAX_STREAMS = 2
ROOT = Path(__file__).resolve().parents[2]


def service_config() -> ServiceConfig:
    gen = GenerationConfig(model=get_config("tiny"), sampler=SamplerConfig(chunk_frames=3), cache=CacheConfig())
    return ServiceConfig(generation=gen, engine=EngineConfig(),
                         server=ServerConfig(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0",
                                             max_streams_per_replica=MAX_STREAMS, no_output_timeout_s=20),
                         parallel=ParallelConfig(stages=2, backend="ray"), replicas=1)


def stage_start_s(cfg: ServiceConfig, repeats: int = 2) -> float:
    """Seconds this machine takes to start one pipeline's stage actors (fresh processes: Python, torch and the
    model slice), measured with the service's own builder and no resources reserved: the floor of any stage
    rebuild. Recovery bounds are this plus the service's own budget, since a torch import alone takes 2.5-3 s
    on some of these 2-core machines and 0.5 s on others."""
    from workers.executor import build_executor

    parallel = dataclasses.replace(cfg.parallel, gpus_per_stage=0.0, cpus_per_stage=0.0)
    best = float("inf")
    for _ in range(repeats):
        start = time.monotonic()
        executor = build_executor(cfg.generation, parallel)
        best = min(best, time.monotonic() - start)
        executor.shutdown()
    return best


class Running:
    """The service on its own event loop thread, as `streamgen serve` runs it."""

    def __init__(self, cfg: ServiceConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.service = self.call(Service(cfg).start(), timeout=180)
        self.target = f"127.0.0.1:{self.service.port}"

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        try:
            self.call(self.service.stop(drain_timeout=2.0), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def server():
    running = Running(service_config())
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield stream_pb2_grpc.StreamServiceStub(channel)


@contextlib.contextmanager
def serve_process(*args: str, env: dict | None = None):
    """`streamgen serve --listen 127.0.0.1:0 --model tiny ...args` as a child process: yields (process, port, first
    lines of output) once it serves; kills it on the way out if it is still running."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", "--listen", "127.0.0.1:0",
                             "--metrics-listen", "", "--model", "tiny", *args], cwd=ROOT,
                            env=dict(env or os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port, lines, deadline = None, [], time.monotonic() + 120
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            lines.append(line)
            m = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
        assert port, "".join(lines)[-3000:]
        yield proc, port, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def request(**kw):
    base = dict(prompt="a red fox in the snow", seed=3, fps=16.0, encoding=stream_pb2.RAW_RGB)
    base.update(kw)
    return stream_pb2.GenerateRequest(**base)


def engine_opens(server) -> int:
    return server.service.replicas[0].opened


def wait_for(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def serving(server) -> int:
    with grpc.insecure_channel(server.target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="streamgen.v1.StreamService"), timeout=5).status


# ---------------------------------------------------------------------------------------------------


def test_full_stream_is_complete_in_order_at_fps_and_equals_the_engine(server, stub):
    frames, times = [], []
    for f in stub.Generate(request(max_frames=48), timeout=60):
        times.append(time.monotonic())
        frames.append(f)
    assert [f.index for f in frames] == list(range(48))
    assert len({f.stream_id for f in frames}) == 1 and frames[0].stream_id
    fps = (len(times) - 1) / (times[-1] - times[0])
    assert abs(fps - 16.0) / 16.0 <= 0.05, fps
    assert all(f.deadline_met for f in frames)
    got = np.stack([np.frombuffer(f.data, np.uint8).reshape(f.height, f.width, 3) for f in frames])

    # the engine run directly (in process, no Ray), same config and seed
    from workers.batch import OutputFormat
    from workers.engine import PipelineEngine
    from workers.executor import InProcessExecutor

    cfg = service_config()
    executor = InProcessExecutor(cfg.generation, dataclasses.replace(cfg.parallel, backend="local"))
    engine = PipelineEngine(cfg.generation, executor)
    engine.add_stream("direct", "a red fox in the snow", 3, output=OutputFormat("raw_rgb"))
    outs = engine.run_chunks({"direct": 5})["direct"]
    executor.shutdown()
    want = np.stack([np.frombuffer(f, np.uint8).reshape(o.height, o.width, 3) for o in outs for f in o.frames])[:48]
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1, diff.max()  # float32 through gloo vs in process: at most one level of rounding


def test_jpeg_frames_decode(server, stub):
    from orchestrator.client import decode_frame

    frames = list(stub.Generate(request(max_frames=3, encoding=stream_pb2.JPEG), timeout=30))
    image = decode_frame(frames[0])
    assert image.shape == (64, 96, 3) and frames[0].data[:2] == b"\xff\xd8"


BAD = [
    ("width", dict(width=50), grpc.StatusCode.INVALID_ARGUMENT),
    ("width", dict(width=16384), grpc.StatusCode.INVALID_ARGUMENT),
    ("height", dict(height=16384), grpc.StatusCode.INVALID_ARGUMENT),
    ("fps", dict(fps=0.0), grpc.StatusCode.INVALID_ARGUMENT),
    ("fps", dict(fps=0.03125), grpc.StatusCode.INVALID_ARGUMENT),  # a frame every 32 s: S4 says [1, 60]
    ("fps", dict(fps=float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
    ("fps", dict(fps=1000.0), grpc.StatusCode.INVALID_ARGUMENT),
    ("steps", dict(steps=100), grpc.StatusCode.INVALID_ARGUMENT),
    ("prompt", dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
    ("prompt", dict(prompt="x" * (1 << 20)), grpc.StatusCode.INVALID_ARGUMENT),
    ("prompt", dict(prompt="a\x07bell"), grpc.StatusCode.INVALID_ARGUMENT),
    ("latency_budget_ms", dict(latency_budget_ms=1), grpc.StatusCode.FAILED_PRECONDITION),
]


@pytest.mark.parametrize("field,kw,code", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_the_listed_code_and_no_engine_call(server, stub, field, kw, code):
    before = engine_opens(server)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request(**kw), timeout=10))
    assert err.value.code() == code
    assert err.value.details().startswith(field)
    assert "Traceback" not in err.value.details() and "127.0.0.1" not in err.value.details()
    assert engine_opens(server) == before
    assert serving(server) == health_pb2.HealthCheckResponse.SERVING


def test_transport_level_bad_input(server):
    before = engine_opens(server)
    with grpc.insecure_channel(server.target) as ch:
        raw = ch.unary_stream("/streamgen.v1.StreamService/Generate", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:  # B13: malformed protobuf bytes
            list(raw(b"\x0a\xff\xff\xff\xff\x0f", timeout=10))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        with pytest.raises(grpc.RpcError) as err:  # B5: invalid UTF-8 in the string field
            list(raw(b"\x0a\x02\xc3\x28" + b"\x2d\x00\x00\x80\x41", timeout=10))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        with pytest.raises(grpc.RpcError) as err:  # B9: over max_receive_message_length
            list(raw(request(prompt="y" * (5 << 20)).SerializeToString(), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    stub = stream_pb2_grpc.StreamServiceStub(grpc.insecure_channel(server.target))
    with pytest.raises(grpc.RpcError) as err:  # B15: deadline of 1 ms
        list(stub.Generate(request(max_frames=5), timeout=0.001))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: server.service.servicer.sessions == {})
    assert engine_opens(server) - before <= 1  # the 1 ms call may be admitted before its deadline lapses
    assert serving(server) == health_pb2.HealthCheckResponse.SERVING


def test_hypothesis_requests_map_to_documented_codes(server, stub):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    allowed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
               grpc.StatusCode.RESOURCE_EXHAUSTED}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(prompt=st.text(max_size=50), width=st.sampled_from([0, 8, 96, 97, 4096, 2**32 - 1]),
           height=st.sampled_from([0, 64, 65, 2**31]), fps=st.floats(width=32),
           steps=st.integers(0, 20), budget=st.integers(0, 100_000), late=st.integers(0, 1),
           max_frames=st.integers(0, 3))
    def check(prompt, width, height, fps, steps, budget, late, max_frames):
        req = stream_pb2.GenerateRequest(prompt=prompt, width=width, height=height, fps=fps, steps=steps,
                                         latency_budget_ms=budget, late_policy=late, max_frames=max_frames or 1)
        try:
            frames = list(stub.Generate(req, timeout=30))
            assert 1 <= len(frames) <= max(1, max_frames)
        except grpc.RpcError as err:
            assert err.code() in allowed, (err.code(), err.details())

    check()
    assert serving(server) == health_pb2.HealthCheckResponse.SERVING


def test_capacity_rejects_fast_and_admitted_streams_meet_deadlines(server):
    with grpc.insecure_channel(server.target) as ch:
        stub = stream_pb2_grpc.StreamServiceStub(ch)
        calls = [stub.Generate(request(seed=i, late_policy=stream_pb2.DELIVER_FLAGGED), timeout=120)
                 for i in range(MAX_STREAMS)]
        firsts = [next(c) for c in calls]  # both admitted and streaming
        assert len({f.stream_id for f in firsts}) == MAX_STREAMS
        start = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request(seed=99), timeout=10))
        elapsed = time.perf_counter() - start
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert elapsed < 0.1, elapsed
        assert dict(err.value.trailing_metadata())["retry-after-ms"] == "1000"

        frames = {i: [] for i in range(MAX_STREAMS)}
        stop_at = time.monotonic() + 30

        def read(i):
            for f in calls[i]:
                frames[i].append(f)
                if time.monotonic() >= stop_at:
                    calls[i].cancel()
                    return

        readers = [threading.Thread(target=read, args=(i,)) for i in range(MAX_STREAMS)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(60)
    for i in range(MAX_STREAMS):
        got = frames[i]
        assert len(got) >= 0.9 * 30 * 16
        assert [f.index for f in got] == list(range(1, len(got) + 1))
        misses = sum(not f.deadline_met for f in got)
        assert misses <= 0.01 * len(got), (i, misses, len(got))


def test_prompt_change_takes_effect_within_bound_and_never_goes_back(server, stub):
    call = stub.Generate(request(max_frames=120), timeout=60)
    frames, reply, after_reply = [], None, 0
    for f in call:
        frames.append(f)
        if len(frames) == 20:
            reply = stub.Control(stream_pb2.ControlRequest(stream_id=f.stream_id, prompt="a castle at night"))
            assert reply.prompt_revision == 1
        elif reply is not None and f.prompt_revision == 0:
            after_reply += 1
    revisions = [f.prompt_revision for f in frames]
    switch = revisions.index(1)
    assert all(r == 1 for r in revisions[switch:])  # no frame after the switch carries the old prompt
    depth = 2  # pipeline stages
    assert after_reply <= (depth + 1) * 12, after_reply  # <= (pipeline depth + 1) chunks of 12 frames
    assert [f.index for f in frames] == list(range(120))


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_cancel_and_disconnect_release_engine_state(server, how):
    replica = server.service.replicas[0]
    # streams of earlier tests may still be closing (their cancels are asynchronous): start from empty
    assert wait_for(lambda: replica.active() == 0 and replica.cache_bytes() == [0, 0], 5.0)
    baseline = [0, 0]
    channel = grpc.insecure_channel(server.target)
    call = stream_pb2_grpc.StreamServiceStub(channel).Generate(request(), timeout=60)
    for _, _ in zip(range(15), call):
        pass
    assert replica.active() == 1 and replica.cache_bytes() != baseline
    if how == "cancel":
        call.cancel()
    else:
        channel.close()
    assert wait_for(lambda: replica.active() == 0 and not server.service.servicer.sessions, 1.0)
    assert wait_for(lambda: replica.cache_bytes() == baseline, 1.0)
    channel.close()


def test_control_pause_resume_and_unknown_stream(server, stub):
    call = stub.Generate(request(max_frames=40), timeout=60)
    frames = []
    for f in call:
        frames.append((time.monotonic(), f))
        if len(frames) == 10:
            stub.Control(stream_pb2.ControlRequest(stream_id=f.stream_id, paused=True))
            threading.Timer(1.0, lambda sid=f.stream_id: stub.Control(
                stream_pb2.ControlRequest(stream_id=sid, paused=False))).start()
    gap = max(b[0] - a[0] for a, b in zip(frames, frames[1:]))
    assert gap >= 0.8  # output stopped while paused
    tail = [t for t, _ in frames[11:20]]
    assert min(b - a for a, b in zip(tail, tail[1:])) > 0.5 / 16  # resumed at fps, no burst
    with pytest.raises(grpc.RpcError) as err:
        stub.Control(stream_pb2.ControlRequest(stream_id="nope", prompt="x"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_control_refuses_what_generate_refuses(server, stub):
    """A prompt with a control character, or steps out of range, is INVALID_ARGUMENT on Control as on
    Generate, and leaves the stream's prompt revision where it was."""
    call = stub.Generate(request(max_frames=40), timeout=60)
    first = next(call)
    for kw in (dict(prompt="a\x07bell"), dict(prompt=""), dict(steps=9)):
        with pytest.raises(grpc.RpcError) as err:
            stub.Control(stream_pb2.ControlRequest(stream_id=first.stream_id, **kw))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
        assert err.value.details().startswith(next(iter(kw))), err.value.details()
    reply = stub.Control(stream_pb2.ControlRequest(stream_id=first.stream_id, paused=False))
    assert reply.prompt_revision == 0
    call.cancel()


def test_a_steps_change_moves_the_streams_admission_load(server, stub):
    """Admission load is 1 / max_streams(fps, steps): a Control that changes steps changes it."""
    replica = server.service.replicas[0]
    assert wait_for(lambda: replica.active() == 0, 5.0)
    call = stub.Generate(request(steps=4), timeout=60)
    first = next(call)

    def shares():  # the latency model keeps learning while the stream runs: read them beside each load
        return 1 / replica.max_streams(16.0, 4), 1 / replica.max_streams(16.0, 1)

    four, one = shares()
    assert four > one  # more steps, a larger share: the model tells the two apart, or this shows nothing
    # the load holds the share the model gave when the stream was admitted or last changed steps, so it is
    # compared with shares read right after each change: nearer the new steps' one, both ways
    for steps in (1, 4, 1):
        stub.Control(stream_pb2.ControlRequest(stream_id=first.stream_id, steps=steps))
        load, (four, one) = replica.load(), shares()
        near, far = (one, four) if steps == 1 else (four, one)
        assert abs(load - near) < abs(load - far), (steps, load, four, one)
    call.cancel()


def test_a_client_deadline_mid_stream_ends_it_with_reason_deadline(server, stub):
    def ended(reason):
        return server.service.metrics.registry.get_sample_value("streamgen_streams_ended_total", {"reason": reason})

    assert wait_for(lambda: not server.service.servicer.sessions, 5.0)  # earlier tests' cancels have landed
    deadline, cancel = ended("deadline"), ended("client_cancel")
    frames = []
    with pytest.raises(grpc.RpcError) as err:
        for f in stub.Generate(request(), timeout=2.0):
            frames.append(f)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and frames
    reasons = ("deadline", "client_cancel", "internal")
    assert wait_for(lambda: ended("deadline") == deadline + 1, 5.0), {r: ended(r) for r in reasons}
    assert ended("client_cancel") == cancel


def test_capacity_rpc(server, stub):
    reply = stub.GetCapacity(stream_pb2.CapacityRequest(fps=16.0))
    assert reply.streams_max == MAX_STREAMS and reply.replicas == 1 and not reply.draining
    assert 0 < reply.predicted_chunk_latency_s < 5


def test_metrics_parse_and_list_the_catalogue(server):
    port = server.service.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    names = set()
    for fam in families.values():
        for sample in fam.samples:
            names.add(sample.name)
            for key, value in sample.labels.items():
                assert not re.fullmatch(r"[0-9a-f]{32}", value), (sample.name, key)  # no stream ids
                assert "fox" not in value and "castle" not in value  # no prompts
    missing = [m for m in CATALOGUE if m not in names and m + "_info" not in names and m + "_count" not in names
               and not (m in CUDA_ONLY and m in families)]
    assert not missing, missing
    assert len([s for f in families.values() for s in f.samples]) < 2000
    readme = (__import__("pathlib").Path(__file__).resolve().parents[2] / "README.md").read_text()
    for m in CATALOGUE:
        assert m in readme, f"README does not list {m}"


def test_leak_check_after_the_suite(server):
    """Runs last in this module: nothing left active, caches at baseline (empty), gauges at zero."""
    replica = server.service.replicas[0]
    assert wait_for(lambda: replica.active() == 0 and not server.service.servicer.sessions, 2.0)
    assert wait_for(lambda: replica.cache_bytes() == [0, 0], 2.0)
    port = server.service.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    active = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "streamgen_streams_active"]
    assert active and active[0].value == 0


def non_loopback_listeners() -> list:
    """Listening sockets of this process, its children and the Ray processes that are not on loopback."""
    import os

    ours = {os.getpid()}
    try:
        ours |= {c.pid for c in psutil.Process().children(recursive=True)}
    except psutil.Error:
        pass
    ray_pids = {p.pid for p in psutil.process_iter(["name", "cmdline"])
                if any(k in " ".join(p.info["cmdline"] or []) for k in ("raylet", "gcs_server", "ray::", "default_worker"))}
    bad = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in ours | ray_pids:
            continue
        if conn.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
            name = " ".join(psutil.Process(conn.pid).cmdline())[:80]
            bad.append((name, conn.laddr.ip, conn.laddr.port))
    return bad


def test_listening_sockets_are_loopback_only(server):
    """S-T12: Ray (GCS, raylet, workers), gRPC and /metrics listen on 127.0.0.1 only, and gloo talks
    over loopback. Runs before the drain test below; reads only this machine's sockets."""
    assert not non_loopback_listeners()
    assert any(c.status == psutil.CONN_LISTEN and c.laddr.port == server.service.port
               for c in psutil.net_connections(kind="inet"))


def test_drain_ends_streams_unavailable_and_refuses_new_ones(server, stub):
    """Last in the module: after it the server stays draining."""
    call = stub.Generate(request(), timeout=60)
    next(call)
    reply = stub.Drain(stream_pb2.DrainRequest(timeout_ms=300))
    assert reply.streams_active == 0
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "retry-after-ms" in dict(err.value.trailing_metadata())
    assert serving(server) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request(max_frames=2), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert stub.GetCapacity(stream_pb2.CapacityRequest(fps=16.0)).draining

