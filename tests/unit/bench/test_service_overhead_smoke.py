"""bench/service_overhead.py runs end to end (tiny model, a few chunks): both paths measured, the ratio taken
from the two measured rates. Not a speed threshold: the real run is `make bench`."""

import pytest

from tests.unit.bench.runner import run_bench


def test_service_overhead_bench_smoke(tmp_path):
    out = tmp_path / "service_overhead.json"
    proc, result = run_bench("service_overhead.py", "--model", "tiny", "--chunk-frames", "1", "--chunks", "3",
                             "--warmup", "1", "--repeats", "1", out=out, timeout=400)
    assert result["load"] == {"model": "tiny", "stages": 2, "streams": 2, "mode": "sequential", "chunk_frames": 1,
                              "steps": 4, "warmup_chunks": 1, "measured_chunks": 3, "backend": "ray",
                              "threads_per_stage": 1, "encoding": "jpeg"}
    (engine,), (service,) = result["engine_runs"], result["service_runs"]
    # The clients received exactly what the engine delivered per stream, and every rate is a measured one.
    assert service["frames_per_stream"] == engine["frames_per_stream"]
    assert all(n > 0 for n in engine["frames_per_stream"])
    for run in (engine, service):
        assert run["window_s"] > 0 and run["window_frames"] > 0
        assert run["frames_per_s"] == pytest.approx(run["window_frames"] / run["window_s"])
    assert result["engine_frames_per_s"] == engine["frames_per_s"]
    assert result["service_frames_per_s"] == service["frames_per_s"]
    ratio = service["frames_per_s"] / engine["frames_per_s"]
    assert result["service_over_engine"] == pytest.approx(ratio) and ratio > 0
    assert result["service_settings"]["client_late_policy"] == "deliver_flagged"
    assert 0 < result["service_settings"]["client_fps"] <= 60.0
    assert f"service/engine frames/s = {ratio:.3f}" in proc.stdout
