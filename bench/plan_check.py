"""Hold the planner to the real engine: one case run over Ray stage actors here, and simulated with a
measured profile, then ``plan error fps=<x>% latency=<y>%`` (simulated vs real, frames/s and p50 chunk latency).

    python bench/plan_check.py --model small --stages 2 --steps 4 --streams 4 --mode sequential
    python bench/plan_check.py --matrix   # P=1,2 x both modes x 1,4 streams (the issue's "Must show")

The real run is bench/pipeline_scaling.py's: one torch thread per stage, streams flat out, the window from
the last warm-up output to the last output; the median of ``--repeats`` runs, which a matrix takes round by
round over its cases (the host's speed drifts). The simulation runs the same
engine config and is measured the same way (warm-up chunks, then measured chunks per stream). Writes JSON
(``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(HERE)] + [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]

import torch  # noqa: E402

from bench.common import host_cpu, outputs_rate, percentile, write_json  # noqa: E402
from workers.config import CacheConfig, EngineConfig, GenerationConfig, ParallelConfig, SamplerConfig, \
    get_config  # noqa: E402
from workers.costs import load_profile  # noqa: E402
from workers.engine import PipelineEngine  # noqa: E402
from workers.sim import simulate  # noqa: E402


def case(args) -> tuple[GenerationConfig, ParallelConfig, EngineConfig]:
    steps = tuple(1000.0 * (args.steps - i) / args.steps for i in range(args.steps))
    lanes = args.lanes or (args.stages if args.mode == "stream_batch" else 1)
    gen = GenerationConfig(model=get_config(args.model),
                           sampler=SamplerConfig(denoising_steps=steps, chunk_frames=1, mode=args.mode, lanes=lanes),
                           cache=CacheConfig(sink_frames=1, window_frames=3, recache_frames=3))
    parallel = ParallelConfig(stages=args.stages, decode_workers=args.decode_workers, threads_per_stage=1)
    return gen, parallel, EngineConfig(profile_every=4, rebalance_every=8)


def run_real(gen: GenerationConfig, parallel: ParallelConfig, engine_cfg: EngineConfig, streams: int, chunks: int,
             warmup: int) -> dict:
    from workers.ray_executor import RayExecutor

    executor = RayExecutor(gen, parallel)
    try:
        engine = PipelineEngine(gen, executor, engine_cfg)
        engine.calibrate()
        stamps, latencies = [], []
        need = {f"s{i}": warmup + chunks for i in range(streams)}
        start = time.perf_counter()
        for sid in need:
            engine.add_stream(sid, f"prompt {sid}", int(sid[1:]))

        def on_output(out):
            stamps.append(time.perf_counter())
            if out.chunk >= warmup:
                latencies.append(out.latency_s)

        engine.run_chunks(need, on_output=on_output)
        wall = time.perf_counter() - start
        engine.drain()
        split = executor.split()
    finally:
        executor.shutdown()
    fps = outputs_rate(stamps, warmup * streams)[1] * engine.video_frames_per_chunk
    return {"frames_per_s": fps, "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99), "wall_s": wall, "split": split,
            "stage_compute_s": engine.stats.compute_per_micro_batch}


def real_runs(cases: list[argparse.Namespace], repeats: int) -> list[list[dict]]:
    """``repeats`` real runs of each case, round by round (case 1, 2, ..., then again): the host's speed drifts
    by +-25% within minutes here, and interleaving spreads its slow spells over every case rather than over
    whichever ran then."""
    runs: list[list[dict]] = [[] for _ in cases]
    for i in range(repeats):
        for args, done in zip(cases, runs):
            gen, parallel, engine_cfg = case(args)
            done.append(run_real(gen, parallel, engine_cfg, args.streams, args.chunks, args.warmup))
            if len(cases) > 1:
                print(f"  round {i + 1}/{repeats}: P={args.stages} {args.mode} streams={args.streams}: "
                      f"{done[-1]['frames_per_s']:.2f} frames/s", flush=True)
    return runs


def check(args, profile, runs: list[dict]) -> dict:
    """One case against its real runs (their medians: one run on a shared 2-core host varies by +-25%): the
    simulation over as long as the median real run took."""
    gen, parallel, engine_cfg = case(args)
    real = {key: statistics.median(r[key] for r in runs)
            for key in ("frames_per_s", "latency_p50_s", "latency_p99_s", "wall_s")}
    real["split"] = runs[-1]["split"]
    real["stage_compute_s"] = [statistics.median(r["stage_compute_s"][k] for r in runs) for k in range(args.stages)]
    real["repeats"] = runs
    # measured as the real run is: after `warmup` chunks per stream, until each stream has `chunks` more
    sim = simulate(gen, parallel, profile, args.streams, 100 * real["wall_s"], engine_cfg=engine_cfg,
                   chunks=(args.warmup, args.chunks))
    err_fps = (sim.frames_per_s - real["frames_per_s"]) / real["frames_per_s"] * 100
    err_lat = (sim.latency_p50_s - real["latency_p50_s"]) / real["latency_p50_s"] * 100
    print(f"P={args.stages} {args.mode} streams={args.streams} steps={args.steps}")
    each = ", ".join(f"{r['frames_per_s']:.2f}" for r in runs)
    print(f"  real: {real['frames_per_s']:.2f} frames/s, p50 {real['latency_p50_s']:.3f} s, split {real['split']} "
          f"(median of {len(runs)}: {each} frames/s)")
    print(f"  plan: {sim.frames_per_s:.2f} frames/s, p50 {sim.latency_p50_s:.3f} s, split {sim.split}, "
          f"bottleneck {sim.bottleneck}")
    ms = lambda xs: "[" + ", ".join(f"{1000 * x:.1f}" for x in xs) + "]"  # noqa: E731
    print(f"  stage compute per micro-batch (ms): real {ms(real['stage_compute_s'])}, plan {ms(sim.stage_compute_s)}")
    print(f"plan error fps={err_fps:+.1f}% latency={err_lat:+.1f}%", flush=True)
    return {"case": {k: getattr(args, k) for k in ("model", "stages", "steps", "streams", "mode", "lanes",
                                                  "decode_workers", "chunks", "warmup", "repeats")},
            "real": real,
            "plan": {"frames_per_s": sim.frames_per_s, "latency_p50_s": sim.latency_p50_s,
                     "latency_p99_s": sim.latency_p99_s, "split": sim.split, "bottleneck": sim.bottleneck,
                     "stage_compute_s": sim.stage_compute_s,
                     "utilization": sim.utilization},
            "error_pct": {"fps": err_fps, "latency_p50": err_lat}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--mode", default="sequential", choices=("sequential", "stream_batch"))
    parser.add_argument("--lanes", type=int, default=0, help="stream_batch lanes (0: one per stage)")
    parser.add_argument("--decode-workers", type=int, default=1, help="shared decode workers (0: latents only)")
    parser.add_argument("--chunks", type=int, default=6, help="measured chunks per stream")
    parser.add_argument("--warmup", type=int, default=2, help="chunks per stream ignored at the start")
    parser.add_argument("--repeats", type=int, default=3, help="real runs per case (their median is compared)")
    parser.add_argument("--profile", default="profiles/cpu-2core.json")
    parser.add_argument("--out", default="bench/out/plan_check.json")
    parser.add_argument("--matrix", action="store_true", help="P=1,2 x both modes x 1,4 streams")
    args = parser.parse_args()
    torch.set_num_threads(1)
    profile = load_profile(args.profile)
    host = host_cpu()
    if not profile.device.startswith(host):
        print(f"warning: profile {args.profile} was measured on '{profile.device}', this host is '{host}': "
              "re-measure it here (python bench/profile.py) or the errors below compare two machines", flush=True)
    runs = [args]
    if args.matrix:
        runs = [argparse.Namespace(**{**vars(args), "stages": p, "mode": m, "streams": n})
                for p in (1, 2) for m in ("sequential", "stream_batch") for n in (1, 4)]

    from workers.ray_executor import start_local_ray

    start_local_ray(num_cpus=2)
    import ray

    try:
        rows = [check(run, profile, real) for run, real in zip(runs, real_runs(runs, args.repeats))]
    finally:
        ray.shutdown()
    write_json(args.out, {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                      "cpu": host, "cpu_count": os.cpu_count()},
                          "profile": profile.name, "profile_device": profile.device, "cases": rows})
    if len(rows) > 1:
        worst_fps = max(abs(r["error_pct"]["fps"]) for r in rows)
        worst_lat = max(abs(r["error_pct"]["latency_p50"]) for r in rows)
        print(f"worst plan error fps={worst_fps:.1f}% latency={worst_lat:.1f}% over {len(rows)} cases")


if __name__ == "__main__":
    main()
