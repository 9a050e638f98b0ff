"""The capacity planner: hand-made profiles with known answers, the SDV2 reproduction, the CLI."""

import json
import os

import pytest

from orchestrator.cli import main
from workers import devicemap
from workers.costs import Linear, ModelCosts, Profile, load_profile
from workers.planner import PlanConfig, best_streams, plan, replica_map

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SDV2 = os.path.join(ROOT, "profiles", "h100-sdv2.json")


def small_plan(**kw) -> PlanConfig:
    return PlanConfig(**{"model": "small", "height": 128, "width": 256, "gpus": (1,), "duration_s": 4.0, **kw})


def per_forward(seconds: float) -> Linear:
    """Each of small's 8 blocks, so that one stream's 1-step stream-batch forward (2 frames) takes ``seconds``."""
    tokens = 2 * 128  # 2 latent frames x 8 x 16 patches
    return Linear(0.0, seconds / 8 / tokens)


def hand_profile(forward_s: float, decode_s: float = 0.0, memory_gib: float | None = None) -> Profile:
    return Profile(name="hand", gpu_memory_gib=memory_gib, dtype="float32", models={"small": ModelCosts(
        block=per_forward(forward_s), vae_decode=Linear(0.0, decode_s / 128))})


def test_streams_at_fps_known_answer():
    # 10 ms a forward per stream, one chunk (4 frames) per forward, decode free: 400 frames/s -> 26 streams at 15
    cfg = small_plan(decode="shared", fps=15.0)
    n, r, why = best_streams(cfg, hand_profile(0.010), 1, "shared")
    assert n == 26
    assert r.admission_streams == n  # the engine's max_streams (its latency model) agrees with the planner
    assert r.min_stream_fps >= 15 and r.frames_per_s == pytest.approx(400, rel=0.01)
    assert why == "stage 0 compute"


def test_decode_capped_plan():
    # DiT 5 ms, decode 40 ms a chunk on a dedicated GPU: 25 chunks/s = 100 frames/s -> 6 streams at 15 fps
    cfg = small_plan(gpus=(2,), decode="dedicated", fps=15.0)
    n, r, why = best_streams(cfg, hand_profile(0.005, 0.040), 1, "dedicated")
    assert n == 6 and why == "decode"
    assert r.frames_per_s == pytest.approx(100, rel=0.03)


def test_memory_capped_plan():
    # room for exactly 3 streams' state on the GPU: fast compute, so memory is what stops the fourth
    cfg = small_plan(decode="shared")
    dmap = replica_map(cfg, hand_profile(0.001), 1, "shared")
    room = dmap.weight_bytes(0) + 3.5 * dmap.stream_bytes(0)
    gib = room / devicemap.GIB / 0.9  # gpu_memory_utilization 0.9
    n, r, why = best_streams(cfg, hand_profile(0.001, memory_gib=gib), 1, "shared")
    assert (n, why) == (3, "memory")
    rows = plan(cfg, hand_profile(0.001, memory_gib=gib))
    assert rows[0].streams == 3 and rows[0].bottleneck == "memory"
    assert max(rows[0].memory_gib) <= gib * 0.9


def test_fleet_is_replicas_of_the_best_replica():
    cfg = small_plan(gpus=(1, 2, 4), decode="shared", max_gpus_per_replica=1, fps=15.0)
    rows = plan(cfg, hand_profile(0.010))
    assert [r.replicas for r in rows] == [1, 2, 4]
    assert [r.streams for r in rows] == [26, 52, 104]
    assert all(r.efficiency == pytest.approx(1.0) for r in rows)


def test_budget_excludes_slow_plans():
    cfg = small_plan(decode="shared", budget_ms=1.0)  # no chunk comes out within 1 ms
    n, _, _ = best_streams(cfg, hand_profile(0.010), 1, "shared")
    assert n == 0


def test_sdv2_reproduction_within_15_percent():
    published = {1: 20.47, 2: 39.77, 4: 44.38}
    rows = plan(PlanConfig(policy="sdv2", gpus=(1, 2, 4)), load_profile(SDV2))
    for row in rows:
        assert row.frames_per_s == pytest.approx(published[row.gpus], rel=0.15), row
        assert row.streams_per_pipeline == 1 and row.stages == row.gpus
    assert rows[-1].bottleneck == "decode"  # one decoder on the last rank caps 4 GPUs


def test_plan_config_errors():
    with pytest.raises(ValueError, match="unknown model"):
        PlanConfig(model="nope")
    with pytest.raises(ValueError, match="without a block"):
        PlanConfig(model="small", policy="sdv2", gpus=(16,))
    with pytest.raises(ValueError):
        PlanConfig(gpus=(0,))
    with pytest.raises(ValueError, match="no costs for model"):
        plan(PlanConfig(model="small", gpus=(1,)), load_profile(SDV2))


def test_cli_plan_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--profile", SDV2, "--policy", "sdv2", "--gpus", "1,2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [p["gpus"] for p in data["plans"]] == [1, 2]
    assert data["profile"] == "h100-sdv2"
    assert "bottleneck" in capsys.readouterr().out


def test_cli_plan_bad_input(tmp_path, capsys):
    assert main(["plan", "--profile", str(tmp_path / "none.json")]) == 2
    assert "cannot read profile" in capsys.readouterr().err
    assert main(["plan", "--profile", SDV2, "--gpus", "1,x"]) == 2
    assert "--gpus" in capsys.readouterr().err


def test_cli_plan_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    assert main(["plan", "--profile", SDV2, "--gpus", "1,2", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode,stages", [("stream_batch", 1), ("stream_batch", 2), ("sequential", 2)])
def test_admission_agrees_with_the_planner_when_batching_pays(mode, stages):
    # a fixed cost per block call that batching splits: the engine's max_streams counts micro-batches of the
    # size its scheduler makes, as the simulation runs them (one stream's forward alone would admit fewer)
    fixed = Profile(name="fixed", dtype="float32", models={"small": ModelCosts(
        block=Linear(0.002, 0.004 / 8 / 256))})
    cfg = small_plan(mode=mode, fps=40.0, steps=2, decode="shared")
    n, r, _ = best_streams(cfg, fixed, stages, "shared")
    assert n >= 4
    assert abs(r.admission_streams - n) <= 1
