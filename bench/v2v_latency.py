"""Video-to-video latency: capture-to-output latency (p50 / p99) and delivered frames/s through the real gRPC
service (`streamgen serve`, Ray, P=2 stages), for 1 and 2 concurrent Transform streams, models `tiny` and
`small`. Each client sends a synthetic clip at the stream's fps (a live source: each frame stamped as it is
sent) and measures, per restyled frame, its arrival minus its input's capture time. One line per case; JSON.

    python bench/v2v_latency.py --out bench/out/v2v_latency.json
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

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import host_cpu, percentile as pct, start_serve, stop_serve, write_json  # noqa: E402

CASES = {"tiny": 8.0, "small": 1.0}
"""Model -> the stream fps (small is ~20x the compute of tiny on these 2 cores: at 2 fps one stream got 1.3)."""


def clip(n: int, height: int, width: int) -> list[np.ndarray]:
    """A moving gradient with a bright square (uint8 [H, W, 3] frames)."""
    ys, xs = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(n):
        img = np.stack([(xs * 2 + 3 * i) % 256, ys * 2 % 256, np.full_like(xs, 100)], -1).astype(np.uint8)
        x0 = (4 * i) % max(1, width - 16)
        img[height // 3:height // 3 + 16, x0:x0 + 16] = 240
        frames.append(img)
    return frames


async def one_stream(target: str, frames: list[np.ndarray], fps: float, seed: int) -> dict:
    from orchestrator.client import StreamgenClient

    async with StreamgenClient(target) as client:
        call = client.transform(frames, "a watercolor painting", fps=fps, seed=seed, input_fps=fps,
                                latency_budget_ms=30_000, late_policy="deliver_flagged")
        latency, arrivals = [], []
        async for frame in call:
            now = time.time_ns()
            latency.append((now - frame.capture_unix_ns) / 1e9)
            arrivals.append(time.monotonic())
        trailers = dict(await call.trailing_metadata() or ())
    return {"latency": latency, "arrivals": arrivals, "trailers": trailers}


def run_case(model: str, streams: int, frames: int, workdir: str) -> dict:
    from workers.config import get_config

    cfg = get_config(model)
    fps = CASES[model]
    config = os.path.join(workdir, f"{model}.yaml")
    with open(config, "w") as f:
        f.write(f"generation:\n  model: {model}\n  sampler: {{chunk_frames: 1}}\nparallel:\n  stages: 2\n"
                f"  threads_per_stage: 1\nserver:\n  listen: 127.0.0.1:0\n  metrics_listen: 127.0.0.1:0\n"
                f"  admission_headroom: 1.0\n  probe_period_s: 0\n")
    proc, port, _ = start_serve(config, os.path.join(workdir, f"{model}-{streams}.log"))
    try:
        video = clip(frames, cfg.default_height, cfg.default_width)

        async def all_streams():
            return await asyncio.gather(*(one_stream(f"127.0.0.1:{port}", video, fps, s) for s in range(streams)))

        results = asyncio.run(all_streams())
    finally:
        stop_serve(proc)
    latency = [x for r in results for x in r["latency"][4:]]  # past the first chunks (start-up)
    per_stream_fps = [(len(r["arrivals"]) - 5) / (r["arrivals"][-1] - r["arrivals"][4]) for r in results
                      if len(r["arrivals"]) > 5]
    return {"model": model, "stages": 2, "streams": streams, "fps_requested": fps, "frames_sent": frames,
            "frames_received": [len(r["latency"]) for r in results],
            "delivered_fps_per_stream": per_stream_fps, "delivered_fps": sum(per_stream_fps),
            "latency_p50_s": pct(latency, 50), "latency_p99_s": pct(latency, 99),
            "input_outcomes": [{k: v for k, v in r["trailers"].items() if k.startswith("input-")} for r in results]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/v2v_latency.json")
    parser.add_argument("--frames", type=int, default=48, help="input frames per stream")
    parser.add_argument("--models", default="tiny,small")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="streamgen-v2v-")
    rows = []
    for model in args.models.split(","):
        for streams in (1, 2):
            try:
                row = run_case(model, streams, args.frames, workdir)
            except grpc.aio.AioRpcError as err:  # admission said no: a figure too (the case does not fit here)
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                rows.append({"model": model, "stages": 2, "streams": streams, "fps_requested": CASES[model],
                             "refused": err.details()})
                print(f"{model:>5} P=2 streams={streams} at {CASES[model]:g} fps: refused by admission "
                      f"({err.details()})", flush=True)
                continue
            rows.append(row)
            print(f"{model:>5} P=2 streams={streams} at {row['fps_requested']:g} fps: delivered "
                  f"{row['delivered_fps']:.2f} frames/s, capture-to-output p50 {row['latency_p50_s']:.2f} s "
                  f"p99 {row['latency_p99_s']:.2f} s", flush=True)
    write_json(args.out, {"machine": {"cpu": host_cpu(), "cpu_count": os.cpu_count()}, "cases": rows})
    return {"cases": rows}


if __name__ == "__main__":
    main()
