"""CLI argument handling (the demo itself runs in tests/integration/test_demo.py)."""

import pytest

from orchestrator.cli import build_parser, main, service_config


def test_serve_flags_build_a_valid_config():
    args = build_parser().parse_args(["serve", "--listen", "127.0.0.1:6000", "--metrics-listen", "127.0.0.1:6001",
                                      "--model", "tiny", "--stages", "3", "--replicas", "2"])
    cfg = service_config(args)
    assert (cfg.stages, cfg.replicas, cfg.server.listen, cfg.server.metrics_listen) == \
        (3, 2, "127.0.0.1:6000", "127.0.0.1:6001")
    assert cfg.autoscaling is None
    scaled = service_config(build_parser().parse_args(["serve", "--replicas", "1", "--max-replicas", "3"]))
    assert (scaled.autoscaling.min_replicas, scaled.autoscaling.max_replicas) == (1, 3)


def test_config_file_flag(tmp_path, capsys):
    f = tmp_path / "svc.yaml"
    f.write_text("stages: 3\nreplicas: 2\ngeneration:\n  model: tiny\n")
    cfg = service_config(build_parser().parse_args(["serve", "--config", str(f)]))
    assert (cfg.stages, cfg.replicas) == (3, 2)
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_bad_flags_are_clear_errors(capsys):
    assert main(["serve", "--model", "nope"]) == 2
    assert "unknown model config" in capsys.readouterr().err
    assert main(["serve", "--listen", "0.0.0.0:50051"]) == 2
    assert "not loopback" in capsys.readouterr().err
    assert main(["serve", "--stages", "9"]) == 2
    assert "stages" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--executor", "threads"])
