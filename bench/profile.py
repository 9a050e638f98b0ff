"""Measure a cost profile (workers/costs.py) on this machine and write it as JSON: what ``streamgen plan`` and
the simulator charge for each piece.

    python bench/profile.py --model small --out profiles/cpu-2core.json --name cpu-2core

In process, one torch thread (a stage actor's setting): per-block forward, embed and head against tokens
(P=2 stages on 1..5 latent frames of one stream and on micro-batches of 2 and 4 streams, so stage 0's extra
time is the embedding and stage 1's the head), attention over the KV cache (the same forwards against one
cached frame and against a full default cache), the decoder per chunk (1 and 2 latent frames), text encode,
how much a forward slows while every core computes (one process per core, as bench/cpu_ceiling.py), and, over
Ray, the per-call overhead of a stage actor and the stage-to-stage transfer (gloo, two processes, small and
large messages). Medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(HERE)] + [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]

import torch  # noqa: E402

from bench.common import host_cpu  # noqa: E402
from workers.config import CacheConfig, GenerationConfig, ParallelConfig, SamplerConfig, get_config  # noqa: E402
from workers.costs import Linear, ModelCosts, Profile, dump_profile, load_profile  # noqa: E402
from workers.executor import InProcessExecutor  # noqa: E402
from workers.model.text import build_text_encoder  # noqa: E402


def fit(xs: list[float], ys: list[float]) -> Linear:
    """Least squares y = a + b x, both clamped at 0 (a negative intercept becomes a fit through 0)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0
    a = my - b * mx
    if a < 0:
        return Linear(0.0, max(0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)))
    return Linear(a, max(0.0, b))


SHORT_CACHE = CacheConfig(policy="none", window_frames=1)
"""The near-empty cache the token fits are measured against (one cached frame)."""


def dit_costs(gen: GenerationConfig, points: list[tuple[int, int]], repeats: int) -> tuple[Linear, float, Linear, Linear]:
    """(per block, attention per query x cached key token, embed, head) against micro-batch tokens. Each forward
    attends to a full cache (the stages' ``profile``): one cached frame for the fits, ``gen.cache``'s capacity
    for the attention term."""
    ex = InProcessExecutor(gen, ParallelConfig(stages=2, backend="local", decode_workers=0))
    m = gen.model
    grid = m.token_grid(gen.height, gen.width)
    tpf = grid[0] * grid[1]

    def per_block(n: int, f: int, cache: CacheConfig) -> tuple[int, float, float, float]:
        runs = [ex.profile(grid, f, cache, streams=n) for _ in range(repeats)]  # [repeats][stage] StageStats
        blocks = [statistics.mean(sum(s.block_s.values()) / len(s.block_s) for s in r) for r in runs]
        extra = [[max(0.0, s.compute_s - sum(s.block_s.values())) for s in r] for r in runs]
        return (runs[0][0].tokens, statistics.median(blocks), statistics.median(e[0] for e in extra),
                statistics.median(e[1] for e in extra))

    xs, blk, full, emb, head = [], [], [], [], []
    extra_keys = (gen.cache.capacity_frames - SHORT_CACHE.capacity_frames) * tpf
    for n, f in points:
        tokens, b_short, e, h = per_block(n, f, SHORT_CACHE)
        b_full = per_block(n, f, gen.cache)[1]
        xs.append(tokens)
        blk.append(b_short)
        full.append(b_full)
        emb.append(e)
        head.append(h)
        print(f"{n} stream(s) x {f} latent frames ({tokens} tokens): block {b_short * 1000:.2f} ms ({b_full * 1000:.2f} ms against "
              f"{gen.cache.capacity_frames} cached frames), embed {e * 1000:.2f} ms, head {h * 1000:.2f} ms",
              flush=True)
    ex.shutdown()
    attention = max(0.0, statistics.median((bf - bs) / (x * extra_keys) for x, bs, bf in zip(xs, blk, full)))
    # the fits hold the one cached frame's attention out, so a forward against c cached frames costs
    # block(x) + attention * x * c * tpf
    short = [b - attention * x * SHORT_CACHE.capacity_frames * tpf for x, b in zip(xs, blk)]
    print(f"attention over the cache: {attention * 1e9:.3f} ns per query x key token per block", flush=True)
    return fit(xs, short), attention, fit(xs, emb), fit(xs, head)


def decode_cost(gen: GenerationConfig, repeats: int) -> Linear:
    ex = InProcessExecutor(gen, ParallelConfig(stages=1, backend="local", decode_workers=1))
    m = gen.model
    lh, lw = m.latent_grid(gen.height, gen.width)
    tokens = m.tokens_per_frame(gen.height, gen.width)
    xs, ys = [], []
    for f in (1, 2):
        ys.append(statistics.median(ex.profile_decode((m.out_channels, lh, lw), f) for _ in range(repeats)))
        xs.append(f * tokens)
        print(f"decode {f} latent frames: {ys[-1] * 1000:.2f} ms", flush=True)
    ex.shutdown()
    return fit(xs, ys)


def text_cost(gen: GenerationConfig, repeats: int) -> float:
    enc = build_text_encoder(gen.model)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        enc(f"a fresh prompt number {i}")  # new prompts: the encoder caches by prompt
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gloo(rank: int, port: int, sizes: list[int], reps: int, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = {}
    for n in sizes:
        x = torch.zeros(n // 4)
        times = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                dist.send(x, 1)
                dist.recv(x, 1)  # round trip, so rank 0's clock times both ways
            else:
                dist.recv(x, 0)
                dist.send(x, 0)
            times.append((time.perf_counter() - start) / 2)
        result[n] = statistics.median(times)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def transfer_cost(reps: int) -> tuple[float, float]:
    """(latency s, bytes/s) of a gloo send between two local processes (the Ray stages' transport)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    small, large = 1024, 8 << 20
    procs = [ctx.Process(target=_gloo, args=(r, port, [small, large], reps, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = q.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    latency = got[small]
    bw = (large - small) / max(got[large] - got[small], 1e-9)
    print(f"transfer: {latency * 1e6:.0f} us + {bw / 1e9:.2f} GB/s", flush=True)
    return latency, bw


def ray_call_overhead(reps: int) -> float:
    """Seconds of a Ray actor method round trip (each stage call pays one)."""
    from workers.ray_executor import start_local_ray

    import ray

    start_local_ray(num_cpus=2)
    try:
        @ray.remote(num_cpus=0)
        class Echo:
            def call(self, x):
                return x

        actor = Echo.remote()
        ray.get(actor.call.remote(0))
        times = []
        for i in range(reps):
            start = time.perf_counter()
            ray.get(actor.call.remote(i))
            times.append(time.perf_counter() - start)
        value = statistics.median(times)
    finally:
        ray.shutdown()
    print(f"ray call overhead: {value * 1e6:.0f} us", flush=True)
    return value


def shared_slowdown(model, repeats: int) -> tuple[int, float]:
    """(cores, a stage forward's slowdown while every core computes): bench/cpu_ceiling.py's loop of the model's
    FFN matmuls, one process alone and one per core at once, interleaved; the median of ``repeats``."""
    from bench.cpu_ceiling import run

    cores = os.cpu_count() or 1
    args = argparse.Namespace(iters=100, dim=model.dim, ffn=model.ffn_dim, tokens=384)
    ratios = []
    for _ in range(repeats):
        alone, together = run(1, args), run(cores, args)
        ratios.append(max(1.0, together / alone))
    value = statistics.median(ratios)
    print(f"{cores} cores computing at once: each forward x{value:.2f} (repeats "
          f"{', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    return cores, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--name", default="cpu-2core")
    parser.add_argument("--out", default="profiles/cpu-2core.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", default="1,2,3,5,2x5,4x5",
                        help="profiled forwards: latent frames of one stream, or STREAMSxFRAMES in one micro-batch "
                             "(the engine batches streams: the fit spans the micro-batches it runs)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray call overhead and gloo transfer")
    parser.add_argument("--merge", action="store_true", help="keep the other models already in --out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = get_config(args.model)
    gen = GenerationConfig(model=model, sampler=SamplerConfig(chunk_frames=1), cache=CacheConfig())
    points = [tuple(int(v) for v in p.split("x")) if "x" in p else (1, int(p)) for p in args.frames.split(",")]
    block, attention, embed, head = dit_costs(gen, points, args.repeats)
    costs = ModelCosts(block=block, attention_s=attention, embed=embed, head=head,
                       vae_decode=decode_cost(gen, args.repeats),
                       text_encode_s=text_cost(gen, max(5, args.repeats)))
    cores, slowdown = shared_slowdown(model, args.repeats)
    latency, bw, overhead = 0.0, 1e10, 0.0
    if not args.no_ray:
        latency, bw = transfer_cost(20)
        overhead = ray_call_overhead(50)
    models = {}
    if args.merge and os.path.exists(args.out):
        models = dict(load_profile(args.out).models)
    models[args.model] = costs
    command = "python bench/profile.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    profile = Profile(name=args.name, device=f"{host_cpu()}, 1 torch thread per stage, torch {torch.__version__}",
                      command=command, dtype="float32", gpu_memory_gib=None, transfer_bytes_per_s=bw,
                      transfer_latency_s=latency, call_overhead_s=overhead, cores=cores,
                      shared_slowdown=slowdown, models=models,
                      derivation="measured by the command above (medians; linear fits against tokens, attention "
                                 "against query x cached key tokens)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    import json

    with open(args.out, "w") as f:
        json.dump(dump_profile(profile), f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
