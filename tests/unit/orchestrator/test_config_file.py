"""The documented config file loads into the validated config; unknown keys and bad values are named."""

from pathlib import Path

import pytest

from orchestrator.config import ServiceConfig, load_service_config

ROOT = Path(__file__).resolve().parents[3]


def test_the_documented_file_carries_every_knob():
    cfg = load_service_config(str(ROOT / "deploy" / "streamgen.yaml"))
    assert isinstance(cfg, ServiceConfig)
    assert cfg.generation.model.num_layers == 30 and cfg.generation.height == 480
    assert cfg.autoscaling.max_replicas == 4 and cfg.gpus_per_stage == 1.0
    assert cfg.generation.sampler.denoising_steps == (1000.0, 750.0, 500.0, 250.0)
    text = (ROOT / "deploy" / "streamgen.yaml").read_text()
    import dataclasses

    for section in (cfg, cfg.generation, cfg.generation.sampler, cfg.generation.cache, cfg.engine, cfg.server,
                    cfg.autoscaling):
        for f in dataclasses.fields(section):
            assert f"{f.name}:" in text, f"deploy/streamgen.yaml does not document {f.name}"


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: 2\nserver:\n  listne: 127.0.0.1:1\n")
    with pytest.raises(ValueError, match=r"server: unknown keys \['listne'\]"):
        load_service_config(str(bad))
    bad.write_text("generation:\n  model: tiny\n  cache:\n    policy: lru\n")
    with pytest.raises(ValueError, match="policy"):
        load_service_config(str(bad))
    ok = tmp_path / "tiny.yaml"
    ok.write_text("stages: 3\ngeneration:\n  model: {name: tiny, num_layers: 3}\n")
    cfg = load_service_config(str(ok))
    assert cfg.stages == 3 and cfg.generation.model.num_layers == 3
