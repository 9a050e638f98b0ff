"""Single-GPU engine throughput, without Ray (the GPU box has no Ray): the in-process executor, P=1.

Default: ``wan2.1-1.3b`` at 480x832, random weights, bf16, 1 and 4 denoising steps, stream_batch
(StreamDiffusionV2's single-GPU setting, chunk = 1 latent frame = 4 video frames). Reports FPS for the DiT
alone and with the Wan VAE decode (diffusers ``AutoencoderKLWan`` default architecture, random weights),
beside StreamDiffusionV2's single-H100 figures (20.47 FPS at 1 step, 13.95 at 4, decode included).

    python bench/gpu_engine.py --out bench/out/gpu_engine.json              # on the GPU machine
    python bench/gpu_engine.py --model tiny --device cpu --dtype float32    # smoke run anywhere
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# The project root in place of bench/ on sys.path: Ray copies a script directory that is on the driver's
# sys.path to its workers, where bench/kernels.py would shadow the kernels package.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(HERE)] + [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]

import torch  # noqa: E402

from bench.common import write_json  # noqa: E402

from workers.config import CacheConfig, EngineConfig, GenerationConfig, SamplerConfig, get_config  # noqa: E402
from workers.engine import PipelineEngine  # noqa: E402
from workers.executor import InProcessExecutor  # noqa: E402
from workers.model.text import HashTextEncoder  # noqa: E402
from workers.model.vae import TinyVAE, WanVAE  # noqa: E402

SDV2_H100 = {1: 20.47, 4: 13.95}


def build_decoder(cfg, device, dtype):
    if cfg.vae == "tiny":
        return TinyVAE(cfg).to(device)
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return WanVAE(AutoencoderKLWan().to(dtype), device)


_EXECUTORS: dict[tuple, InProcessExecutor] = {}


def executor_for(model_cfg, device: str, dtype: torch.dtype) -> InProcessExecutor:
    """One executor per (config, device, dtype), reused across rows: building 1.3B random weights takes seconds."""
    key = (model_cfg, device, dtype)
    if key not in _EXECUTORS:
        _EXECUTORS[key] = InProcessExecutor(model_cfg, 1, device=device, dtype=dtype)
    return _EXECUTORS[key]


def measure(model_name: str, steps: int, mode: str, device: str, dtype: torch.dtype, chunks: int, warmup: int,
            decode: bool, kernels: str = "auto") -> dict:
    model_cfg = get_config(model_name, kernel_backend=kernels)
    step_list = tuple(1000.0 - 250.0 * i for i in range(steps))
    cfg = GenerationConfig(model=model_cfg, sampler=SamplerConfig(denoising_steps=step_list, chunk_frames=1, shift=8.0,
                                                                  mode=mode),
                           cache=CacheConfig(sink_frames=3, window_frames=3, recache_frames=3),
                           height=model_cfg.default_height, width=model_cfg.default_width)
    executor = executor_for(model_cfg, device, dtype)
    decoder = build_decoder(model_cfg, device, dtype) if decode else None
    text = HashTextEncoder(model_cfg.text_len, model_cfg.text_dim)  # the DiT sees a [512, 4096] context
    engine = PipelineEngine(cfg, executor, text, decoder, EngineConfig(profile_every=0, rebalance_every=0))
    engine.add_stream("s", "a red fox running through snow", 0)
    stamps = []
    with torch.inference_mode():
        engine.run_chunks({"s": warmup + chunks}, on_output=lambda o: stamps.append(time.perf_counter()))
    engine.remove_stream("s")
    engine.step(wait=False)  # applies the removal: the stream's caches are freed for the next row
    start = stamps[warmup - 1]
    fps = (len(stamps) - warmup) * 4 / (stamps[-1] - start)  # 4 video frames per latent frame
    return {"model": model_name, "steps": steps, "mode": mode, "decode": decode, "kernels": kernels, "fps": fps,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
            "dtype": str(dtype).replace("torch.", ""), "height": cfg.height, "width": cfg.width,
            "sdv2_h100_fps": SDV2_H100.get(steps) if decode else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/gpu_engine.json")
    parser.add_argument("--model", default="wan2.1-1.3b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--mode", default="stream_batch", choices=("stream_batch", "sequential"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    # (steps, decode, kernel backend): the last row shows what the fused kernels give the whole engine
    for steps, decode, kernels in ((1, False, "auto"), (1, True, "auto"), (4, False, "auto"), (4, True, "auto"),
                                   (1, False, "torch")):
        try:
            row = measure(args.model, steps, args.mode, args.device, dtype, args.chunks, args.warmup, decode, kernels)
        except Exception as err:  # e.g. no diffusers for the Wan VAE (carry its wheel: bench/gpu.sh)
            print(f"steps={steps} decode={decode} kernels={kernels} failed: {type(err).__name__}: {err}", flush=True)
            rows.append({"model": args.model, "steps": steps, "decode": decode, "kernels": kernels,
                         "error": f"{type(err).__name__}: {err}"[:500]})
            continue
        rows.append(row)
        ref = f" (StreamDiffusionV2 1xH100: {row['sdv2_h100_fps']})" if row["sdv2_h100_fps"] else ""
        print(f"{row['device']} {args.model} {row['height']}x{row['width']} {row['dtype']} steps={steps} "
              f"{'DiT+decode' if decode else 'DiT only'} kernels={kernels}: {row['fps']:.2f} FPS{ref}", flush=True)
    write_json(args.out, rows)


if __name__ == "__main__":
    main()
