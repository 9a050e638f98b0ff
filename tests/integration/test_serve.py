"""Pipeline replicas as Ray Serve deployments (`replica_host: serve`): 2 replicas x 2 stages on 4 logical
GPUs. Placement, spread, a dead stage inside a replica, a dead replica process, a hung stage, Serve's
health check, an operator's drain (SIGTERM: tests/integration/test_replicas.py, both hosting modes)."""

import dataclasses
import os
import signal
import threading
import time

import grpc
import pytest
import ray

from tests.integration.test_recovery import check_lost, metric, rebuild_metrics, rebuild_seconds
from tests.integration.test_replicas import _collect
from tests.integration.test_server import Running, non_loopback_listeners, request, service_config, stage_start_s, \
    wait_for
from protos.streamgen.v1 import stream_pb2, stream_pb2_grpc



@pytest.fixture(scope="module")
def server():
    base = service_config()
    cfg = dataclasses.replace(base, replicas=2, local_ray_gpus=4.0, replica_host="serve", repair_period_s=1.0,
                              parallel=dataclasses.replace(base.parallel, gpus_per_stage=1.0, stage_call_timeout_s=2.0),
                              server=dataclasses.replace(base.server, max_streams_per_replica=2, probe_period_s=0.5,
                                                         probe_timeout_s=1.0))
    running = Running(cfg)
    running.start_s = stage_start_s(cfg)
    try:
        yield running
    finally:
        running.stop()


def owners(server, firsts) -> list:
    return [next(r for r in server.service.replicas if r.holds(f.stream_id)) for f in firsts]


def start_streams(server, n: int, frames: int, **kw):
    """n streams; returns (channel, results {i: (frames, times, errors)}, reader threads, owners)."""
    channel = grpc.insecure_channel(server.target)
    stub = stream_pb2_grpc.StreamServiceStub(channel)
    calls = [stub.Generate(request(seed=i, max_frames=frames, **kw), timeout=120) for i in range(n)]
    try:
        firsts = [next(c) for c in calls]
    except grpc.RpcError as err:  # say what admission saw (a CI run was refused: "no capacity")
        steps = server.service.cfg.generation.sampler.num_steps
        seen = [(r.index, r.active(), round(r.load(), 3), r.max_streams(16.0, steps), r.healthy, r.draining)
                for r in server.service.replicas]
        raise AssertionError(f"{err.code()}: {err.details()}; replicas (index, active, load, max_streams at 16 fps, "
                             f"healthy, draining): {seen}") from err
    results = {i: ([firsts[i]], [time.monotonic()], []) for i in range(n)}
    readers = [threading.Thread(target=_collect, args=(calls[i], *results[i])) for i in range(n)]
    for t in readers:
        t.start()
    return channel, results, readers, owners(server, firsts)


def finish(channel, readers) -> None:
    for t in readers:
        t.join(120)
    channel.close()


def settle(server) -> None:
    svc = server.service
    assert wait_for(lambda: sum(not r.draining and r.healthy for r in svc.replicas) == 2 and not svc._starting
                    and all(r.active() == 0 for r in svc.replicas), 60)


def test_each_replica_is_a_serve_deployment_holding_its_stages_in_its_placement_group(server):
    from ray import serve

    apps = serve.status().applications
    replicas = server.service.replicas
    for r in replicas:
        assert apps[r.app].status == "RUNNING"
        assert apps[r.app].deployments["PipelineDeployment"].status == "HEALTHY"
    assert ray.available_resources().get("GPU", 0) == 0  # 2 replicas x 2 stages hold the 4 logical GPUs
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    ours = [g for g in groups if len(g["bundles"]) == 3 and g["strategy"] == "STRICT_PACK"]
    assert len(ours) == 2
    for g in ours:  # bundle 0: the replica process; 1..P: one stage (one GPU) each
        assert [b.get("GPU", 0) for b in g["bundles"].values()] == [0, 1, 1]
    replica_pids = {r.pid() for r in replicas}
    stage_pids = {pid for r in replicas for pid in ray.get([a.pid.remote() for a in r.stage_actors()])}
    assert len(replica_pids) == 2 and len(stage_pids) == 4 and not replica_pids & stage_pids


def test_serve_and_the_replicas_listen_on_loopback_only(server):
    assert not non_loopback_listeners()  # Serve runs without proxies; the orchestrator is the ingress


def test_streams_spread_complete_in_order_and_metrics_reach_the_orchestrator(server):
    settle(server)
    before = metric(server, "streamgen_chunk_latency_seconds_count")
    channel, results, readers, owner = start_streams(server, 4, 48)
    assert sorted(r.index for r in owner) == [0, 0, 1, 1]  # the most headroom spreads them
    finish(channel, readers)
    for i in range(4):
        frames, _, errors = results[i]
        assert not errors and [f.index for f in frames] == list(range(48))
        assert sum(not f.deadline_met for f in frames) <= 0.01 * 48
    # chunk latencies are measured in the replica processes and come back as stats with their outputs
    assert wait_for(lambda: metric(server, "streamgen_chunk_latency_seconds_count") >= before + 4 * 48 / 12, 5)


def test_a_video_to_video_stream_through_a_serve_replica_keeps_its_frames_in_order(server):
    """Input chunks travel as Serve calls to the replica process, whose core takes them in the order sent."""
    import asyncio

    from tests.integration.test_transform import clip, run_transform

    settle(server)
    got, trailers = asyncio.run(run_transform(server.target, clip(41), 8.0, budget_ms=8000))
    assert [f.input_index for _, f in got] == list(range(41))
    assert trailers.get("input-accepted") == "41"


@pytest.mark.parametrize("how", ["ray_kill", "sigkill"])
def test_dead_stage_inside_a_replica_resumes_and_spares_the_other_replica(server, how):
    settle(server)
    errors_before = metric(server, "streamgen_stage_errors_total", kind="died")
    rebuilds_before, rebuild_sum_before = rebuild_metrics(server)
    channel, results, readers, owner = start_streams(server, 4, 120, late_policy=stream_pb2.DELIVER_FLAGGED)
    time.sleep(2.0)
    victim = server.service.replicas[0]
    stage = victim.stage_actors()[1]
    killed_at = time.monotonic()
    if how == "ray_kill":
        ray.kill(stage, no_restart=True)
    else:
        os.kill(ray.get(stage.pid.remote()), signal.SIGKILL)
    finish(channel, readers)
    # the victim's rebuild, as the service measured it (new stage processes on 2 cores shared with the other
    # replica's streams and the Serve processes); the resume budget is the service's own 2 s beyond it
    rebuild_s = rebuild_seconds(server, rebuilds_before, rebuild_sum_before)
    for i in range(4):
        frames, times, errors = results[i]
        assert not errors and [f.index for f in frames] == list(range(120)), i
        if owner[i] is victim:
            after = [b - a for a, b in zip(times, times[1:]) if b > killed_at]
            assert max(after) <= 2.0 + rebuild_s, (max(after), rebuild_s, server.start_s)
        else:
            assert sum(not f.deadline_met for f in frames) <= 0.01 * len(frames)
    assert wait_for(lambda: metric(server, "streamgen_stage_errors_total", kind="died") > errors_before, 5)


def test_dead_replica_process_moves_its_streams_to_the_other_replica(server):
    settle(server)
    moved_before = metric(server, "streamgen_stream_migrations_total", result="ok")
    losses_before = metric(server, "streamgen_engine_errors_total", kind="replica_lost")
    lost_before = metric(server, "streamgen_frames_total", outcome="lost")
    channel, results, readers, owner = start_streams(server, 2, 120)
    time.sleep(1.5)
    victim = owner[0]  # the other replica has room for every stream of the victim (2 at most each)
    killed_at = time.monotonic()
    os.kill(victim.pid(), signal.SIGKILL)  # the replica process: its engine loop and, with it, its stages
    finish(channel, readers)
    stalls = []
    for i in range(2):
        frames, times, errors = results[i]
        assert not errors and [f.index for f in frames] == list(range(120)), i
        assert all(f.prompt_revision == 0 for f in frames)
        chunks = [f.chunk for f in frames]
        assert chunks == sorted(chunks)  # continues from its checkpoint: no chunk shows up twice
        if owner[i] is victim:
            after = [b - a for a, b in zip(times, times[1:]) if b > killed_at]
            assert max(after) <= 2.5, max(after)
            stalls.append(max(after))
    moved = sum(o is victim for o in owner)
    assert metric(server, "streamgen_stream_migrations_total", result="ok") == moved_before + moved
    # one incident, however many streams it took down
    assert metric(server, "streamgen_engine_errors_total", kind="replica_lost") == losses_before + 1
    check_lost(metric(server, "streamgen_frames_total", outcome="lost") - lost_before, stalls)
    settle(server)  # Serve restarted the replica process; it serves again


def test_a_prompt_switch_survives_the_death_of_its_replica_process(server):
    settle(server)
    channel, results, readers, owner = start_streams(server, 1, 120)
    frames, times, errors = results[0]
    stub = stream_pb2_grpc.StreamServiceStub(channel)
    stub.Control(stream_pb2.ControlRequest(stream_id=frames[0].stream_id, prompt="an owl at night"), timeout=10)
    assert wait_for(lambda: frames[-1].prompt_revision == 1, 10)
    os.kill(owner[0].pid(), signal.SIGKILL)
    finish(channel, readers)
    assert not errors and [f.index for f in frames] == list(range(120))
    revisions = [f.prompt_revision for f in frames]
    assert revisions == sorted(revisions) and revisions[-1] == 1  # the new prompt goes on, never the old
    settle(server)


def test_hung_stage_fails_over_without_zombie_frames(server):
    settle(server)
    rebuilds_before, rebuild_sum_before = rebuild_metrics(server)
    channel, results, readers, owner = start_streams(server, 1, 140)
    time.sleep(1.5)
    pid = ray.get(owner[0].stage_actors()[0].pid.remote())
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        time.sleep(8.0)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # already replaced and killed
            pass
    finish(channel, readers)
    frames, times, errors = results[0]
    assert not errors and [f.index for f in frames] == list(range(140))
    chunks = [f.chunk for f in frames]
    assert chunks == sorted(chunks)  # no late frame of the stopped pipeline reached the client
    after = [b - a for a, b in zip(times, times[1:]) if b > stopped_at]
    # the 2 s stage call timeout, then the rebuild in the replica's bundles as the service measured it (new
    # stage processes on 2 cores shared with the Serve processes), then the service's own 2 s to resume
    rebuild_s = rebuild_seconds(server, rebuilds_before, rebuild_sum_before)
    assert max(after) <= 2.0 + rebuild_s + 2.0, (max(after), rebuild_s, server.start_s)


def test_health_check_runs_a_real_forward_and_a_stopped_stage_is_replaced(server):
    """A stopped stage leaves every process alive. The check (a forward through every stage) fails,
    readiness goes off so no stream lands there, the replica replaces the stage, and readiness returns."""
    settle(server)
    replica = server.service.replicas[1]
    stage_pids = set(ray.get([a.pid.remote() for a in replica.stage_actors()]))
    stopped = sorted(stage_pids)[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        assert wait_for(lambda: not replica.healthy, 10)
        assert wait_for(lambda: _stage_pids_or_none(replica) not in (None, stage_pids), 60)
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)
        except ProcessLookupError:  # already killed by the rebuild
            pass
    settle(server)


def _stage_pids_or_none(replica):
    try:
        return set(ray.get([a.pid.remote() for a in replica.stage_actors()], timeout=5))
    except Exception:  # noqa: BLE001 - rebuilding or restarting
        return None


def test_operator_drain_moves_streams_and_a_replacement_starts(server):
    settle(server)
    svc = server.service
    channel, results, readers, owner = start_streams(server, 2, 100)
    time.sleep(1.0)
    stub = stream_pb2_grpc.StreamServiceStub(channel)
    reply = stub.Drain(stream_pb2.DrainRequest(replica=owner[0].index, timeout_ms=300), timeout=30)
    assert reply.streams_active == 0
    others = [r for r in svc.replicas if r is not owner[0]]
    # the drained replica holds nothing; its streams are re-opened on another one from their checkpoints
    assert wait_for(lambda: all(any(r.holds(f.stream_id) for r in others)
                                for f in (results[0][0][0], results[1][0][0])), 5)
    finish(channel, readers)
    for i in range(2):
        frames, times, errors = results[i]
        assert not errors and [f.index for f in frames] == list(range(100))
        # 2 s beyond one stage-process start: the replacement replica's processes start on the same 2 cores
        # while the moved stream re-caches on the other replica
        gap = max(b - a for a, b in zip(times, times[1:]))
        assert gap <= 2.0 + server.start_s, (gap, server.start_s)
    assert wait_for(lambda: owner[0] not in svc.replicas, 30)
    settle(server)  # the fixed fleet is back to 2
