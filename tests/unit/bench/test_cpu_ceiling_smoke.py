"""bench/cpu_ceiling.py runs end to end (a few iterations): both timings measured, the two processes timed from a
common start, the ratio taken from them."""

import pytest

from tests.unit.bench.runner import run_bench


def test_cpu_ceiling_bench_smoke(tmp_path):
    out = tmp_path / "cpu_ceiling.json"
    proc, result = run_bench("cpu_ceiling.py", "--iters", "3", "--repeats", "1", out=out)
    (alone,), (together,) = result["alone_s"], result["together_s"]
    assert alone > 0 and together > 0
    (spread,) = result["together_start_spread_s"]  # the two timed loops start together (a barrier after set-up)
    assert 0 <= spread < 0.1
    assert result["two_over_one"] == pytest.approx(2 * alone / together)
    assert f"two cores / one core = {result['two_over_one']:.2f}" in proc.stdout
