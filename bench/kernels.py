"""Memory-bound DiT block ops: fused Triton kernel vs eager PyTorch vs torch.compile of the reference,
measured side by side, plus one DiT block end to end with kernels on vs off.

Shapes of wan2.1-1.3b: 1 latent frame at 480x832 (1560 tokens x 1536) and 3 frames. Reports time, the
bytes each op must move, achieved GB/s and the fraction of the card's peak HBM bandwidth. JSON to --out.

    python bench/kernels.py --out bench/out/kernels.json                  # on a GPU
    python bench/kernels.py --device cpu --small --no-compile --iters 1 --warmup 0   # smoke run (interpreter)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# The project root in place of bench/ on sys.path: Ray copies a script directory that is on the driver's
# sys.path to its workers, where bench/kernels.py would shadow the `kernels` distribution transformers imports.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(HERE)] + [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]

import torch  # noqa: E402

from bench.common import write_json  # noqa: E402

from streamgen_kernels import reference  # noqa: E402
from workers.config import get_config  # noqa: E402
from workers.model.rope import rope_tables  # noqa: E402

PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def peak_bandwidth(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_BYTES_PER_S.items() if key in name), None)


def timeit(fn, device: str, iters: int, warmup: int = 2) -> float:
    """Median seconds per call, launch overhead included (CUDA events around each call, or a host clock)."""
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


def graph_time(fn, input_sets: list, iters: int) -> float:
    """Median device seconds per call: one CUDA graph replays fn over every input set in turn.

    The graph removes host launch overhead, so this is what the kernels themselves cost; the input sets
    together exceed the L2 cache, so each call reads from HBM, not from cache.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for inputs in input_sets:  # warm-up: compile, autotune, allocate
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for inputs in input_sets:
            fn(*inputs)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(input_sets))
    return statistics.median(times)


def copy_bandwidth(device: str) -> float | None:
    """Measured HBM ceiling: a 1 GiB device-to-device copy, bytes read plus bytes written per second."""
    if not device.startswith("cuda"):
        return None
    src = torch.randn(2 ** 28, device=device)
    dst = torch.empty_like(src)
    sec = timeit(lambda: dst.copy_(src), device, 20)
    return 2 * src.numel() * src.element_size() / sec


def op_cases(frames: int, tokens: int, dim: int, heads: int, dtype, device, seed: int = 0):
    """{op: (inputs, bytes it must move)}: each input read once, each output written once."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    e = torch.finfo(dtype).bits // 8
    n = frames * tokens * dim
    x, y, q, k = rnd(frames, tokens, dim), rnd(frames, tokens, dim), rnd(frames, tokens, dim), rnd(frames, tokens, dim)
    shift, scale, gate = rnd(frames, dim), rnd(frames, dim), rnd(frames, dim)
    wq, wk = rnd(dim), rnd(dim)
    head_dim = dim // heads
    grid_w = 52 if tokens % 52 == 0 else tokens
    cos, sin = rope_tables(torch.arange(frames) + seed, (tokens // grid_w, grid_w), head_dim, device)
    rope_bytes = 2 * cos.numel() * cos.element_size()
    return {
        "norm_modulate": ((x, shift, scale, 1e-6), 2 * n * e),
        "qk_norm_rope": ((q, k, wq, wk, cos, sin, 1e-6), 4 * n * e + rope_bytes),
        "gated_residual": ((x, y, gate), 3 * n * e),
        "gated_residual_norm_modulate": ((x, y, gate, shift, scale, 1e-6), 4 * n * e),
    }


def max_error(got, want) -> float:
    """Largest |got - want| over the op's outputs, relative to max(1, |want|)."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1.0)).item()
               for a, b in zip(got, want))


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
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each timing")
    parser.add_argument("--small", action="store_true", help="tiny shapes (smoke runs)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    from streamgen_kernels import triton_ops

    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype)
    peak = peak_bandwidth(args.device)
    copy_bw = copy_bandwidth(args.device)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    results = {"device": card, "dtype": args.dtype, "peak_bytes_per_s": peak, "copy_bytes_per_s": copy_bw,
               "timing": "cuda graph over rotated inputs (device time per call)" if cuda else "host clock",
               "ops": [], "block": []}
    if copy_bw:
        print(f"{card}: device-to-device copy {copy_bw / 1e9:.0f} GB/s (datasheet peak {peak / 1e9:.0f} GB/s)"
              if peak else f"{card}: copy {copy_bw / 1e9:.0f} GB/s", flush=True)
    dims = (16, 24, 3) if args.small else (1560, 1536, 12)  # tokens, dim, heads (the interpreter runs per row)
    for frames in (1, 3):
        tokens, dim, heads = dims
        cases = op_cases(frames, tokens, dim, heads, dtype, args.device)
        for name, (inputs, nbytes) in cases.items():
            ref = getattr(reference, name)
            # enough input sets that together they are 4x a 60 MB L2: each timed call reads HBM
            sets = [op_cases(frames, tokens, dim, heads, dtype, args.device, seed=i)[name][0]
                    for i in range(max(2, -(-256 * 2 ** 20 // nbytes)))] if cuda else [inputs]
            row = {"op": name, "frames": frames, "tokens": tokens, "dim": dim, "bytes": nbytes, "input_sets": len(sets)}
            ways = {"triton": getattr(triton_ops, name), "eager": ref}
            if name == "qk_norm_rope":
                ways = {"triton": triton_ops.qk_norm_rope, "triton_strided": triton_ops.qk_norm_rope_strided,
                        "triton_split": triton_ops.qk_norm_rope_split, "eager": ref}
            if not args.no_compile:
                ways["compile"] = torch.compile(ref)
            want = ref(*inputs)
            for way, fn in ways.items():
                try:
                    row[f"{way}_max_error"] = max_error(fn(*inputs), want)
                    if cuda:
                        sec = graph_time(fn, sets, args.iters)
                        row[f"{way}_launch_s"] = timeit(lambda: fn(*inputs), args.device, args.iters, args.warmup)
                    else:
                        sec = timeit(lambda: fn(*inputs), args.device, args.iters, args.warmup)
                except Exception as err:  # keep the other rows: one failing way must not lose the run
                    row[f"{way}_error"] = f"{type(err).__name__}: {err}"[:500]
                    print(f"{card} {name} F={frames} {way} failed: {row[f'{way}_error']}", flush=True)
                    continue
                row[f"{way}_s"] = sec
                row[f"{way}_GBps"] = nbytes / sec / 1e9
                if peak:
                    row[f"{way}_peak_fraction"] = nbytes / sec / peak
                if copy_bw:
                    row[f"{way}_copy_fraction"] = nbytes / sec / copy_bw
            if cuda:
                # the floor for any kernel: a plain copy moving the same bytes (half read, half written)
                copies = [(torch.empty(nbytes // 4, device=args.device, dtype=torch.int16),) for _ in sets]
                row["copy_same_bytes_s"] = graph_time(lambda a: a.clone(), copies, args.iters)
                row["triton_vs_copy_same_bytes"] = row["copy_same_bytes_s"] / row.get("triton_s", float("inf"))
                fused = triton_ops.qk_norm_rope_split if name == "qk_norm_rope" else getattr(triton_ops, name)
                row["warps_s"] = {}
                for warps in (1, 2, 4, 8, 16):
                    try:
                        row["warps_s"][warps] = graph_time(lambda *a: fused(*a, num_warps=warps), sets, args.iters)
                    except Exception as err:
                        row["warps_s"][warps] = f"{type(err).__name__}: {err}"[:200]
                print(f"{card} {name:>30} F={frames}: same-bytes copy {row['copy_same_bytes_s'] * 1e6:.1f} us; "
                      "by warps " + ", ".join(f"{w}: {v * 1e6:.1f} us" if isinstance(v, float) else f"{w}: failed"
                                            for w, v in row["warps_s"].items()), flush=True)
            if "triton_s" in row and "eager_s" in row:
                row["speedup_vs_eager"] = row["eager_s"] / row["triton_s"]
            if "triton_s" in row and "compile_s" in row:
                row["speedup_vs_compile"] = row["compile_s"] / row["triton_s"]
            results["ops"].append(row)
            if "speedup_vs_eager" in row:
                frac = f", {row['triton_peak_fraction'] * 100:.0f}% of peak" if peak else ""
                print(f"{card} {name:>30} F={frames}: triton {row['triton_s'] * 1e6:8.1f} us "
                      f"({row['triton_GBps']:.0f} GB/s{frac}, err {row['triton_max_error']:.1e}), "
                      f"eager {row['eager_s'] * 1e6:8.1f} us, x{row['speedup_vs_eager']:.2f} vs eager"
                      + (f", x{row['speedup_vs_compile']:.2f} vs compile" if "speedup_vs_compile" in row else ""),
                      flush=True)
        block_iters = max(1, args.iters // 5)
        off = timeit(block_case(frames, args.small, "torch", dtype, args.device), args.device, block_iters, args.warmup)
        on = timeit(block_case(frames, args.small, "triton", dtype, args.device), args.device, block_iters, args.warmup)
        block = {"frames": frames, "kernels_off_s": off, "kernels_on_s": on, "speedup": off / on}
        print(f"{card} DiT block F={frames}: kernels off {off * 1e3:.3f} ms, on {on * 1e3:.3f} ms, x{off / on:.2f}"
              " (host launch overhead included)", flush=True)
        if cuda:  # the same block's device time alone, from a CUDA graph
            try:
                dev_off = graph_time(block_case(frames, args.small, "torch", dtype, args.device), [()], block_iters)
                dev_on = graph_time(block_case(frames, args.small, "triton", dtype, args.device), [()], block_iters)
                block.update(graph_kernels_off_s=dev_off, graph_kernels_on_s=dev_on, graph_speedup=dev_off / dev_on)
                print(f"{card} DiT block F={frames} device time (CUDA graph): kernels off {dev_off * 1e3:.3f} ms, "
                      f"on {dev_on * 1e3:.3f} ms, x{dev_off / dev_on:.2f}", flush=True)
            except Exception as err:
                block["graph_error"] = f"{type(err).__name__}: {err}"[:500]
                print(f"{card} DiT block F={frames} graph timing failed: {block['graph_error']}", flush=True)
        results["block"].append(block)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
