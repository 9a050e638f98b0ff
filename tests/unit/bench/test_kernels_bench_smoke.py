"""bench/kernels.py runs end to end on CPU (Triton interpreter, tiny shapes), so a GPU session can run it."""

import pytest

from tests.unit.bench.runner import run_bench

pytest.importorskip("triton")


def test_kernels_bench_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    _, result = run_bench("kernels.py", "--device", "cpu", "--small", "--no-compile", "--iters", "1", "--warmup", "0",
                          "--dtype", "float32", out=out)
    ops = {(r["op"], r["frames"]) for r in result["ops"]}
    assert ops == {(op, f) for op in ("norm_modulate", "qk_norm_rope", "gated_residual",
                                      "gated_residual_norm_modulate") for f in (1, 3)}
    assert [b["frames"] for b in result["block"]] == [1, 3]
    assert all(r["triton_s"] > 0 and r["eager_s"] > 0 for r in result["ops"])
