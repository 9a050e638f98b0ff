"""`streamgen demo` writes a real, decodable video."""

from orchestrator.cli import main
from orchestrator.video import read_video


def test_demo_writes_a_video(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--out", str(out), "--chunks", "2", "--chunk-frames", "1"]) == 0
    frames = read_video(str(out))
    assert frames.shape == (1 + 4 * (2 - 1), 64, 96, 3)
    assert frames.std() > 0.5  # not a blank video
    text = capsys.readouterr()
    assert "wrote" in text.out and "2/2 chunks" in text.err


def test_demo_bad_config_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "x.mp4"), "--model", "nope"]) == 2
    assert "unknown model config" in capsys.readouterr().err
