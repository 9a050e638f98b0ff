"""S-T8, S-T9, S5, S6: server-wide abuse limits, each a config key, each against a real server on 127.0.0.1:
keepalive enforcement (GOAWAY too_many_pings), maximum_concurrent_rpcs (health still answers), the maximum
stream duration (Generate and Transform, paused too), and message limits set from the frame size."""

import asyncio
import itertools
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.auth import HEALTH_RPCS
from orchestrator.client import StreamgenClient
from orchestrator.config import TenantQuota, TenantsConfig
from protos.streamgen.v1 import stream_pb2
from tests.integration.test_transform import clip
from tests.secured import OWN_POOL, config, health, request, start, stub

SERVING = health_pb2.HealthCheckResponse.SERVING


def pinging(target: str, every_ms: int) -> grpc.Channel:
    """A channel that pings its connection every ``every_ms``, with or without calls or data."""
    return grpc.insecure_channel(target, options=[
        OWN_POOL, ("grpc.keepalive_time_ms", every_ms), ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1)])


def idle_watch(channel: grpc.Channel, timeout: float):
    """A health Watch: one answer, then an idle stream (no data), so pings on it are 'without data'."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    assert next(watch).status == SERVING
    with pytest.raises(grpc.RpcError) as err:
        next(watch)
    return err.value


def test_keepalive_abuse_gets_goaway_and_polite_clients_are_untouched():
    running = start(config(min_recv_ping_interval_s=1.0, max_ping_strikes=2))
    try:
        with grpc.insecure_channel(running.target, options=[OWN_POOL]) as bystander:
            assert health(bystander) == SERVING
            started = time.monotonic()
            with pinging(running.target, 100) as abusive:
                err = idle_watch(abusive, timeout=20)
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "ping" in err.details().lower(), err.details()
            assert time.monotonic() - started < 15
            # pings spaced beyond min_recv_ping_interval_s are no strikes: the stream lives to its deadline
            with pinging(running.target, 1500) as polite:
                assert idle_watch(polite, timeout=4).code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert health(bystander) == SERVING  # other connections were never affected
    finally:
        running.stop()


def test_over_maximum_concurrent_rpcs_gets_resource_exhausted_while_health_answers():
    # an open server (no tokens): the tenant quota of 1 stream does not apply, the call limit does
    running = start(config(maximum_concurrent_rpcs=2, tenants=TenantsConfig(default=TenantQuota(max_streams=1))))
    refusals = "streamgen_concurrent_rpc_refusals_total"
    try:
        with grpc.insecure_channel(running.target) as ch:
            s = stub(ch)
            streams = [s.Generate(request(seed=i), timeout=60) for i in range(2)]
            sids = [next(call).stream_id for call in streams]
            for over in (lambda: list(s.Generate(request(max_frames=1), timeout=10)),
                         lambda: s.GetCapacity(stream_pb2.CapacityRequest(), timeout=10)):
                with pytest.raises(grpc.RpcError) as err:
                    over()
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "retry-after-ms" in dict(err.value.trailing_metadata())
            assert running.service.metrics.registry.get_sample_value(refusals) == 2
            assert health(ch) == SERVING and health(ch, "streamgen.v1.StreamService") == SERVING
            # 200 more idle connections: health still answers on a new one
            idle = [grpc.insecure_channel(running.target, options=[OWN_POOL]) for _ in range(200)]
            try:
                for c in idle:
                    grpc.channel_ready_future(c).result(timeout=10)
                with grpc.insecure_channel(running.target, options=[OWN_POOL]) as fresh:
                    assert health(fresh) == SERVING
            finally:
                for c in idle:
                    c.close()
            for sid, call in zip(sids, streams):
                call.cancel()
            with pytest.raises(grpc.RpcError):
                next(streams[0])
            assert len(list(s.Generate(request(max_frames=1), timeout=30))) == 1  # slots come back
    finally:
        running.stop()


def test_unauthenticated_health_watches_are_bounded_apart_from_the_service():
    """Health is open to anyone, so it has its own call limit (HEALTH_RPCS): a flood of Watch streams is
    refused past it and the service's calls still run."""
    running = start(config(maximum_concurrent_rpcs=4))
    try:
        with grpc.insecure_channel(running.target) as ch:
            health_stub = health_pb2_grpc.HealthStub(ch)
            watches = [health_stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
                       for _ in range(HEALTH_RPCS)]
            assert all(next(w).status == SERVING for w in watches)
            with pytest.raises(grpc.RpcError) as err:
                next(health_stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(list(stub(ch).Generate(request(max_frames=2), timeout=30))) == 2
            for w in watches:
                w.cancel()
    finally:
        running.stop()


def test_a_stream_ends_deadline_exceeded_at_the_maximum_duration_even_paused():
    running = start(config(max_stream_duration_s=1.0))
    ended = ("streamgen_streams_ended_total", {"reason": "max_duration"})
    try:
        with grpc.insecure_channel(running.target) as ch:
            s = stub(ch)
            started = time.monotonic()
            flowing, paused = s.Generate(request(), timeout=30), s.Generate(request(seed=2), timeout=30)
            next(flowing)
            s.Control(stream_pb2.ControlRequest(stream_id=next(paused).stream_id, paused=True))
            for call in (flowing, paused):
                with pytest.raises(grpc.RpcError) as err:
                    list(call)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "maximum duration" in err.value.details()
            assert 1.0 <= time.monotonic() - started < 5.0
        assert running.service.metrics.registry.get_sample_value(*ended) == 2
    finally:
        running.stop()


def test_a_transform_ends_deadline_exceeded_at_the_maximum_duration_even_paused():
    """The same for video-to-video: paused while its chunks still come back (input goes on, so it is not idle)."""
    running = start(config(max_stream_duration_s=2.0))
    ended = ("streamgen_streams_ended_total", {"reason": "max_duration"})

    async def paused():
        async with StreamgenClient(running.target) as client:
            controls: asyncio.Queue = asyncio.Queue()
            live = (image for _ in itertools.count() for image in clip(16))
            call = client.transform(live, "a neon city", fps=16.0, encoding="raw_rgb", input_fps=16.0,
                                    controls=controls, timeout=10)
            got = 0
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    got += 1
                    if got == 1:  # the rest of its chunk is still to go out
                        await controls.put({"paused": True})
            return err.value, got

    try:
        started = time.monotonic()
        err, got = asyncio.run(paused())
        assert got >= 1 and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "maximum duration" in err.details()
        assert 2.0 <= time.monotonic() - started < 6.0
        assert running.service.metrics.registry.get_sample_value(*ended) == 1
    finally:
        running.stop()


def test_message_limits_follow_the_frame_size():
    """The send limit is one raw frame + message_overhead_bytes: raw frames pass; the receive limit (here set
    to its minimum, one raw frame + overhead) refuses a larger request in the library."""
    frame = 96 * 64 * 3
    running = start(config(max_receive_message_bytes=frame + 65536))
    try:
        with grpc.insecure_channel(running.target) as ch:
            frames = list(stub(ch).Generate(request(max_frames=3, encoding=stream_pb2.RAW_RGB), timeout=30))
            assert [len(f.data) for f in frames] == [frame] * 3
            with pytest.raises(grpc.RpcError) as err:
                list(stub(ch).Generate(request(prompt="x" * (frame + 65536)), timeout=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert health(ch) == SERVING
    finally:
        running.stop()
