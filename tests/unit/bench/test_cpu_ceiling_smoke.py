"""bench/cpu_ceiling.py runs end to end (a few iterations): both timings measured, the ratio taken from them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_cpu_ceiling_bench_smoke(tmp_path):
    out = tmp_path / "cpu_ceiling.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_ceiling.py"), "--iters", "3", "--repeats", "1",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (alone,), (together,) = result["alone_s"], result["together_s"]
    assert alone > 0 and together > 0
    assert result["two_over_one"] == pytest.approx(2 * alone / together)
    assert f"two cores / one core = {result['two_over_one']:.2f}" in proc.stdout
