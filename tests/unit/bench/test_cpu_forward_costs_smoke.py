"""bench/cpu_forward_costs.py runs end to end on `tiny`: both parts measured, the printed ratios taken from them."""

import pytest

from tests.unit.bench.runner import run_bench


def test_cpu_forward_costs_bench_smoke(tmp_path):
    out = tmp_path / "cpu_forward_costs.json"
    proc, result = run_bench("cpu_forward_costs.py", "--model", "tiny", "--rounds", "1", "--repeats", "1", out=out)
    two, four = result["per_stream_s"]["2"], result["per_stream_s"]["4"]
    assert two > 0 and four > 0
    assert result["per_stream_2_over_4"] == pytest.approx(two / four)
    assert f"per-stream cost 2 streams / 4 streams = {two / four:.3f}" in proc.stdout
    gemm = result["gemm"]
    assert gemm["rows"] == 2 * result["grid"][0] * result["grid"][1]
    if gemm.get("onednn_s") is not None:  # the CPU wheel has oneDNN; both chains compute the same product
        assert result["onednn_over_default"] == pytest.approx(gemm["default_s"] / gemm["onednn_s"])
        assert gemm["onednn_max_abs_diff_vs_float64"] < 1e-4 * max(1.0, gemm["ref_max_abs"])
        assert gemm["default_max_abs_diff_vs_float64"] < 1e-4 * max(1.0, gemm["ref_max_abs"])
