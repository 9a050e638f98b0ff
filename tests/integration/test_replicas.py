"""Two pipeline replicas x 2 stages on 4 logical GPUs; a dead stage on one; SIGTERM drain of `streamgen serve`."""

import dataclasses
import signal
import threading
import time

import grpc
import pytest
import ray

from tests.integration.test_recovery import rebuild_metrics, rebuild_seconds
from tests.integration.test_server import Running, request, serve_process, service_config, stage_start_s, wait_for
from protos.streamgen.v1 import stream_pb2, stream_pb2_grpc



@pytest.fixture(scope="module")
def server():
    base = service_config()
    cfg = dataclasses.replace(base, replicas=2, local_ray_gpus=4.0,
                              parallel=dataclasses.replace(base.parallel, gpus_per_stage=1.0, stage_call_timeout_s=2.0),
                              repair_period_s=1.0, server=dataclasses.replace(base.server, max_streams_per_replica=2))
    running = Running(cfg)
    running.start_s = stage_start_s(cfg)
    try:
        yield running
    finally:
        running.stop()


def test_streams_spread_over_replicas_and_a_dead_stage_spares_the_other_replica(server):
    replicas = server.service.replicas
    assert ray.available_resources().get("GPU", 0) == 0  # 2 replicas x 2 stages hold the 4 logical GPUs
    channel = grpc.insecure_channel(server.target)
    stub = stream_pb2_grpc.StreamServiceStub(channel)
    calls = [stub.Generate(request(seed=i, max_frames=160, late_policy=stream_pb2.DELIVER_FLAGGED), timeout=120)
             for i in range(4)]
    frames = {i: [] for i in range(4)}
    times = {i: [] for i in range(4)}
    firsts = [next(c) for c in calls]
    for i, f in enumerate(firsts):
        frames[i].append(f)
        times[i].append(time.monotonic())
    assert [r.active() for r in replicas] == [2, 2]
    owner = {i: next(r.index for r in replicas if r.holds(f.stream_id)) for i, f in enumerate(firsts)}

    def read(i):
        for f in calls[i]:
            frames[i].append(f)
            times[i].append(time.monotonic())

    readers = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in readers:
        t.start()
    time.sleep(2.0)
    rebuilds_before, rebuild_sum_before = rebuild_metrics(server)
    ray.kill(replicas[0].core.executor.actors[0], no_restart=True)  # a stage of replica 0 dies
    for t in readers:
        t.join(120)
    channel.close()
    # the rebuild as the service measured it: new stage processes on 2 cores shared with the other replica's
    # two streams; the resume budget is the service's own 2 s beyond it
    rebuild_s = rebuild_seconds(server, rebuilds_before, rebuild_sum_before)
    assert rebuild_s > 0
    for i in range(4):
        got = frames[i]
        assert [f.index for f in got] == list(range(160)), i  # every stream completes, indices increasing
        if owner[i] == 1:  # unaffected streams keep their deadlines
            assert sum(not f.deadline_met for f in got) <= 0.01 * len(got)
        else:
            gap = max(b - a for a, b in zip(times[i], times[i][1:]))
            assert gap <= 2.0 + rebuild_s, (gap, rebuild_s, server.start_s)
    assert wait_for(lambda: all(r.active() == 0 for r in replicas), 2.0)


def _fail_rebuilds(host):
    def refuse(split):
        raise RuntimeError("no slots for the replacement stages (injected)")
    host.core.build_executor = refuse


def _collect(call, frames, times, errors):
    try:
        for f in call:
            frames.append(f)
            times.append(time.monotonic())
    except grpc.RpcError as err:
        errors.append((err.code(), time.monotonic()))


def test_streams_of_a_replica_that_cannot_be_rebuilt_move_or_end_unavailable(server):
    replicas = server.service.replicas
    assert wait_for(lambda: all(r.active() == 0 for r in replicas), 5.0)
    channel = grpc.insecure_channel(server.target)
    stub = stream_pb2_grpc.StreamServiceStub(channel)
    # 3 streams: the doomed replica holds 2 (at most 2 each) and the other 1, so one stream finds room there
    calls = [stub.Generate(request(seed=i, max_frames=140), timeout=120) for i in range(3)]
    firsts = [next(c) for c in calls]
    owner = {i: next(r for r in replicas if r.holds(f.stream_id)) for i, f in enumerate(firsts)}
    doomed = max(replicas, key=lambda r: r.active())
    assert doomed.active() == 2
    results = {i: ([firsts[i]], [time.monotonic()], []) for i in range(3)}
    readers = [threading.Thread(target=_collect, args=(calls[i], *results[i])) for i in range(3)]
    for t in readers:
        t.start()
    time.sleep(1.5)
    _fail_rebuilds(doomed)
    killed_at = time.monotonic()
    ray.kill(doomed.core.executor.actors[1], no_restart=True)
    for t in readers:
        t.join(120)
    channel.close()
    moved = ended = 0
    for i in range(3):
        frames, times, errors = results[i]
        assert [f.index for f in frames] == list(range(len(frames)))
        assert all(f.prompt_revision == 0 for f in frames)
        if owner[i] is not doomed:
            assert len(frames) == 140 and not errors
        elif errors:  # no room left anywhere: UNAVAILABLE, quickly
            code, at = errors[0]
            assert code == grpc.StatusCode.UNAVAILABLE and at - killed_at <= 5.0
            ended += 1
        else:  # continued on the other replica
            assert len(frames) == 140
            assert max(b - a for a, b in zip(times, times[1:])) <= 2.5
            moved += 1
    assert (moved, ended) == (1, 1)
    assert doomed.broken and doomed.active() == 0
    # the fixed fleet heals: the broken replica is retired and a replacement takes its logical GPUs
    svc = server.service
    assert wait_for(lambda: doomed not in svc.replicas and in_service(svc) == 2, 60)
    assert repairs(svc, "ok") == 1 and repairs(svc, "failed") == 0


def in_service(svc) -> int:
    return sum(r.in_service for r in svc.replicas) if not svc._starting else -1


def repairs(svc, result: str) -> float:
    return svc.metrics.registry.get_sample_value("streamgen_replica_repairs_total", {"result": result})


def test_operator_drain_of_a_replica_moves_its_streams_and_the_fleet_replaces_it(server):
    svc = server.service
    assert wait_for(lambda: in_service(svc) == 2 and all(r.active() == 0 for r in svc.replicas), 60)
    repaired = repairs(svc, "ok")
    channel = grpc.insecure_channel(server.target)
    stub = stream_pb2_grpc.StreamServiceStub(channel)
    calls = [stub.Generate(request(seed=i, max_frames=120), timeout=120) for i in range(2)]
    firsts = [next(c) for c in calls]
    owner = [next(r for r in svc.replicas if r.holds(f.stream_id)) for f in firsts]
    results = {i: ([firsts[i]], [time.monotonic()], []) for i in range(2)}
    readers = [threading.Thread(target=_collect, args=(calls[i], *results[i])) for i in range(2)]
    for t in readers:
        t.start()
    time.sleep(1.0)
    states = stub.GetCapacity(stream_pb2.CapacityRequest(), timeout=10).replica_states
    assert sorted(s.index for s in states) == sorted(r.index for r in svc.replicas)
    with pytest.raises(grpc.RpcError) as err:
        stub.Drain(stream_pb2.DrainRequest(replica=999), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    reply = stub.Drain(stream_pb2.DrainRequest(replica=owner[0].index, timeout_ms=300), timeout=30)
    assert reply.streams_active == 0
    other = next(r for r in svc.replicas if r is not owner[0])
    assert all(other.holds(f.stream_id) for f in firsts)  # both go on there (whichever held them)
    for t in readers:
        t.join(120)
    channel.close()
    for i in range(2):
        frames, times, errors = results[i]
        assert not errors and [f.index for f in frames] == list(range(120)), i
        assert max(b - a for a, b in zip(times, times[1:])) <= 2.5
    # the drained replica leaves once empty; the fixed fleet starts a replacement
    assert wait_for(lambda: owner[0] not in svc.replicas and in_service(svc) == 2, 60)
    assert repairs(svc, "ok") == repaired + 1


@pytest.mark.parametrize("host", ["driver", "serve"])
def test_sigterm_drains_and_exits_zero(host):
    with serve_process("--drain-timeout", "1", "--replica-host", host) as (proc, port, _):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = stream_pb2_grpc.StreamServiceStub(ch).Generate(request(), timeout=60)
            next(call)
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as err:
                for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # never INTERNAL / UNKNOWN
            assert "retry-after-ms" in dict(err.value.trailing_metadata())
        assert proc.wait(timeout=60) == 0

