"""bench/pipeline_scaling.py runs end to end (tiny model, a few chunks, one repeat): every case measured after
the same warm-up, the ratios taken from the measured rates, with --ring-ceiling. Not a speed threshold: the real run is `make bench`."""

import os

import pytest

from tests.unit.bench.runner import run_bench


def test_pipeline_scaling_bench_smoke(tmp_path):
    out = tmp_path / "pipeline_scaling.json"
    proc, result = run_bench("pipeline_scaling.py", "--model", "tiny", "--chunks", "4", "--warmup", "2", "--repeats", "1",
                             "--ring-ceiling", out=out, timeout=500)
    cases = result["cases"]
    assert {(c["stages"], c["mode"], c["streams"]) for c in cases.values()} == {
        (1, "stream_batch", 1), (2, "stream_batch", 1), (1, "sequential", 4), (2, "sequential", 4),
        (1, "sequential", 1)}
    for c in cases.values():
        assert c["warmup_chunks"] == 2  # every case leaves the same warm-up out (the caches fill in it)
        assert c["micro_batches_per_call"] == 5  # the default here, the same for every case
        assert c["chunks_measured"] > 0 and c["frames_per_s"] > 0 and len(c["repeats_frames_per_s"]) == 1
        assert 0 < c["latency_p50_s"] <= c["latency_p99_s"]
        assert len(c["split"]) == c["stages"] == len(c["pinned_cores"])
    assert result["machine"]["pin_cores"] is True and result["machine"]["micro_batches_per_call"] == 5
    if len(os.sched_getaffinity(0)) >= 2:  # two stages, two cores: a core each
        pinned = cases["sequential4_P2"]["pinned_cores"]
        assert None not in pinned and len({core for claim in pinned for core in claim}) == 2
    ratios = result["ratios"]
    assert ratios["sequential_P2_over_P1"] == pytest.approx(
        cases["sequential4_P2"]["frames_per_s"] / cases["sequential4_P1"]["frames_per_s"])
    assert ratios["stream_batch_P2_over_P1"] == pytest.approx(
        cases["stream_batch_P2"]["frames_per_s"] / cases["stream_batch_P1"]["frames_per_s"])
    assert f"sequential={ratios['sequential_P2_over_P1']:.2f}x" in proc.stdout
    [ring] = result["ring_ceiling"]  # --ring-ceiling: the same case's stages without Ray, once per repeat
    assert ring["P2_messages"]["activations"] == ring["P2_ticks"]
    assert ratios["sequential_ring_P2_over_P1"] == ring["ratio"]
    assert ratios["sequential_engine_over_ring"] == pytest.approx(ratios["sequential_P2_over_P1"] / ring["ratio"])
