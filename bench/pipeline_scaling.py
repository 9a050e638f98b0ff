"""Pipeline scaling on CPU: the engine on Ray stage actors (gloo between them), `small` model, one torch
thread per stage, P=1 and P=2 measured in one run.

Cases (frames/s = finished chunks x 4 x chunk frames per second, steady state: every case leaves its first
``--warmup`` chunks per stream out, while the KV caches fill; DiT only, no decode):
* one stream, stream_batch, P=2 vs P=1, with the same ``--lanes`` for both P (identical sampling
  semantics; default 2, the fewest that keep 2 stages busy);
* four streams, sequential, P=2 vs P=1;
* stream_batch vs sequential, one stream, P=1, 4 steps.
The driver hands each stage ``--micro-batches-per-call`` micro-batches per Ray call (``ParallelConfig.
micro_batches_per_call``; default 5 here, 1 in the service's config), the same for every case: Ray's hand-over
between calls costs a busy CPU stage ~1 ms of its time, which P=2 pays twice per P=1's once. 5 is a sequential
chunk's forwards per micro-batch of streams (4 steps and the context forward), so calls line up with chunks
(one call a chunk at P=1; at P=2 two micro-batches alternate, and two calls carry a chunk of each) and outputs
come at an even pace; a rate window starts and ends at a call's return. A finished chunk comes back with the
rest of its call (the latencies below include that, and the deeper queue).
Stages claim a core each (``ParallelConfig.pin_cores``; ``--no-pin-cores``: the OS places them); each case
records the cores its stages got, and ``--compare-pinning`` adds both P=2 cases with the other setting,
interleaved with the rest (ratio ``*_pinned_over_floating``). Each case also reports p50/p99 per-chunk latency
(dispatch of step 0 -> clean latents). Cases run ``--repeats`` times, interleaved; the median run by frames/s
stands for each (2 shared cores are noisy: single runs of the P=2/P=1 ratios spread by about +-0.1).

``--ring-ceiling`` adds, in each repeat, ``bench/ring_ceiling.py``'s measurement: the sequential case's stages as
two bare processes in a gloo ring (no Ray, no driver, no engine), giving ``sequential_ring_P2_over_P1`` (what
this host allows a two-stage pipeline of this model) and ``sequential_engine_over_ring`` (the share of it the
engine keeps).

Writes JSON (``--out``); the last line reads ``scaling stream_batch=<x>x sequential=<y>x``.
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

from bench.common import host_cpu, outputs_rate, percentile, write_json  # noqa: E402
from bench import ring_ceiling  # noqa: E402

from workers.config import (CacheConfig, EngineConfig, GenerationConfig, ParallelConfig, SamplerConfig,  # noqa: E402
                            get_config)
from workers.engine import PipelineEngine  # noqa: E402
from workers.executor import build_executor  # noqa: E402
from workers.ray_executor import start_local_ray  # noqa: E402


STEPS4 = (1000.0, 750.0, 500.0, 250.0)


def generation_config(model: str, mode: str, lanes: int = 1, steps: tuple[float, ...] = STEPS4) -> GenerationConfig:
    """What every case generates with: 1-frame chunks, a 1-frame sink and a 3-frame window."""
    return GenerationConfig(model=get_config(model),
                            sampler=SamplerConfig(denoising_steps=steps, chunk_frames=1, mode=mode, lanes=lanes),
                            cache=CacheConfig(sink_frames=1, window_frames=3, recache_frames=3))


def run_case(model: str, stages: int, mode: str, lanes: int, streams: int, chunks: int, warmup: int,
             steps: tuple[float, ...], pin_cores: bool = True, per_call: int = 1) -> dict:
    cfg = generation_config(model, mode, lanes, steps)
    executor = build_executor(cfg, ParallelConfig(stages=stages, backend="ray", threads_per_stage=1, cpus_per_stage=1,
                                                  decode_workers=0,  # DiT only: the clean latents come back
                                                  pin_cores=pin_cores, micro_batches_per_call=per_call))
    try:
        pinned, kept_heaps = executor.pinned_cores(), executor.kept_heaps()
        engine = PipelineEngine(cfg, executor, EngineConfig(profile_every=4, rebalance_every=8))
        for i in range(streams):
            engine.add_stream(f"s{i}", f"prompt {i}", i)
        stamps, latencies = [], []  # stamps: one per output, the same for outputs one step delivered
        got = {f"s{i}": 0 for i in range(streams)}
        # until every stream has its chunks and some output came after the burst that ended the warm-up (with
        # several micro-batches a call, one burst can hold them all)
        for _ in range(100_000):
            if min(got.values()) >= warmup + chunks and stamps[-1] > stamps[warmup * streams - 1]:
                break
            outs = engine.step()
            now = time.perf_counter()
            for out in outs:  # all of them, the last burst's too (the rate's window ends at a burst's end)
                got[out.stream_id] += 1
                stamps.append(now)
                if out.chunk >= warmup:
                    latencies.append(out.latency_s)
        else:
            raise RuntimeError(f"the engine did not deliver the chunks asked for: {got}")
        engine.drain()
        executor_split = executor.split()
    finally:
        executor.shutdown()
    measured, chunks_per_s = outputs_rate(stamps, warmup * streams)
    return {"model": model, "stages": stages, "mode": mode, "lanes": lanes, "streams": streams,
            "micro_batches_per_call": per_call, "split": executor_split, "rebalances": engine.rebalances,
            "pinned_cores": pinned, "kept_heaps": kept_heaps,
            "steps": len(steps), "warmup_chunks": warmup, "chunks_measured": measured, "chunks_per_s": chunks_per_s,
            "frames_per_s": chunks_per_s * 4 * cfg.sampler.chunk_frames,
            "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99)}


def show(row: dict) -> None:
    print(f"P={row['stages']} {row['mode']:>12} lanes={row['lanes']} streams={row['streams']} steps={row['steps']}: "
          f"{row['frames_per_s']:6.2f} frames/s  latency p50 {row['latency_p50_s']:.2f} s  "
          f"p99 {row['latency_p99_s']:.2f} s  split {row['split']}  cores {row['pinned_cores']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/pipeline_scaling.json")
    parser.add_argument("--model", default="small")
    parser.add_argument("--chunks", type=int, default=12, help="measured chunks per stream (after warm-up)")
    parser.add_argument("--warmup", type=int, default=4, help="chunks per stream ignored at the start")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median counts")
    parser.add_argument("--pin-cores", action=argparse.BooleanOptionalAction, default=True,
                        help="each stage claims a core of its own (ParallelConfig.pin_cores)")
    parser.add_argument("--compare-pinning", action="store_true",
                        help="also run both P=2 cases with the other --pin-cores setting, interleaved")
    parser.add_argument("--lanes", type=int, default=2,
                        help="stream_batch lanes of the one-stream P=1/P=2 cases (the same for both P)")
    parser.add_argument("--micro-batches-per-call", type=int, default=5,
                        help="micro-batches the driver hands each stage per call "
                             "(ParallelConfig.micro_batches_per_call)")
    parser.add_argument("--ring-ceiling", action="store_true",
                        help="also measure the sequential case's stages in a bare gloo ring each repeat (ring_ceiling.py)")
    args = parser.parse_args()
    if args.warmup < 1 or args.chunks < 2:
        parser.error("--warmup must be at least 1 and --chunks at least 2 (a rate is measured between chunks after "
                     "the warm-up)")
    torch.set_num_threads(1)
    steps4 = STEPS4
    start_local_ray(num_cpus=2)
    import ray

    pin, other = args.pin_cores, not args.pin_cores
    cases = {  # name -> (stages, mode, lanes, streams, chunks, warm-up, pin cores)
        "stream_batch_P1": (1, "stream_batch", args.lanes, 1, args.chunks, args.warmup, pin),
        "stream_batch_P2": (2, "stream_batch", args.lanes, 1, args.chunks, args.warmup, pin),
        "sequential4_P1": (1, "sequential", 1, 4, max(4, args.chunks // 2), args.warmup, pin),
        "sequential4_P2": (2, "sequential", 1, 4, max(4, args.chunks // 2), args.warmup, pin),
        "stream_batch_lanes1_P1": (1, "stream_batch", 1, 1, args.chunks, args.warmup, pin),
        "sequential1_P1": (1, "sequential", 1, 1, max(4, args.chunks // 2), args.warmup, pin),
    }
    if args.compare_pinning:
        cases["stream_batch_P2_other_pinning"] = cases["stream_batch_P2"][:-1] + (other,)
        cases["sequential4_P2_other_pinning"] = cases["sequential4_P2"][:-1] + (other,)
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    rings: list[dict] = []
    try:
        for rep in range(args.repeats):  # interleaved, so every case sees the machine in the same states
            print(f"-- repeat {rep + 1}/{args.repeats}", flush=True)
            for name, (stages, mode, lanes, streams, chunks, warmup, pin_cores) in cases.items():
                runs[name].append(run_case(args.model, stages, mode, lanes, streams, chunks, warmup, steps4,
                                           pin_cores, args.micro_batches_per_call))
                show(runs[name][-1])
            if args.ring_ceiling:  # the sequential case's micro-batches: 2 streams each at P=2, 4 at P=1
                rings.append(ring_ceiling.measure(args.model, streams_per_mb=2))
                print(f"ring without Ray/driver/engine: P2/P1 {rings[-1]['ratio']:.3f} "
                      f"(cores {rings[-1]['cores']})", flush=True)
    finally:
        ray.shutdown()
    rows = {}
    for name, got in runs.items():  # the median run by frames/s stands for the case
        ordered = sorted(got, key=lambda r: r["frames_per_s"])
        rows[name] = dict(ordered[len(ordered) // 2], repeats_frames_per_s=[r["frames_per_s"] for r in got])
    ratios = {
        "stream_batch_P2_over_P1": rows["stream_batch_P2"]["frames_per_s"] / rows["stream_batch_P1"]["frames_per_s"],
        "sequential_P2_over_P1": rows["sequential4_P2"]["frames_per_s"] / rows["sequential4_P1"]["frames_per_s"],
        "stream_batch_over_sequential_P1": rows["stream_batch_lanes1_P1"]["frames_per_s"]
        / rows["sequential1_P1"]["frames_per_s"],
    }
    if rings:
        ratios["sequential_ring_P2_over_P1"] = statistics.median(r["ratio"] for r in rings)
        ratios["sequential_engine_over_ring"] = ratios["sequential_P2_over_P1"] / ratios["sequential_ring_P2_over_P1"]
    for case in ("stream_batch_P2", "sequential4_P2") if args.compare_pinning else ():
        ratios[f"{case}_pinned_over_floating"] = (rows[case]["frames_per_s"] / rows[f"{case}_other_pinning"]["frames_per_s"]
                                                  ) ** (1 if pin else -1)
    result = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpu": host_cpu(), "cpu_count": os.cpu_count(), "threads_per_stage": 1,
                          "pin_cores": args.pin_cores, "micro_batches_per_call": args.micro_batches_per_call},
              "cases": rows, "ratios": ratios, "ring_ceiling": rings}
    write_json(args.out, result)
    print(f"stream_batch vs sequential at P=1 (4 steps, one stream): x{ratios['stream_batch_over_sequential_P1']:.2f}")
    if rings:
        print(f"sequential without Ray/driver/engine (ring): {ratios['sequential_ring_P2_over_P1']:.2f}x; "
              f"engine / ring = {ratios['sequential_engine_over_ring']:.3f}")
    for name in (n for n in ratios if n.endswith("_pinned_over_floating")):
        print(f"{name}: x{ratios[name]:.3f}")
    print(f"scaling stream_batch={ratios['stream_batch_P2_over_P1']:.2f}x "
          f"sequential={ratios['sequential_P2_over_P1']:.2f}x")


if __name__ == "__main__":
    main()
