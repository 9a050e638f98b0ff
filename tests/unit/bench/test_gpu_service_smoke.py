"""bench/gpu_service.py runs end to end on CPU (tiny model): engine rows, the real service over gRPC with the
local backend, graphs on / off; on a GPU machine the same script gives the issue's figures."""

import sys

from tests.unit.bench.runner import ROOT, run_bench


def test_gpu_service_bench_smoke(tmp_path):
    out = tmp_path / "gpu_service.json"
    proc, result = run_bench("gpu_service.py", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--quick",
                             "--decoders", "wan", "--steps", "1", out=out, cwd=ROOT, timeout=600)
    assert result["errors"] == [] and result["card"].startswith("cpu")
    assert [(r["steps"], r["decode"]) for r in result["engine"]] == [(1, None), (1, "wan")]
    assert all(r["fps"] > 0 for r in result["engine"])
    (svc,) = result["service"]
    for row in (svc["one_stream"], svc["admitted_at_16fps"]):
        # each stream runs until 24 frames came after the last one opened
        assert row["delivered_fps"] > 0 and row["frames"] >= row["streams"] * 24 and row["ttff_p50_s"] > 0
        assert 0 < row["frame_latency_p50_s"] <= row["frame_latency_p99_s"]
    assert svc["admitted_at_16fps"]["streams"] >= 1  # opened until admission refused one
    one = svc["one_stream"]
    assert svc["delivered_over_requested"] == one["delivered_fps"] / one["fps_requested"] > 0
    assert svc["requested_over_engine"] == one["fps_requested"] / result["engine"][1]["fps"] > 0
    assert result["graphs"]["max_abs_latent_diff"] == 0.0 and result["graphs"]["replays"] == 0  # CPU: eager
    assert "StreamDiffusionV2" in proc.stdout


def test_gpu_service_builds_the_real_models_decoders_and_configs(tmp_path):
    """The GPU default (`wan2.1-1.3b`) takes paths the tiny smoke run skips: random TAEHV and Wan VAE weights
    written in their real layouts, loaded as served, and an engine and service config that need no umT5
    checkpoint. Both broke unseen until a GPU run (2026-12-04)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from bench import gpu_service
    from orchestrator.config import load_service_config
    from workers.model.vae import build_decoder

    class Args:
        model, device, dtype = "wan2.1-1.3b", "cpu", "float32"

    for decoder in ("taehv", "wan"):
        paths = gpu_service.weights(Args.model, decoder, str(tmp_path), torch.float32)
        gen = gpu_service.generation(Args, 1, decoder, paths)
        assert gen.model.text_encoder == "hash" and gen.model.vae_decoder == decoder
        assert type(build_decoder(gen)).__name__ == {"taehv": "TAEHVDecoder", "wan": "WanVAE"}[decoder]
        gpu_service.write_service_config(str(tmp_path / "serve.yaml"), Args, 1, decoder, paths)
        cfg = load_service_config(str(tmp_path / "serve.yaml"))
        served = cfg.generation
        assert served.model == gen.model and served.sampler == gen.sampler
        assert cfg.engine == gpu_service.ENGINE  # the service runs what the engine rows run
