"""The GPU serving path, measured on one GPU: the engine alone and the real gRPC service (``--backend local``:
the GPU machine has no Ray), side by side, in one run.

Default: ``wan2.1-1.3b`` at 480x832, random weights, bf16, stream_batch, one latent frame (4 video frames) per
chunk, shift 8 (StreamDiffusionV2's single-GPU setting); the hash text encoder stands in for umT5 (a prompt is
encoded once per stream, never per frame). For 1 and 4 denoising steps and for the ``wan`` and
``taehv`` decoders (random weights, written to local files in their real layouts and loaded as served):

* (a) the engine alone, in process: DiT only (no decode worker) and DiT + decode (one shared decode worker);
* (b) ``streamgen serve --backend local`` on 127.0.0.1 with real gRPC clients, with the engine rows' engine
  settings: 1 stream at 0.9 of the highest fps its latency model admits, then as many 16 fps streams as
  admission allows; delivered frames/s, TTFF, p50/p99 frame latency (the server's
  ``streamgen_frame_latency_seconds``), deadline misses. The service paces frames at the fps asked for, so
  the one stream's figures are ``delivered_over_requested`` (its overhead: below 1 when it falls behind
  that pace) and ``requested_over_engine`` (that pace against the engine alone);
* (c) CUDA graphs on and off (DiT only), with the largest latent difference between the two;
* a ``torch.profiler`` kernel table of the engine (1 step, TAEHV decode) beside the JSON.

Prints a table beside StreamDiffusionV2's single-H100 figures (20.47 FPS at 1 step, 13.95 at 4, decode
included) and writes JSON (``--out``). On the GPU machine, carry the diffusers wheel in .whl/ for the Wan VAE
rows (see bench/gpu.sh); a row that cannot run records its error and the rest go on.

    python bench/gpu_service.py --out "$OUT/gpu_service.json"                    # the GPU machine, < 8 min
    python bench/gpu_service.py --model tiny --device cpu --dtype float32 --quick  # smoke run anywhere
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]

import torch  # noqa: E402

from bench.common import percentile as pct, start_serve, stop_serve, write_json  # noqa: E402
from bench.service_overhead import Delivery, admitted_fps, steady_rate  # noqa: E402

from workers.batch import OutputFormat  # noqa: E402
from workers.config import (CacheConfig, EngineConfig, GenerationConfig, ParallelConfig, SamplerConfig,  # noqa: E402
                            get_config)
from workers.engine import PipelineEngine  # noqa: E402
from workers.executor import InProcessExecutor  # noqa: E402

SDV2_H100 = {1: 20.47, 4: 13.95}
PROMPT = "a red fox running through fresh snow, cinematic"


def step_list(steps: int) -> tuple[float, ...]:
    return tuple(1000.0 - 250.0 * i for i in range(steps))


def weights(model: str, decoder: str, workdir: str, dtype: torch.dtype) -> dict:
    """Local weight files for the decoder, in the layouts the service loads (random values: no download)."""
    cfg = get_config(model)
    if cfg.vae == "tiny":
        return {}
    if decoder == "taehv":
        from workers.model.taehv import TAEHVDecoder

        path = os.path.join(workdir, "taew2_1.pth")
        if not os.path.exists(path):
            torch.save(TAEHVDecoder(cfg.in_channels).state_dict(), path)  # decoder.* keys: the published names
        return {"taehv_path": path}
    path = os.path.join(workdir, "wan-vae")
    if not os.path.isdir(path):
        from diffusers import AutoencoderKLWan  # the default (Wan2.1) architecture

        torch.manual_seed(0)
        AutoencoderKLWan().to(dtype).save_pretrained(path)
    return {"vae_path": path}


def generation(args, steps: int, decoder: str, paths: dict) -> GenerationConfig:
    # umT5-XXL (4.7B) random weights would take minutes to build for a prompt encoded once per stream; the hash
    # encoder stands in (the per-frame path never touches the text encoder)
    model = get_config(args.model, vae_decoder=decoder, text_encoder="hash")
    return GenerationConfig(model=model, sampler=SamplerConfig(denoising_steps=step_list(steps), chunk_frames=1,
                                                               shift=8.0, mode="stream_batch"),
                            cache=CacheConfig(sink_frames=3, window_frames=3, recache_frames=3), **paths)


def parallel(args, decode: bool, graphs: str = "auto") -> ParallelConfig:
    return ParallelConfig(stages=1, backend="local", device=args.device, dtype=args.dtype,
                          decode_workers=1 if decode else 0, cuda_graphs=graphs)


# -- (a), (c): the engine alone ----------------------------------------------------------------------------

ENGINE = EngineConfig(profile_every=0, rebalance_every=0)
"""The engine rows' and the service's engine settings: no profiled (eager, synchronised) micro-batches, no
rebalancing."""


def engine_run(gen: GenerationConfig, par: ParallelConfig, chunks: int, warmup: int, profile: str | None = None):
    """Frames/s of one stream through the in-process engine; the latents of its chunks; a profiler table."""
    executor = InProcessExecutor(gen, par)
    try:
        engine = PipelineEngine(gen, executor, ENGINE)
        engine.add_stream("s", PROMPT, 0, output=OutputFormat("jpeg", 90))
        stamps, latents = [], []

        def on_output(out):
            stamps.append(time.perf_counter())
            latents.append(out.latents)

        engine.run_chunks({"s": warmup + chunks}, on_output=on_output)
        table = None
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if par.device == "cuda" else [])
            with torch_profile(activities=activities) as prof:
                engine.run_chunks({"s": warmup + chunks + 8})
            key = "cuda_time_total" if par.device == "cuda" else "cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=30)
        graphs = executor.stages[0].graphs
        start = stamps[warmup - 1]
        fps = (len(stamps) - warmup) * gen.model.vae_stride[0] * gen.sampler.chunk_frames / (stamps[-1] - start)
        return {"fps": fps, "graph_captures": graphs.captures, "graph_replays": graphs.replays}, latents, table
    finally:
        executor.shutdown()


# -- (b): the service --------------------------------------------------------------------------------------

def write_service_config(path: str, args, steps: int, decoder: str, paths: dict) -> None:
    lines = ["generation:", f"  model: {{name: {args.model}, vae_decoder: {decoder}, text_encoder: hash}}",
             "  sampler:", f"    denoising_steps: {list(step_list(steps))}", "    chunk_frames: 1", "    shift: 8.0",
             "    mode: stream_batch", "  cache: {sink_frames: 3, window_frames: 3, recache_frames: 3}"]
    lines += [f"  {k}: {v}" for k, v in paths.items()]
    lines += ["parallel:", "  stages: 1", "  backend: local", f"  device: {args.device}", f"  dtype: {args.dtype}",
              "  decode_workers: 1", "server:", "  listen: 127.0.0.1:0", "  metrics_listen: 127.0.0.1:0",
              "  max_streams_per_replica: 64", "  max_fps: 1000", "  probe_period_s: 0",
              # a stream at the highest fps the latency model admits takes all of it: no 10% headroom here
              "  admission_headroom: 1.0",
              "engine:", f"  profile_every: {ENGINE.profile_every}", f"  rebalance_every: {ENGINE.rebalance_every}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def latency_histogram(metrics_port: int) -> dict[float, float]:
    """``streamgen_frame_latency_seconds`` cumulative bucket counts (upper bound -> count) from /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "streamgen_frame_latency_seconds":
            return {float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")}
    return {}


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """The q-quantile of what landed between two scrapes, interpolated inside its bucket (as PromQL does)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return float("nan")
    rank, lower, prev = q * total, 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - prev) / max(count - prev, 1e-12)
        lower, prev = bound, count
    return bounds[-2]


async def drive(port: int, streams: int, fps: float | None, frames: int, max_fps: float) -> dict:
    """``streams`` streams (0: as many as admission allows: opened one after another until one is refused) at
    ``fps`` (None: one stream at 0.9 of the highest fps the latency model admits, late frames sent at once)."""
    import grpc

    from orchestrator.client import StreamgenClient

    async with StreamgenClient(f"127.0.0.1:{port}") as client:
        if fps is None:
            fps = 0.9 * await admitted_fps(client, max_fps)  # the model moves a little as decodes are measured
        cap = (await client.capacity(fps=fps)).streams_max
        deliveries: list[Delivery] = []
        ttff, late, tasks = [], [], []

        all_open = asyncio.Event()

        async def read(s: int, call, first, started: float) -> None:
            """Reads until ``frames`` frames came after the last stream opened, then ends the stream: opened one
            after another, the streams still overlap for a steady window of ``frames`` frames each."""
            ttff.append(time.monotonic() - started)
            deliveries.append(Delivery(time.monotonic(), s, first.chunk, 1))
            late[s] += not first.deadline_met
            after = 0
            while after < frames and (frame := await call.read()) is not grpc.aio.EOF:
                deliveries.append(Delivery(time.monotonic(), s, frame.chunk, 1))
                late[s] += not frame.deadline_met
                after += all_open.is_set()
            call.cancel()

        for s in range(streams or 64):
            started = time.monotonic()
            call = client.generate(PROMPT, seed=s, fps=fps, late_policy="deliver_flagged")
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as err:
                if streams or err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or not tasks:
                    raise
                break  # admission says no more
            late.append(0)
            tasks.append(asyncio.create_task(read(s, call, first, started)))
        all_open.set()
        await asyncio.gather(*tasks)
    return {"streams": len(tasks), "fps_requested": fps, "capacity_at_fps": cap, "deliveries": deliveries,
            "ttff": ttff, "late": late}


def service_run(args, steps: int, decoder: str, paths: dict, workdir: str) -> dict:
    config = os.path.join(workdir, f"serve-{steps}-{decoder}.yaml")
    write_service_config(config, args, steps, decoder, paths)
    proc, port, mport = start_serve(config, os.path.join(workdir, f"serve-{steps}-{decoder}.log"))
    rows = {}
    try:
        for name, streams, fps in (("one_stream", 1, None), ("admitted_at_16fps", 0, 16.0)):
            before = latency_histogram(mport)
            got = asyncio.run(drive(port, streams, fps, args.service_frames, 1000.0))
            after = latency_histogram(mport)
            window = steady_rate(got["deliveries"], got["streams"], warmup=2)
            delivered = len(got["deliveries"])
            rows[name] = {"streams": got["streams"], "fps_requested": got["fps_requested"],
                          "capacity_at_fps": got["capacity_at_fps"], "delivered_fps": window["frames_per_s"],
                          "ttff_p50_s": pct(got["ttff"], 50), "ttff_max_s": max(got["ttff"]),
                          "frame_latency_p50_s": histogram_quantile(0.5, before, after),
                          "frame_latency_p99_s": histogram_quantile(0.99, before, after),
                          "late_ratio": sum(got["late"]) / max(delivered, 1), "frames": delivered}
    finally:
        stop_serve(proc)
    return rows


# -- the run -----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/gpu_service.json")
    parser.add_argument("--model", default="wan2.1-1.3b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--chunks", type=int, default=24, help="measured chunks of the engine rows")
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--service-frames", type=int, default=160,
                        help="frames each stream of the service rows reads once every stream is open")
    parser.add_argument("--quick", action="store_true", help="few chunks and frames (smoke runs)")
    parser.add_argument("--decoders", default="taehv,wan")
    parser.add_argument("--steps", default="1,4")
    args = parser.parse_args(argv)
    if args.quick:
        args.chunks, args.warmup, args.service_frames = 3, 2, 24
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    dtype = getattr(torch, args.dtype)
    workdir = tempfile.mkdtemp(prefix="streamgen-gpu-service-")
    result = {"card": card, "torch": torch.__version__, "model": args.model, "dtype": args.dtype,
              "resolution": list(get_config(args.model).latent_grid(get_config(args.model).default_height,
                                                                     get_config(args.model).default_width)),
              "engine": [], "service": [], "graphs": [], "errors": []}
    steps_list = [int(s) for s in args.steps.split(",")]
    decoders = args.decoders.split(",")

    def attempt(what: str, fn):
        started = time.monotonic()
        try:
            out = fn()
            print(f"{what}: done in {time.monotonic() - started:.0f} s", flush=True)
            return out
        except Exception as err:  # noqa: BLE001 - one broken row must not cost the whole device call
            print(f"{what} failed: {type(err).__name__}: {err}", flush=True)
            result["errors"].append({"what": what, "error": f"{type(err).__name__}: {err}"[:500]})
            return None

    for steps in steps_list:
        dit = attempt(f"engine steps={steps} DiT only", lambda: engine_run(
            generation(args, steps, "wan", {}), parallel(args, decode=False), args.chunks, args.warmup))
        if dit:
            result["engine"].append({"steps": steps, "decode": None, **dit[0]})
        for decoder in decoders:
            paths = attempt(f"{decoder} weights", lambda: weights(args.model, decoder, workdir, dtype))
            if paths is None:
                continue
            profile = steps == 1 and decoder == "taehv"
            row = attempt(f"engine steps={steps} DiT+{decoder}", lambda: engine_run(
                generation(args, steps, decoder, paths), parallel(args, decode=True), args.chunks, args.warmup,
                profile=profile))
            if row:
                result["engine"].append({"steps": steps, "decode": decoder, **row[0]})
                if row[2]:
                    with open(os.path.splitext(args.out)[0] + "_profile.txt", "w") as f:
                        f.write(row[2])
                    result["profile_table"] = row[2]
            svc = attempt(f"service steps={steps} {decoder}", lambda: service_run(args, steps, decoder, paths, workdir))
            if svc:
                engine_fps = row[0]["fps"] if row else None
                one = svc["one_stream"]
                result["service"].append({"steps": steps, "decode": decoder, **svc,
                                          # the service paces frames out at the fps asked for (early ones wait
                                          # until due): its overhead shows as delivered below requested
                                          "delivered_over_requested": one["delivered_fps"] / one["fps_requested"],
                                          "requested_over_engine": one["fps_requested"] / engine_fps
                                          if engine_fps else None})
    # (c) CUDA graphs on and off, DiT only, 1 step; the frames must agree
    runs = {g: attempt(f"graphs {g}", lambda: engine_run(generation(args, 1, "wan", {}), parallel(args, False, g),
                                                          args.chunks, args.warmup)) for g in ("off", "auto")}
    if all(runs.values()):
        diff = max((a - b).abs().max().item() for a, b in zip(runs["off"][1], runs["auto"][1]))
        result["graphs"] = {"off_fps": runs["off"][0]["fps"], "on_fps": runs["auto"][0]["fps"],
                            "on_over_off": runs["auto"][0]["fps"] / runs["off"][0]["fps"],
                            "replays": runs["auto"][0]["graph_replays"], "max_abs_latent_diff": diff}
    write_json(args.out, result)
    show(result)
    return result


def show(result: dict) -> None:
    print(f"\n{result['card']}, {result['model']} {result['dtype']}; StreamDiffusionV2 1xH100 (decode included): "
          f"{SDV2_H100[1]} FPS at 1 step, {SDV2_H100[4]} at 4")
    for r in result["engine"]:
        print(f"engine  steps={r['steps']} {r['decode'] or 'DiT only':>8}: {r['fps']:8.2f} FPS")
    for r in result["service"]:
        one, many = r["one_stream"], r["admitted_at_16fps"]
        print(f"service steps={r['steps']} {r['decode']:>8}: 1 stream {one['delivered_fps']:7.2f} FPS "
              f"(TTFF {one['ttff_p50_s']:.2f} s, latency p50/p99 {one['frame_latency_p50_s']:.2f}/"
              f"{one['frame_latency_p99_s']:.2f} s); {many['streams']} x 16 fps {many['delivered_fps']:7.2f} FPS "
              f"(late {many['late_ratio']:.1%}, p99 {many['frame_latency_p99_s']:.2f} s); "
              f"delivered/requested {r['delivered_over_requested']:.2f}, requested/engine "
              f"{r['requested_over_engine'] or float('nan'):.2f}")
    if result["graphs"]:
        g = result["graphs"]
        print(f"CUDA graphs: off {g['off_fps']:.2f} FPS, on {g['on_fps']:.2f} FPS (x{g['on_over_off']:.2f}, "
              f"{g['replays']} replays, max latent diff {g['max_abs_latent_diff']:.2e})")
    for e in result["errors"]:
        print(f"error: {e['what']}: {e['error']}")


if __name__ == "__main__":
    main()
