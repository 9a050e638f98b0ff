"""Service overhead: the same load through the in-process engine and through `streamgen serve` with real gRPC
clients, in one run (default: model `small`, P=2 Ray stages, 2 streams, `sequential`).

* engine: ``PipelineEngine`` on a ``RayExecutor`` built as the service builds its replica (same config object:
  the one the CLI makes from the same file), with its decode worker (VAE decode and the clients' encoding),
  2 streams, each chunk consumed as it comes. Measures encoded frames/s.
* service: ``streamgen serve --config FILE`` as a subprocess on 127.0.0.1, 2 concurrent clients
  (``orchestrator.client.StreamgenClient``), each receiving as many frames as one engine stream delivered.
  The service must run flat out, not at the requested fps: clients ask ``late_policy=deliver_flagged`` (a frame
  ready after its due time goes out at once instead of being dropped) at the highest fps the service's latency
  model admits (found with GetCapacity), which is above what one of two streams can get; the file raises
  ``server.admission_headroom`` so both such streams are admitted.

Both rates are frames/s over the steady-state window: from the moment every stream has delivered its
``--warmup`` first chunks (start-up, calibration and TTFF excluded) to the moment the first stream delivered its
last frame (both streams run in all of it). Engine and service runs alternate ``--repeats`` times (2 shared
cores are noisy); the medians count. Prints ``service/engine frames/s = <x>`` and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The project root in place of bench/ on sys.path: Ray puts a script directory that is on the driver's sys.path
# on every worker's, where bench/kernels.py would shadow the `kernels` distribution that transformers imports.
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]

from bench.common import host_cpu, start_serve, stop_serve, write_json  # noqa: E402

PROMPT = "a red fox running through fresh snow, cinematic"


@dataclass(slots=True)
class Delivery:
    """``frames`` frames of chunk ``chunk`` of stream ``stream`` reached the consumer at ``t`` (monotonic)."""

    t: float
    stream: int
    chunk: int
    frames: int


def steady_rate(deliveries: list[Delivery], streams: int, warmup: int) -> dict:
    """Frames/s over the window in which every stream is past its warm-up chunks and none has finished."""
    by_stream = [[d for d in deliveries if d.stream == s] for s in range(streams)]
    if any(not [d for d in got if d.chunk >= warmup] for got in by_stream):
        raise RuntimeError("a stream delivered nothing after its warm-up chunks")
    start = max(max(d.t for d in got if d.chunk < warmup) for got in by_stream)
    end = min(got[-1].t for got in by_stream)
    frames = sum(d.frames for d in deliveries if start < d.t <= end)
    if end <= start or frames == 0:
        raise RuntimeError("empty steady-state window: raise --chunks")
    return {"frames_per_s": frames / (end - start), "window_s": end - start, "window_frames": frames}


def write_config(path: str, args: argparse.Namespace) -> None:
    """The one service config both measurements use (YAML, `streamgen serve --config`)."""
    with open(path, "w") as f:
        f.write(f"""parallel:
  stages: {args.stages}
  backend: ray
  threads_per_stage: 1
replicas: 1
replica_host: driver
generation:
  model:
    name: {args.model}
  sampler:
    mode: sequential
    chunk_frames: {args.chunk_frames}
server:
  listen: 127.0.0.1:0
  metrics_listen: ""
  admission_headroom: {float(args.streams) * 2}
""")
        if args.probe_period is not None:  # diagnosis only: the service default probes every 5 s
            f.write(f"  probe_period_s: {args.probe_period}\n")


def load_config(path: str):
    """What `streamgen serve --config path` runs with (the CLI's own parsing)."""
    from orchestrator.cli import build_parser, service_config

    return service_config(build_parser().parse_args(["serve", "--config", path]))


# -- (a) the engine alone ----------------------------------------------------------------------------------

def run_engine(cfg, streams: int, chunks: int, warmup: int, encoding: str) -> dict:
    """The service's replica, built from the same config, driven directly: ``streams`` streams, each chunk
    consumed when it comes out (as the server does when it takes a chunk off the stream's queue)."""
    import ray

    from workers.batch import OutputFormat
    from workers.engine import PipelineEngine
    from workers.executor import build_executor
    from workers.ray_executor import start_local_ray

    gen = cfg.generation
    start_local_ray()  # as the service starts its local Ray
    try:
        executor = build_executor(gen, cfg.parallel)  # as the engine core builds its stages
        try:
            engine = PipelineEngine(gen, executor, cfg.engine)
            engine.calibrate()
            ids = [f"s{i}" for i in range(streams)]
            for i, sid in enumerate(ids):
                engine.add_stream(sid, PROMPT, i, cfg.server.default_fps,
                                  max_ahead=cfg.server.output_chunks_ahead, output=OutputFormat(encoding))
            deliveries: list[Delivery] = []

            def on_output(out):
                deliveries.append(Delivery(time.monotonic(), ids.index(out.stream_id), out.chunk, len(out.frames)))
                engine.consumed(out.stream_id)

            engine.run_chunks({sid: warmup + chunks for sid in ids}, on_output=on_output)
            engine.drain()
        finally:
            executor.shutdown()
    finally:
        ray.shutdown()
    frames_per_stream = [sum(d.frames for d in deliveries if d.stream == s) for s in range(streams)]
    return dict(steady_rate(deliveries, streams, warmup), frames_per_stream=frames_per_stream,
                predicted_frame_rate=engine.frame_rate())


# -- (b) the service ---------------------------------------------------------------------------------------

async def admitted_fps(client, max_fps: float) -> float:
    """The highest fps at which the service's latency model still admits one stream (GetCapacity)."""
    lo, hi = 0.0, max_fps
    if (await client.capacity(fps=hi)).streams_max >= 1:
        return hi
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (await client.capacity(fps=mid)).streams_max >= 1 else (lo, mid)
    return lo


async def drive_service(port: int, streams: int, frames_per_stream: list[int], encoding: str,
                        max_fps: float) -> dict:
    from orchestrator.client import StreamgenClient

    async with StreamgenClient(f"127.0.0.1:{port}") as client:
        fps = await admitted_fps(client, max_fps)
        if fps <= 0:
            raise RuntimeError("the service admits no stream at any fps")
        deliveries: list[Delivery] = []
        late = [0] * streams

        async def one(s: int) -> None:
            call = client.generate(PROMPT, seed=s, fps=fps, max_frames=frames_per_stream[s],
                                   late_policy="deliver_flagged", encoding=encoding)
            async for frame in call:
                deliveries.append(Delivery(time.monotonic(), s, frame.chunk, 1))
                late[s] += not frame.deadline_met

        await asyncio.gather(*(one(s) for s in range(streams)))
    return {"deliveries": deliveries, "fps_requested": fps, "frames_late": late}


def run_service(config_path: str, streams: int, frames_per_stream: list[int], warmup: int, encoding: str,
                max_fps: float, log_path: str) -> dict:
    proc, port, _ = start_serve(config_path, log_path)
    try:
        got = asyncio.run(drive_service(port, streams, frames_per_stream, encoding, max_fps))
    finally:
        stop_serve(proc)
    received = [sum(d.frames for d in got["deliveries"] if d.stream == s) for s in range(streams)]
    if received != frames_per_stream:
        raise RuntimeError(f"clients received {received} frames, asked for {frames_per_stream}")
    return dict(steady_rate(got["deliveries"], streams, warmup), frames_per_stream=received,
                fps_requested=got["fps_requested"], frames_late=got["frames_late"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/service_overhead.json")
    parser.add_argument("--model", default="small")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--chunk-frames", type=int, default=3, help="latent frames per chunk (the CLI default)")
    parser.add_argument("--chunks", type=int, default=8, help="measured chunks per stream (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="chunks per stream left out at the start")
    parser.add_argument("--repeats", type=int, default=2, help="engine / service runs, alternating; medians count")
    parser.add_argument("--encoding", choices=("jpeg", "raw_rgb"), default="jpeg", help="what the clients ask for")
    parser.add_argument("--probe-period", type=float, default=None,
                        help="diagnosis: the service's readiness-probe period (0 = off); default: the service's")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="streamgen-overhead-")
    config_path = os.path.join(workdir, "service.yaml")
    write_config(config_path, args)
    cfg = load_config(config_path)
    engine_runs, service_runs = [], []
    for rep in range(args.repeats):
        eng = run_engine(cfg, args.streams, args.chunks, args.warmup, args.encoding)
        engine_runs.append(eng)
        print(f"-- repeat {rep + 1}/{args.repeats}: engine {eng['frames_per_s']:.2f} frames/s", flush=True)
        svc = run_service(config_path, args.streams, eng["frames_per_stream"], args.warmup, args.encoding,
                          cfg.server.max_fps, os.path.join(workdir, f"serve-{rep}.log"))
        service_runs.append(svc)
        print(f"-- repeat {rep + 1}/{args.repeats}: service {svc['frames_per_s']:.2f} frames/s "
              f"(clients asked {svc['fps_requested']:.2f} fps each)", flush=True)
    engine_fps = statistics.median(r["frames_per_s"] for r in engine_runs)
    service_fps = statistics.median(r["frames_per_s"] for r in service_runs)
    ratio = service_fps / engine_fps
    fps_asked = min(r["fps_requested"] for r in service_runs)
    result = {
        "machine": {"python": platform.python_version(), "cpu": host_cpu(), "cpu_count": os.cpu_count()},
        "load": {"model": args.model, "stages": args.stages, "streams": args.streams, "mode": "sequential",
                 "chunk_frames": args.chunk_frames, "steps": cfg.generation.sampler.num_steps,
                 "warmup_chunks": args.warmup, "measured_chunks": args.chunks, "backend": cfg.parallel.backend,
                 "threads_per_stage": cfg.parallel.threads_per_stage, "encoding": args.encoding},
        "service_settings": {
            "config": open(config_path).read(),
            "client_fps": fps_asked,
            "client_fps_note": "the lowest over the repeats; each run's own is in service_runs (fps_requested), "
                               "about the service's predicted frame rate of its one replica",
            "client_late_policy": "deliver_flagged",
            "why": "fps = the highest the latency model admits (GetCapacity), so pacing never holds a frame back "
                   "while the engine is slower than that per stream; admission_headroom raised so both streams "
                   "at that fps are admitted; late frames are sent at once, not dropped",
            "paced_below_engine": fps_asked < engine_fps / args.streams,
            "probe_period_s": cfg.server.probe_period_s,
        },
        "window": "from the time every stream has delivered its warm-up chunks to the first stream's last frame",
        "engine_runs": engine_runs,
        "service_runs": service_runs,
        "engine_frames_per_s": engine_fps,
        "service_frames_per_s": service_fps,
        "service_over_engine": ratio,
        "service_over_engine_per_repeat": [s["frames_per_s"] / e["frames_per_s"]
                                           for e, s in zip(engine_runs, service_runs, strict=True)],
    }
    write_json(args.out, result)
    print(f"service/engine frames/s = {ratio:.3f}")
    return result


if __name__ == "__main__":
    main()
