"""Metric updates made in a replica process reach the orchestrator's registry: record, pickle, replay."""

import asyncio
import pickle

import pytest

from orchestrator.deployment import MetricEvents, deployment_options, replay
from orchestrator.metrics import Metrics
from workers.batch import StageStats
from tests.integration.test_server import service_config


def value(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_recorded_updates_replay_on_the_orchestrator_registry():
    events = MetricEvents()
    events.stage_errors.labels("died").inc()
    events.stream_migrations.labels("ok").inc(3)
    events.chunk_latency.observe(0.25)
    events.stage_queue_depth.labels(2).set(5)
    events.stage_queue_depth.labels(2).set(1)  # a gauge: the last value wins
    events.observe_stage_stats([StageStats(stage=1, compute_s=0.5, idle_s=0.1, bytes_sent=1000, cache_bytes=77,
                                           tokens=10)])
    metrics = Metrics()
    replay(metrics, pickle.loads(pickle.dumps(events.take())))  # they cross a process boundary
    assert value(metrics, "streamgen_stage_errors_total", kind="died") == 1
    assert value(metrics, "streamgen_stream_migrations_total", result="ok") == 3
    assert value(metrics, "streamgen_chunk_latency_seconds_count") == 1
    assert value(metrics, "streamgen_chunk_latency_seconds_sum") == 0.25
    assert value(metrics, "streamgen_stage_queue_depth", replica="2") == 1
    assert value(metrics, "streamgen_stage_compute_seconds_total", stage="1") == 0.5
    assert value(metrics, "streamgen_cache_bytes", stage="1") == 77
    assert events.take() == []  # taken once


def test_recording_is_bounded_and_unknown_names_do_not_break_replay():
    events = MetricEvents(limit=10)
    for _ in range(25):
        events.chunk_latency.observe(0.1)
    taken = events.take()
    assert len(taken) == 10
    metrics = Metrics()
    replay(metrics, taken + [("no_such_metric", (), "inc", 1.0)])
    assert value(metrics, "streamgen_chunk_latency_seconds_count") == 10


def test_serve_options_reserve_one_bundle_per_stage_behind_the_replica_process():
    import dataclasses

    cfg = dataclasses.replace(service_config(), stages=3, gpus_per_stage=1.0, stage_call_timeout_s=7.0)
    opts = deployment_options(cfg)
    assert opts["placement_group_strategy"] == "STRICT_PACK" and opts["num_replicas"] == 1
    assert [b.get("GPU", 0) for b in opts["placement_group_bundles"]] == [0, 1, 1, 1]
    assert opts["health_check_period_s"] >= 7.0  # the engine gets its stage timeout before Serve steps in


class _Host:
    def __init__(self, forward_ok: bool, recovering: bool):
        self.forward_ok, self.recovering, self.index = forward_ok, recovering, 0

    def probe(self, timeout_s: float) -> bool:
        return self.forward_ok


@pytest.mark.parametrize("forward_ok,recovering,passes", [(True, False, True), (False, True, True),
                                                          (False, False, False)])
def test_serve_health_check_fails_only_when_no_forward_gets_through_and_no_rebuild_is_under_way(
        forward_ok, recovering, passes):
    from orchestrator.deployment import PipelineReplica

    replica = PipelineReplica.__new__(PipelineReplica)  # the check's decision, without Ray or stages
    replica.cfg, replica.host = service_config(), _Host(forward_ok, recovering)
    if passes:
        asyncio.run(replica.check_health())
    else:
        with pytest.raises(RuntimeError, match="forward through every stage"):
            asyncio.run(replica.check_health())


def test_prompt_switches_a_lost_replica_had_not_applied_are_replayed_once_each():
    from types import SimpleNamespace

    from orchestrator.deployment import prompt_catch_up

    assert prompt_catch_up(("a fox", 0), None) is None  # nothing asked, nothing finished
    assert prompt_catch_up(("an owl", 2), None) == ("an owl", 2)  # switched twice before the first chunk
    assert prompt_catch_up(("an owl", 2), SimpleNamespace(revision=1)) == ("an owl", 1)
    assert prompt_catch_up(("an owl", 2), SimpleNamespace(revision=2)) is None  # already applied
