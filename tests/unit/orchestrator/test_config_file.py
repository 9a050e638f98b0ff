"""The documented config file loads into the validated config; unknown keys and bad values are named."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ServiceConfig, load_service_config

ROOT = Path(__file__).resolve().parents[3]
FILE = ROOT / "deploy" / "streamgen.yaml"


def test_the_documented_file_carries_every_knob():
    cfg = load_service_config(str(FILE))
    assert isinstance(cfg, ServiceConfig)
    assert cfg.generation.model.num_layers == 30 and cfg.generation.height == 480
    assert cfg.autoscaling.max_replicas == 4 and cfg.parallel.gpus_per_stage == 1.0
    assert cfg.generation.sampler.denoising_steps == (1000.0, 750.0, 500.0, 250.0)
    raw = yaml.safe_load(FILE.read_text())
    sections = {"": (cfg, raw), "generation": (cfg.generation, raw["generation"]),
                "generation.sampler": (cfg.generation.sampler, raw["generation"]["sampler"]),
                "generation.cache": (cfg.generation.cache, raw["generation"]["cache"]),
                "engine": (cfg.engine, raw["engine"]), "parallel": (cfg.parallel, raw["parallel"]),
                "server": (cfg.server, raw["server"]), "autoscaling": (cfg.autoscaling, raw["autoscaling"]),
                "tenants": (cfg.tenants, raw["tenants"]), "tenants.default": (cfg.tenants.default, raw["tenants"]["default"])}
    for where, (section, keys) in sections.items():
        fields = {f.name for f in dataclasses.fields(section)}
        assert set(keys) == fields, f"deploy/streamgen.yaml section {where or '(root)'!r}: " \
                                    f"undocumented {sorted(fields - set(keys))}, unknown {sorted(set(keys) - fields)}"


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parallel:\n  stages: 2\nserver:\n  listne: 127.0.0.1:1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: server\.listne: unknown key"):
        load_service_config(str(bad))
    bad.write_text("stages: 2\n")  # moved under parallel:
    with pytest.raises(ValueError, match=r"bad.yaml: stages: unknown key"):
        load_service_config(str(bad))
    bad.write_text("generation:\n  model: {name: tiny, num_layer: 3}\n")
    with pytest.raises(ValueError, match=r"generation\.model\.num_layer: unknown key"):
        load_service_config(str(bad))
    bad.write_text("generation:\n  model: tiny\n  cache:\n    policy: lru\n")
    with pytest.raises(ValueError, match=r"generation\.cache\.policy: Input should be 'sink', 'ema_sink' or 'none'"):
        load_service_config(str(bad))
    bad.write_text("parallel:\n  stages: 0\n")
    with pytest.raises(ValueError, match=r"parallel\.stages: Input should be greater than or equal to 1"):
        load_service_config(str(bad))
    bad.write_text("- stages\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_service_config(str(bad))
    ok = tmp_path / "tiny.yaml"
    ok.write_text("parallel:\n  stages: 3\ngeneration:\n  model: {name: tiny, num_layers: 3}\n")
    cfg = load_service_config(str(ok))
    assert cfg.parallel.stages == 3 and cfg.generation.model.num_layers == 3
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_service_config(str(empty)) == ServiceConfig()
