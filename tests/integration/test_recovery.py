"""A dead or hung stage: the replica rebuilds its stages and streams go on (re-cache), or end UNAVAILABLE."""

import dataclasses
import os
import signal
import threading
import time

import grpc
import pytest
import ray

from tests.integration.test_server import Running, request, service_config, wait_for
from protos.streamgen.v1 import stream_pb2_grpc


@pytest.fixture(scope="module")
def server():
    base = service_config()
    cfg = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, stage_call_timeout_s=2.0),
                              server=dataclasses.replace(base.server, probe_period_s=0.5, probe_timeout_s=0.5))
    running = Running(cfg)
    try:
        yield running
    finally:
        running.stop()


def metric(server, name, **labels) -> float:
    for fam in server.service.metrics.registry.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def rebuild_metrics(server) -> tuple[float, float]:
    return (metric(server, "streamgen_stage_rebuild_seconds_count"),
            metric(server, "streamgen_stage_rebuild_seconds_sum"))


def rebuild_seconds(server, count_before: float, sum_before: float) -> float:
    """Seconds of the one stage rebuild since (count_before, sum_before), as the service measured it."""
    assert wait_for(lambda: rebuild_metrics(server)[0] >= count_before + 1, 5.0)  # exported by the next probe
    count, total = rebuild_metrics(server)
    assert count == count_before + 1, (count, count_before)
    return total - sum_before


def run_with_fault(server, fault, frames_before=20, total=110):
    """Stream `total` frames; inject `fault(executor)` after `frames_before`; returns (frames, receive times)."""
    frames, times = [], []
    with grpc.insecure_channel(server.target) as ch:
        call = stream_pb2_grpc.StreamServiceStub(ch).Generate(request(max_frames=total), timeout=120)
        for f in call:
            frames.append(f)
            times.append(time.monotonic())
            if len(frames) == frames_before:
                fault(server.service.replicas[0].core.executor)
    return frames, times


def check_lost(lost: float, stalls: list[float], fps: float = 16.0) -> None:
    """Frames counted lost are the frame slots the stalls left empty (late-policy drop): at least one
    where a stall spanned several intervals, none where the look-ahead buffer hid it (a late frame is
    dropped, its slot is not lost), never more than the stalls span."""
    interval = 1.0 / fps
    assert lost <= sum(int(stall * fps) for stall in stalls), (lost, stalls)
    if min(stalls) > 4 * interval:
        assert lost >= 1, (lost, stalls)
    if max(stalls) < 2.5 * interval:
        assert lost == 0, (lost, stalls)


def check_resumed(frames, times, bound_s, fault_index=20):
    """Returns the longest gap after the fault (printed by the test for the record)."""
    assert [f.index for f in frames] == list(range(len(frames)))  # strictly increasing, no duplicates
    assert len({f.stream_id for f in frames}) == 1
    assert all(f.prompt_revision == 0 for f in frames)  # the same prompt goes on
    chunks = [f.chunk for f in frames]
    assert chunks == sorted(chunks)  # no chunk from before the fault shows up again
    gap = max(b - a for a, b in zip(times[fault_index - 1:], times[fault_index:]))
    assert gap <= bound_s, gap
    return gap


@pytest.mark.parametrize("how", ["ray_kill", "sigkill"])
def test_dead_stage_stream_resumes(server, how):
    failures = lambda: sum(metric(server, "streamgen_stage_errors_total", kind=k) for k in ("died", "error"))  # noqa: E731
    died, migrated, lost = (failures(),
                            metric(server, "streamgen_stream_migrations_total", result="ok"),
                            metric(server, "streamgen_frames_total", outcome="lost"))
    rebuilds_before, rebuild_sum_before = rebuild_metrics(server)

    def fault(executor):
        if how == "ray_kill":
            ray.kill(executor.actors[1], no_restart=True)
        else:
            os.kill(executor.pids()[0], signal.SIGKILL)

    frames, times = run_with_fault(server, fault)
    assert len(frames) == 110
    rebuild_s = rebuild_seconds(server, rebuilds_before, rebuild_sum_before)
    gap = check_resumed(frames, times, bound_s=2.0 + rebuild_s)  # the service's 2 s beyond the rebuild it measured
    assert failures() == died + 1
    assert metric(server, "streamgen_stream_migrations_total", result="ok") == migrated + 1
    check_lost(metric(server, "streamgen_frames_total", outcome="lost") - lost, [gap])


def test_hung_stage_fails_over_without_zombie_frames(server):
    timeouts = metric(server, "streamgen_stage_errors_total", kind="timeout")
    rebuilds_before, rebuild_sum_before = rebuild_metrics(server)
    stopped = []

    def fault(executor):
        pid = executor.pids()[1]
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
        threading.Timer(8.0, lambda: _cont(pid)).start()

    frames, times = run_with_fault(server, fault, total=200)
    assert len(frames) == 200
    # the 2 s call timeout, then the rebuild as the service measured it (new stage processes: an idle start
    # is not its bound once the suite's other processes share the 2 cores), then 2 s to resume
    rebuild_s = rebuild_seconds(server, rebuilds_before, rebuild_sum_before)
    check_resumed(frames, times, bound_s=2.0 + rebuild_s + 2.0)
    assert metric(server, "streamgen_stage_errors_total", kind="timeout") == timeouts + 1
    replica = server.service.replicas[0]
    assert wait_for(lambda: replica.active() == 0, 2.0)
    chunks = replica.core.engine.stats.chunks
    delivered = metric(server, "streamgen_frames_total", outcome="delivered")
    time.sleep(max(0.0, 8.5 - (times[-1] - times[20])))  # past the SIGCONT of the stopped stage
    # nothing else arrives: the resumed stage's old micro-batches finish no chunk and send no frame
    assert replica.core.engine.stats.chunks == chunks
    assert metric(server, "streamgen_frames_total", outcome="delivered") == delivered


def _cont(pid):
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # already killed by the failover
        pass


def test_readiness_needs_a_real_forward_not_a_live_process(server):
    """F20: the engine loop is blocked while the process lives: readiness goes NOT_SERVING, streams are
    refused UNAVAILABLE, and it comes back once the loop answers again."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def status():
        with grpc.insecure_channel(server.target) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="streamgen.v1.StreamService"), timeout=5).status

    assert wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 3.0)
    from workers.core_messages import Call

    replica = server.service.replicas[0]
    release = threading.Event()
    replica.core.submit(Call(lambda: release.wait(10)))  # the loop is stuck
    try:
        assert wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 2.5)
        with grpc.insecure_channel(server.target) as ch:
            with pytest.raises(grpc.RpcError) as err:
                list(stream_pb2_grpc.StreamServiceStub(ch).Generate(request(max_frames=2), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
    assert wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 3.0)
