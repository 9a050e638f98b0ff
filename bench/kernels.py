"""Memory-bound DiT block ops: fused Triton kernel vs eager PyTorch vs torch.compile of the reference,
measured side by side, plus one DiT block end to end with kernels on vs off.

Shapes of wan2.1-1.3b: 1 latent frame at 480x832 (1560 tokens x 1536) and 3 frames. Reports time, the
bytes each op must move, achieved GB/s and the fraction of the card's peak HBM bandwidth. JSON to --out.

    python bench/kernels.py --out bench/out/kernels.json                  # on a GPU
    python bench/kernels.py --device cpu --small --no-compile --iters 2   # smoke run (Triton interpreter)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import write_json  # noqa: E402

from kernels import reference  # noqa: E402
from orchestrator.config import get_config  # noqa: E402
from workers.model.rope import rope_tables  # noqa: E402

PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def peak_bandwidth(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_BYTES_PER_S.items() if key in name), None)


def timeit(fn, device: str, iters: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def op_cases(frames: int, tokens: int, dim: int, heads: int, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    e = torch.finfo(dtype).bits // 8
    n = frames * tokens * dim
    x, y, q, k = rnd(frames, tokens, dim), rnd(frames, tokens, dim), rnd(frames, tokens, dim), rnd(frames, tokens, dim)
    shift, scale, gate = rnd(frames, dim), rnd(frames, dim), rnd(frames, dim)
    wq, wk = rnd(dim), rnd(dim)
    head_dim = dim // heads
    grid_w = 52 if tokens % 52 == 0 else tokens
    cos, sin = rope_tables(torch.arange(frames), (tokens // grid_w, grid_w), head_dim, device)
    rope_bytes = 2 * cos.numel() * cos.element_size()
    return {
        "norm_modulate": ((x, shift, scale, 1e-6), 2 * n * e),
        "qk_norm_rope": ((q, k, wq, wk, cos, sin, 1e-6), 4 * n * e + rope_bytes),
        "gated_residual": ((x, y, gate), 3 * n * e),
        "gated_residual_norm_modulate": ((x, y, gate, shift, scale, 1e-6), 4 * n * e),
    }


def block_case(frames: int, small: bool, backend: str, dtype, device):
    from workers.model.dit import CausalWanModel, Segment

    base = get_config("tiny" if small else "wan2.1-1.3b", num_layers=1, kernel_backend=backend)
    model = CausalWanModel(base, block_range=(0, 1), with_embed=False, with_head=False).to(device, dtype).eval()
    lh, lw = (8, 12) if small else (60, 104)
    grid = (lh // 2, lw // 2)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(frames, grid[0] * grid[1], base.dim, generator=g).to(device, dtype)
    e0 = torch.randn(frames, 6, base.dim, generator=g).to(device, dtype)
    ctx = torch.randn(base.text_len, base.dim, generator=g).to(device, dtype)
    seg = [Segment(frames, context=ctx)]
    return lambda: model.run_blocks(h, e0, seg, grid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/kernels.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--small", action="store_true", help="tiny shapes (smoke runs)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    from kernels import triton_ops

    dtype = getattr(torch, args.dtype)
    peak = peak_bandwidth(args.device)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {"device": card, "dtype": args.dtype, "peak_bytes_per_s": peak, "ops": [], "block": []}
    dims = (48, 24, 3) if args.small else (1560, 1536, 12)  # tokens, dim, heads
    for frames in (1, 3):
        tokens, dim, heads = dims
        for name, (inputs, nbytes) in op_cases(frames, tokens, dim, heads, dtype, args.device).items():
            ref = getattr(reference, name)
            row = {"op": name, "frames": frames, "tokens": tokens, "dim": dim, "bytes": nbytes}
            ways = {"triton": getattr(triton_ops, name), "eager": ref}
            if not args.no_compile:
                ways["compile"] = torch.compile(ref)
            for way, fn in ways.items():
                sec = timeit(lambda: fn(*inputs), args.device, args.iters)
                row[f"{way}_s"] = sec
                row[f"{way}_GBps"] = nbytes / sec / 1e9
                if peak:
                    row[f"{way}_peak_fraction"] = nbytes / sec / peak
            row["speedup_vs_eager"] = row["eager_s"] / row["triton_s"]
            if "compile_s" in row:
                row["speedup_vs_compile"] = row["compile_s"] / row["triton_s"]
            results["ops"].append(row)
            frac = f", {row['triton_peak_fraction'] * 100:.0f}% of peak" if peak else ""
            print(f"{card} {name:>30} F={frames}: triton {row['triton_s'] * 1e6:8.1f} us "
                  f"({row['triton_GBps']:.0f} GB/s{frac}), eager {row['eager_s'] * 1e6:8.1f} us, "
                  f"x{row['speedup_vs_eager']:.2f} vs eager"
                  + (f", x{row['speedup_vs_compile']:.2f} vs compile" if "compile_s" in row else ""), flush=True)
        off = timeit(block_case(frames, args.small, "torch", dtype, args.device), args.device, max(3, args.iters // 5))
        on = timeit(block_case(frames, args.small, "triton", dtype, args.device), args.device, max(3, args.iters // 5))
        results["block"].append({"frames": frames, "kernels_off_s": off, "kernels_on_s": on, "speedup": off / on})
        print(f"{card} DiT block F={frames}: kernels off {off * 1e3:.2f} ms, on {on * 1e3:.2f} ms, x{off / on:.2f}",
              flush=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
