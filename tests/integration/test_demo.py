"""The demo: the service on local Ray, a real gRPC stream into an MP4, a clean shutdown."""

import subprocess
import sys
from pathlib import Path

from orchestrator.video import read_video

ROOT = Path(__file__).resolve().parents[2]


def test_demo_writes_a_playable_video(tmp_path):
    out = tmp_path / "out" / "demo.mp4"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    frames = read_video(str(out))
    assert frames.shape == (48, 64, 96, 3)
    assert frames.std() > 0.5
    assert "frames 48" in proc.stdout and "service stopped" in proc.stdout
    assert "TTFF" in proc.stdout and "deadline misses" in proc.stdout
