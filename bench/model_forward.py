"""Model runtime benchmark (CPU, one thread by default).

Measures, in one run:
* the forward time of one chunk (one denoising step against a warm KV cache) for each config, for the
  whole model and for its first half (a 2-stage pipeline's first slice);
* sequential vs stream_batch: wall time per finished chunk in steady state, side by side, and the ratio;
* the KV-cache bytes per latent frame the code computes for wan2.1-1.3b at 480x832 in bf16.

Writes JSON (``--out``) and prints a table. Usage: ``python bench/model_forward.py --out bench/out/model_forward.json``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

# The project root in place of bench/ on sys.path: Ray copies a script directory that is on the driver's
# sys.path to its workers, where bench/kernels.py would shadow the `kernels` distribution transformers imports.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(HERE)] + [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]

import torch  # noqa: E402

from bench.common import write_json  # noqa: E402

from workers.config import CacheConfig, GenerationConfig, SamplerConfig, get_config  # noqa: E402
from workers.cache import kv_bytes_per_frame  # noqa: E402
from workers.model.dit import CausalWanModel, Segment  # noqa: E402
from workers.reference import ReferenceGenerator  # noqa: E402
from workers.stream import StreamProgram  # noqa: E402


def time_chunk_forward(name: str, chunk_frames: int, repeats: int, half: bool) -> dict:
    cfg = get_config(name)
    blocks = (0, cfg.num_layers // 2) if half else (0, cfg.num_layers)
    model = CausalWanModel(cfg, block_range=blocks, with_head=not half).eval()
    lh, lw = cfg.latent_grid(cfg.default_height, cfg.default_width)
    grid = (lh // 2, lw // 2)
    cache_cfg = CacheConfig(sink_frames=3, window_frames=6)
    cache = model.new_stream_cache(cache_cfg)
    cache.set_context(model.embed_text(torch.randn(cfg.text_len, cfg.text_dim)))
    with torch.no_grad():
        warm = torch.randn(9, cfg.in_channels, lh, lw)  # fill the cache: 9 clean frames
        model.stream_forward(warm, [Segment(9, cache, block_frames=chunk_frames, commit_frames=9)], grid,
                             torch.zeros(9))
        x = torch.randn(chunk_frames, cfg.in_channels, lh, lw)
        t = torch.full((chunk_frames,), 937.5)
        times = []
        for _ in range(repeats + 2):
            start = time.perf_counter()
            model.stream_forward(x, [Segment(chunk_frames, cache)], grid, t)
            times.append(time.perf_counter() - start)
    times = times[2:]
    return {"config": name, "slice": f"blocks [{blocks[0]}, {blocks[1]})", "chunk_frames": chunk_frames,
            "tokens_per_frame": grid[0] * grid[1], "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times), "repeats": repeats}


def time_modes(name: str, steps: int, chunks: int) -> dict:
    """Steady-state wall time per finished chunk, sequential vs stream_batch, same model and stream."""
    out = {}
    step_list = tuple(1000 - 250 * i for i in range(steps))
    for mode in ("sequential", "stream_batch"):
        cfg = GenerationConfig(model=get_config(name), sampler=SamplerConfig(denoising_steps=step_list, chunk_frames=1,
                                                                             mode=mode),
                               cache=CacheConfig(sink_frames=1, window_frames=3, recache_frames=3))
        gen = ReferenceGenerator(cfg)
        program = StreamProgram(cfg.sampler, cfg.cache, 0, gen.latent_shape)
        cache = gen.model.new_stream_cache(cfg.cache)
        cache.set_context(gen.model.embed_text(gen.text_encoder("bench")))
        store = gen.new_store()
        stamps, forwards = [], 0
        with torch.no_grad():
            while len(stamps) < chunks:
                forwards += 1
                for _ in gen.step(program, cache, store):
                    stamps.append(time.perf_counter())
        steady = stamps[len(stamps) // 4:]  # past warm-up
        per_chunk = (steady[-1] - steady[0]) / (len(steady) - 1)
        out[mode] = {"ms_per_chunk": 1e3 * per_chunk, "forwards_per_chunk": forwards / chunks}
    out["stream_batch_speedup"] = out["sequential"]["ms_per_chunk"] / out["stream_batch"]["ms_per_chunk"]
    out.update(config=name, steps=steps, chunk_frames=1, chunks=chunks)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/model_forward.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mode-chunks", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "cpu": platform.processor() or platform.machine(), "threads": args.threads},
               "chunk_forward": [], "modes": []}
    for name, frames in (("tiny", 3), ("small", 1), ("small", 3)):
        for half in (False, True):
            row = time_chunk_forward(name, frames, args.repeats, half)
            results["chunk_forward"].append(row)
            print(f"{row['config']:>6} {row['slice']:>16} chunk={frames} frames x {row['tokens_per_frame']} tokens: "
                  f"{row['median_ms']:8.2f} ms (min {row['min_ms']:.2f})", flush=True)
    for name, steps in (("tiny", 4), ("small", 2)):
        row = time_modes(name, steps, args.mode_chunks if name == "tiny" else max(8, args.mode_chunks // 3))
        results["modes"].append(row)
        print(f"{name:>6} {steps} steps: sequential {row['sequential']['ms_per_chunk']:.2f} ms/chunk "
              f"({row['sequential']['forwards_per_chunk']:.2f} fwd), stream_batch "
              f"{row['stream_batch']['ms_per_chunk']:.2f} ms/chunk ({row['stream_batch']['forwards_per_chunk']:.2f} fwd)"
              f" -> stream_batch x{row['stream_batch_speedup']:.2f}", flush=True)
    kv = kv_bytes_per_frame(get_config("wan2.1-1.3b"), 480, 832, 2)
    results["kv_bytes_per_latent_frame"] = {"config": "wan2.1-1.3b", "height": 480, "width": 832, "dtype": "bf16",
                                            "bytes": kv, "MB": kv / 1e6}
    print(f"KV bytes per latent frame, wan2.1-1.3b 480x832 bf16: {kv} ({kv / 1e6:.1f} MB)")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
