"""CLI argument handling (the demo itself runs in tests/integration/test_demo.py)."""

import argparse

import pytest

from orchestrator.cli import SERVICE_FLAGS, build_parser, config_field, main, service_config
from orchestrator.config import ServiceConfig, get_config


STREAM_FLAGS = {"prompt", "seed", "frames", "fps", "steps", "out"}  # the demo's client side
ACTIONS = {"dry_run"}  # what serve does instead of serving, not a config value


def _serve_actions(command: str = "serve") -> list[argparse.Action]:
    """The service flags of a subcommand (not --help, --config, --dry-run, nor the demo's stream flags)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[command]._actions if a.dest not in {"help", "config", *STREAM_FLAGS, *ACTIONS}]


def _read(cfg, path: str):
    for name in path.split("."):
        cfg = getattr(cfg, name)
    return cfg


def test_serve_flags_build_a_valid_config():
    args = build_parser().parse_args(["serve", "--listen", "127.0.0.1:6000", "--metrics-listen", "127.0.0.1:6001",
                                      "--model", "tiny", "--stages", "3", "--replicas", "2"])
    cfg = service_config(args)
    assert (cfg.parallel.stages, cfg.replicas, cfg.server.listen, cfg.server.metrics_listen) == \
        (3, 2, "127.0.0.1:6000", "127.0.0.1:6001")
    assert cfg.autoscaling is None
    scaled = service_config(build_parser().parse_args(["serve", "--replicas", "1", "--max-replicas", "3"]))
    assert (scaled.autoscaling.min_replicas, scaled.autoscaling.max_replicas) == (1, 3)


def test_no_flags_give_exactly_the_config_defaults():
    for command in ("serve", "demo"):
        assert all(a.default is None for a in _serve_actions(command)), "a flag carries its own default"
    assert service_config(build_parser().parse_args(["serve"])) == ServiceConfig()


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_every_flag_is_derived_from_the_field_it_sets(command):
    """No hand-written flag: each one's dest is a config path, its help that field's docstring."""
    actions = _serve_actions(command)
    assert {a.dest for a in actions} == set(SERVICE_FLAGS.values())
    for action in actions:
        info, _ = config_field(action.dest)
        assert action.help.startswith(info.description.rstrip(".")), action.dest
    with pytest.raises(KeyError, match="names no ServiceConfig field"):
        config_field("parallel.stagez")


def _other_value(action: argparse.Action, default):
    if action.choices:
        return next(c for c in action.choices if c != default)
    if action.type in (int, float):
        return action.type((default or 0) + 1)  # None: an optional number (gpu_memory_gib)
    return {"server.listen": "127.0.0.1:6000", "server.metrics_listen": "127.0.0.1:6001",
            "server.health_listen": "127.0.0.1:6002", "server.web_listen": "127.0.0.1:6003",
            "generation.model": "small"}.get(action.dest, "/somewhere/else")


COMPANIONS = {  # flags that are only valid together with others
    "server.tls_cert": ["--tls-key", "/k.pem"],
    "server.tls_key": ["--tls-cert", "/c.pem"],
    "server.tls_client_ca": ["--tls-cert", "/c.pem", "--tls-key", "/k.pem"],
}


def test_every_flag_sets_the_field_it_names():
    """Each flag, given a value other than the default, lands on its field (max-replicas: below)."""
    for action in _serve_actions():
        if action.dest == "autoscaling.max_replicas":
            continue
        _, default = config_field(action.dest)
        if isinstance(action, argparse.BooleanOptionalAction):
            argv, want = [action.option_strings[0]], not default
        else:
            value = _other_value(action, default)
            argv, want = [action.option_strings[0], str(value)], value
        if action.dest == "generation.model":
            want = get_config(want)
        assert want != _read(ServiceConfig(), action.dest)
        cfg = service_config(build_parser().parse_args(["serve", *argv, *COMPANIONS.get(action.dest, [])]))
        assert _read(cfg, action.dest) == want, action.dest


def test_config_file_flag(tmp_path, capsys):
    f = tmp_path / "svc.yaml"
    f.write_text("parallel:\n  stages: 3\nreplicas: 2\ngeneration:\n  model: tiny\n")
    cfg = service_config(build_parser().parse_args(["serve", "--config", str(f)]))
    assert (cfg.parallel.stages, cfg.replicas) == (3, 2)
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    for path, said in ((bad, "not valid YAML"), (tmp_path, "cannot read it")):  # clear errors, no traceback
        assert main(["serve", "--config", str(path), "--dry-run"]) == 2
        assert f"streamgen: error: {path}: {said}" in capsys.readouterr().err


def test_explicit_flags_override_the_file_and_keep_its_other_values(tmp_path):
    f = tmp_path / "svc.yaml"
    f.write_text("parallel:\n  stages: 2\n  cpus_per_stage: 0.5\nreplicas: 2\n"
                 "generation:\n  model: {name: small, kernel_backend: torch}\n  sampler:\n    chunk_frames: 2\n"
                 "server:\n  max_fps: 30.0\n")
    cfg = service_config(build_parser().parse_args(
        ["serve", "--config", str(f), "--stages", "3", "--model", "tiny", "--mode", "stream_batch"]))
    assert cfg.parallel.stages == 3  # the flag wins
    assert cfg.generation.sampler.mode == "stream_batch"
    assert cfg.generation.model == get_config("tiny", kernel_backend="torch")  # the file's override stays
    assert (cfg.parallel.cpus_per_stage, cfg.replicas, cfg.generation.sampler.chunk_frames, cfg.server.max_fps) == \
        (0.5, 2, 2, 30.0)  # the file's other values stay


def test_replica_flags_and_a_file_with_autoscaling(tmp_path):
    f = tmp_path / "svc.yaml"
    f.write_text("autoscaling:\n  min_replicas: 1\n  max_replicas: 4\n  period_s: 0.2\n")
    cfg = service_config(build_parser().parse_args(["serve", "--config", str(f), "--replicas", "2"]))
    assert (cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas, cfg.autoscaling.period_s) == (2, 4, 0.2)
    cfg = service_config(build_parser().parse_args(["serve", "--config", str(f), "--max-replicas", "6"]))
    assert (cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas, cfg.autoscaling.period_s) == (1, 6, 0.2)
    fixed = service_config(build_parser().parse_args(["serve", "--config", str(f), "--max-replicas", "0"]))
    assert fixed.autoscaling is None


def test_bad_flags_are_clear_errors(capsys):
    assert main(["serve", "--model", "nope"]) == 2
    assert "unknown model config" in capsys.readouterr().err
    assert main(["serve", "--listen", "192.0.2.1:50051"]) == 2  # TEST-NET: unbindable, should the check regress
    assert "not loopback" in capsys.readouterr().err
    assert main(["serve", "--stages", "9"]) == 2
    assert "stages" in capsys.readouterr().err
    assert main(["serve", "--replicas", "3", "--max-replicas", "2"]) == 2
    assert "min_replicas <= max_replicas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--executor", "threads"])


def test_help_lists_the_config_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--stages STAGES Pipeline stages per replica" in out
    assert "(default: 2; config parallel.stages)" in out and "(default: demo; config generation.model)" in out
