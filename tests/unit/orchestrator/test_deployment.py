"""The Serve deployment's options and health decision, and the one metrics path: CoreStats structs that
an engine core returns with its outputs (in this process or, pickled, from a Serve replica) become metrics."""

import asyncio
import dataclasses
import pickle

import pytest

from orchestrator.deployment import deployment_options
from orchestrator.metrics import Metrics
from tests.integration.test_server import service_config
from workers.batch import StageStats
from workers.core_messages import CoreStats


def value(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_core_stats_cross_a_process_boundary_and_become_metrics():
    stats = CoreStats(stage_stats=[StageStats(stage=1, compute_s=0.5, idle_s=0.1, bytes_sent=1000, cache_bytes=77,
                                              tokens=10, gpu_used_bytes=5 << 30, gpu_reserved_bytes=6 << 30),
                                   StageStats(stage=0, compute_s=0.5, idle_s=0.1, bytes_sent=1000, cache_bytes=77,
                                              tokens=10)],  # a CPU stage: no GPU memory series
                      chunk_latency_s=[0.25, 0.5], decode_s=[0.125], stage_errors={"died": 1, "timeout": 2},
                      engine_errors=1, migrations=3, inflight=2)
    metrics = Metrics()
    metrics.export_core_stats(pickle.loads(pickle.dumps(stats)), replica=4)
    metrics.export_core_stats(CoreStats(inflight=1), replica=4)  # inflight is a gauge: the last value wins
    assert value(metrics, "streamgen_stage_errors_total", kind="died") == 1
    assert value(metrics, "streamgen_stage_errors_total", kind="timeout") == 2
    assert value(metrics, "streamgen_engine_errors_total", kind="exception") == 1
    assert value(metrics, "streamgen_stream_migrations_total", result="ok") == 3
    assert value(metrics, "streamgen_chunk_latency_seconds_count") == 2
    assert value(metrics, "streamgen_chunk_latency_seconds_sum") == 0.75
    assert value(metrics, "streamgen_stage_compute_seconds_total", stage="1") == 0.5
    assert value(metrics, "streamgen_cache_bytes", stage="1") == 77
    assert value(metrics, "streamgen_gpu_memory_bytes", stage="1", kind="used") == 5 << 30
    assert value(metrics, "streamgen_gpu_memory_bytes", stage="1", kind="reserved") == 6 << 30
    assert metrics.registry.get_sample_value("streamgen_gpu_memory_bytes", {"stage": "0", "kind": "used"}) is None
    assert value(metrics, "streamgen_decode_seconds_sum") == 0.125
    assert value(metrics, "streamgen_stage_microbatches_inflight", replica="4") == 1
    assert value(metrics, "streamgen_stage_queue_depth", replica="4") == 1  # the deprecated alias follows


def test_serve_options_reserve_one_bundle_per_stage_behind_the_replica_process():
    base = service_config()
    cfg = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, stages=3, gpus_per_stage=1.0,
                                                                 stage_call_timeout_s=7.0))
    opts = deployment_options(cfg)
    assert opts["placement_group_strategy"] == "STRICT_PACK" and opts["num_replicas"] == 1
    assert [b.get("GPU", 0) for b in opts["placement_group_bundles"]] == [0, 1, 1, 1]
    dedicated = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, decode="dedicated",
                                                                      decode_workers=2))
    assert [b.get("GPU", 0) for b in deployment_options(dedicated)["placement_group_bundles"]] == [0, 1, 1, 1, 1, 1]
    assert opts["health_check_period_s"] >= 7.0  # the engine gets its stage timeout before Serve steps in


class _Core:
    def __init__(self, forward_ok: bool, recovering: bool):
        self.forward_ok, self.recovering = forward_ok, recovering

    def probe(self, timeout_s: float) -> bool:
        return self.forward_ok

    def shutdown(self) -> None:
        pass


@pytest.mark.parametrize("forward_ok,recovering,passes", [(True, False, True), (False, True, True),
                                                          (False, False, False)])
def test_serve_health_check_fails_only_when_no_forward_gets_through_and_no_rebuild_is_under_way(
        forward_ok, recovering, passes):
    from orchestrator.deployment import PipelineDeployment

    deployment = PipelineDeployment.__new__(PipelineDeployment)  # the check's decision, without Ray or stages
    deployment.cfg, deployment.index, deployment.core = service_config(), 0, _Core(forward_ok, recovering)
    if passes:
        asyncio.run(deployment.check_health())
        assert deployment.healthy is forward_ok
    else:
        with pytest.raises(RuntimeError, match="forward through every stage"):
            asyncio.run(deployment.check_health())
