"""The GPU engine benchmark runs end to end (tiny model on CPU), so it works when a GPU session runs it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_gpu_engine_bench_smoke(tmp_path):
    out = tmp_path / "gpu_engine.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_engine.py"), "--model", "tiny", "--device", "cpu",
                           "--dtype", "float32", "--chunks", "3", "--warmup", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["steps"], r["decode"], r["kernels"]) for r in rows] == [
        (1, False, "auto"), (1, True, "auto"), (4, False, "auto"), (4, True, "auto"), (1, False, "torch")]
    assert all("error" not in r and r["fps"] > 0 for r in rows), rows
