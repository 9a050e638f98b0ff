"""The bench smoke tests' one way to run a bench script: in a subprocess, its JSON read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def run_bench(script: str, *args: str, out: Path, cwd: Path | None = None,
              timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """``python bench/<script> <args> --out <out>`` in ``cwd`` (default: ``out``'s folder); fails the test with the
    output's tail unless it exits 0. Returns the process (its stdout) and the JSON it wrote."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)],
                          cwd=cwd or out.parent, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())
