"""The demo: the service on local Ray, the shipped demo model, a real gRPC stream into an MP4, a clean shutdown;
the prompt's object is visible and moves the way the prompt says (the quality detector on the video file)."""

import subprocess
import sys
from pathlib import Path

import torch

from orchestrator.cli import DEMO_PROMPT
from orchestrator.video import read_video
from workers.demo.clips import parse_prompt
from workers.demo.detect import assess

ROOT = Path(__file__).resolve().parents[2]


def test_demo_writes_a_playable_video(tmp_path):
    out = tmp_path / "out" / "demo.mp4"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    frames = read_video(str(out))
    assert frames.shape == (48, 64, 64, 3)
    want = parse_prompt(DEMO_PROMPT)
    q = assess(torch.from_numpy(frames))
    assert q.visibility >= 0.9 and q.colour == want.colour and q.direction == want.direction, q
    assert "frames 48" in proc.stdout and "service stopped" in proc.stdout
    assert "TTFF" in proc.stdout and "deadline misses" in proc.stdout


def test_demo_v2v_restyles_the_clip_it_makes_frame_for_frame(tmp_path):
    clip, out = tmp_path / "input.mp4", tmp_path / "demo_v2v.mp4"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo-v2v", "--in", str(clip), "--out", str(out),
                           "--clip-frames", "24", "--chunk-frames", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    source, restyled = read_video(str(clip)), read_video(str(out))
    assert source.shape == restyled.shape == (24, 64, 64, 3)  # the demo model's size
    assert abs(restyled.astype(float) - source.astype(float)).mean() > 5  # restyled, not copied through
    assert "frames in 24, out 24; input accepted 24" in proc.stdout and "service stopped" in proc.stdout
