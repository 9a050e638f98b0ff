"""The shipped profiles load, say where they came from, and the derived ones are what bench/derive_profiles.py
computes from the published and recorded figures (nothing typed in by hand); bench/profile.py's fit."""

import importlib.util
import json
from pathlib import Path

import pytest

from workers.costs import dump_profile, load_profile

ROOT = Path(__file__).resolve().parents[3]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,models", [("cpu-2core", {"small"}), ("h100-sdv2", {"wan2.1-1.3b", "wan2.1-14b"}),
                                         ("h200", {"wan2.1-1.3b"})])
def test_shipped_profiles_load_and_say_where_they_came_from(name, models):
    profile = load_profile(str(ROOT / "profiles" / f"{name}.json"))
    assert profile.name == name and set(profile.models) >= models
    assert profile.command.startswith("python bench/")
    assert profile.derivation
    for costs in profile.models.values():
        assert costs.block(1000) > 0


def test_derived_profiles_are_reproduced_by_the_script():
    derive = load_script("derive_profiles")
    assert dump_profile(derive.h100_sdv2()) == json.loads((ROOT / "profiles" / "h100-sdv2.json").read_text())
    h200 = derive.h200(str(ROOT / "bench" / "results" / "h200-2026-11-26" / "gpu_engine.json"))
    assert dump_profile(h200) == json.loads((ROOT / "profiles" / "h200.json").read_text())


def test_profile_fit():
    fit = load_script("profile").fit
    line = fit([100, 200, 300], [0.3, 0.5, 0.7])  # seconds against tokens
    assert (line.a_s, line.b_s) == pytest.approx((0.1, 0.002))
    through_zero = fit([100, 200], [0.05, 0.3])  # the two-point intercept is negative: a line through 0 instead
    assert through_zero.a_s == 0 and through_zero.b_s == pytest.approx((100 * 0.05 + 200 * 0.3) / (100**2 + 200**2))
