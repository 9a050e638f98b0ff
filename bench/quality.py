"""Quality of the demo model, judged by the quality detector (workers/demo/detect.py) on what the service streams.

1. Agreement: all 32 prompts x ``--seeds`` seeds, ``--frames`` frames each, through the real gRPC service
   (in-process ``Service``: local Ray, P=2 stage actors, the ``make demo`` path: JPEG frames at 16 fps,
   ``deliver_flagged`` so a late frame is not lost), once per sampler mode (sequential, stream_batch). Colour
   and direction agreement with the prompt, and visibility. Bar: >= 90% colour and direction per mode.
2. Prompt switch, through the same service: ``a red ball moving right`` switched to ``a blue ball moving left``
   when the client has received frame 48. Frames (by index, from 48) until the new colour and the new direction
   show, and frames after the bound that still show the old colour. Bar: the new colour within (P + 1) chunks
   + 8 frames and no old colour after that.
3. Long streams: ``--long-frames`` frames per stream for ``--long-streams`` prompts under each KV policy (sink,
   ema_sink, none), in the engine with P=2 (in-process stages: Ray is not what this measures). Visibility
   and agreement in the first and the last 100 frames. Bar (default policy, sink): last >= 90% of first.
4. A contact sheet (``--sheet``): 8 prompts x 6 frames of the sequential-mode streams (seed 0).

Also the detector on the ground-truth clips (the ceiling). Prints the tables and PASS / FAIL per bar, writes
JSON (``--out``), exits 1 if a bar fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The project root in place of bench/ on sys.path (bench/kernels.py would shadow the `kernels` distribution that
# transformers imports, in Ray's workers too).
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import write_json  # noqa: E402
from workers.demo.clips import Prompt, all_prompts, clip, parse_prompt, to_uint8  # noqa: E402
from workers.demo.detect import assess  # noqa: E402

STAGES = 2
FPS = 16.0
SWITCH = ("a red ball moving right", "a blue ball moving left", 48)
POLICIES = ("sink", "ema_sink", "none")
BAR = 0.9


def sheet_prompts() -> list[Prompt]:
    """8 prompts covering every colour, shape and direction."""
    return [p for i, p in enumerate(all_prompts()) if i % 4 == (i // 8 + i // 4) % 4][:8]


# -- the service --------------------------------------------------------------------------------------------

def service_config(mode: str, checkpoint: str):
    from orchestrator.config import (GenerationConfig, ParallelConfig, SamplerConfig, ServerConfig, ServiceConfig,
                                     get_config)

    gen = GenerationConfig(model=get_config("demo"), sampler=SamplerConfig(mode=mode), model_path=checkpoint,
                           use_ema=bool(checkpoint))
    server = ServerConfig(listen="127.0.0.1:0", metrics_listen="", admission_headroom=8.0, max_streams_per_replica=8,
                          no_output_timeout_s=120.0)
    return ServiceConfig(generation=gen, parallel=ParallelConfig(stages=STAGES, backend="ray"), server=server)


async def one_stream(client, prompt: str, seed: int, frames: int, switch: tuple[int, str] | None = None) -> dict:
    """Receive ``frames`` frames of one stream (retrying while the service is full); with ``switch`` = (n, new
    prompt), send that prompt change once n frames have arrived."""
    import grpc

    from orchestrator.client import decode_frame

    while True:
        images, indices, revisions = [], [], []
        call = client.generate(prompt, seed=seed, fps=FPS, max_frames=frames, late_policy="deliver_flagged")
        try:
            async for f in call:
                images.append(decode_frame(f))
                indices.append(f.index)
                revisions.append(f.prompt_revision)
                if switch and len(images) == switch[0]:
                    await client.control(f.stream_id, prompt=switch[1])
            return {"frames": np.stack(images), "indices": indices, "revisions": revisions}
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or images:
                raise
            await asyncio.sleep(0.5)


async def run_service(mode: str, args) -> dict:
    """Section 1 (and, for the sequential mode, section 2) on a fresh service of ``mode``."""
    from orchestrator.app import Service
    from orchestrator.client import StreamgenClient

    service = await Service(service_config(mode, args.checkpoint)).start()
    try:
        target = f"127.0.0.1:{service.port}"
        jobs = [(p, s) for p in all_prompts() for s in range(args.seeds)]
        gate = asyncio.Semaphore(args.concurrency)
        done, started = [0], time.monotonic()

        async def run(p: Prompt, seed: int) -> dict:
            async with gate:
                async with StreamgenClient(target) as client:
                    got = await one_stream(client, p.text, seed, args.frames)
            q = assess(torch.from_numpy(got["frames"]))
            done[0] += 1
            if done[0] % 8 == 0 or done[0] == len(jobs):
                print(f"  {mode}: {done[0]}/{len(jobs)} streams ({time.monotonic() - started:.0f} s)", flush=True)
            return {"prompt": p.text, "seed": seed, "frames": got["frames"], "colour": q.colour,
                    "direction": q.direction, "visibility": q.visibility,
                    "colour_ok": q.colour == p.colour, "direction_ok": q.direction == p.direction}

        streams = await asyncio.gather(*(run(p, s) for p, s in jobs))
        switches = []
        for seed in range(args.seeds):
            async with StreamgenClient(target) as client:
                got = await one_stream(client, SWITCH[0], seed, SWITCH[2] + args.switch_tail,
                                       switch=(SWITCH[2], SWITCH[1]))
            switches.append(switch_figures(got, service.cfg, seed))
        return {"streams": streams, "switches": switches}
    finally:
        await service.stop(drain_timeout=5.0)


def switch_figures(got: dict, cfg, seed: int) -> dict:
    """Frames from the switch (frame ``SWITCH[2]``) until the new colour / direction show, against the bound."""
    old, new, at = parse_prompt(SWITCH[0]), parse_prompt(SWITCH[1]), SWITCH[2]
    video = torch.from_numpy(got["frames"])
    per_frame = assess(video).per_frame
    chunk_video_frames = cfg.generation.model.vae_stride[0] * cfg.generation.sampler.chunk_frames
    bound = (cfg.parallel.stages + 1) * chunk_video_frames + 8
    indices = got["indices"]
    after = [(i, o) for i, o in zip(indices, per_frame) if i >= at]
    colour_at = next((i for i, o in after if o.colour == new.colour), None)
    old_late = [i for i, o in after if i >= at + bound and o.colour == old.colour]
    direction_at = None
    window = 8  # the direction over the next 8 frames, read by the same detector
    for k in range(len(indices)):
        if indices[k] < at:
            continue
        if assess(video[k:k + window]).direction == new.direction:
            direction_at = indices[k]
            break
    return {"seed": seed, "bound_frames": bound, "frames_to_new_colour": None if colour_at is None else colour_at - at,
            "frames_to_new_direction": None if direction_at is None else direction_at - at,
            "old_colour_frames_after_bound": len(old_late), "frames_after_switch": len(after),
            "stale_indices_skipped": max(0, (indices[-1] - indices[0] + 1) - len(indices)),
            "pass": colour_at is not None and colour_at - at <= bound and not old_late}


# -- long streams (the engine, P=2, in-process stages) -------------------------------------------------------

def long_streams(policy: str, args) -> dict:
    from workers.batch import OutputFormat
    from workers.config import CacheConfig, GenerationConfig, ParallelConfig, get_config
    from workers.engine import PipelineEngine
    from workers.executor import build_executor

    cache = CacheConfig(policy=policy, recache_frames=6 if policy == "none" else 9)  # none: no sink, 6 frames
    gen = GenerationConfig(model=get_config("demo"), cache=cache, model_path=args.checkpoint,
                           use_ema=bool(args.checkpoint))
    executor = build_executor(gen, ParallelConfig(stages=STAGES, backend="local"))
    engine = PipelineEngine(gen, executor)
    prompts = [all_prompts()[(5 * k) % 32] for k in range(args.long_streams)]  # stride 5: every direction
    for i, p in enumerate(prompts):
        engine.add_stream(f"s{i}", p.text, 1000 + i, output=OutputFormat("raw_rgb"))
    per_chunk = gen.model.vae_stride[0] * gen.sampler.chunk_frames
    chunks = -(-(args.long_frames + gen.model.vae_stride[0] - 1) // per_chunk)
    started = time.monotonic()
    got = engine.run_chunks({f"s{i}": chunks for i in range(len(prompts))})
    executor.shutdown()
    rows = []
    for i, p in enumerate(prompts):
        video = torch.cat([torch.frombuffer(bytearray(b"".join(o.frames)), dtype=torch.uint8).view(-1, o.height, o.width, 3)
                           for o in got[f"s{i}"]])[:args.long_frames]
        first, last = assess(video[:100]), assess(video[-100:])
        rows.append({"prompt": p.text, "frames": len(video),
                     "first": {"visibility": first.visibility, "colour_ok": first.colour == p.colour,
                               "direction_ok": first.direction == p.direction},
                     "last": {"visibility": last.visibility, "colour_ok": last.colour == p.colour,
                              "direction_ok": last.direction == p.direction}})
    summary = {}
    for part in ("first", "last"):
        summary[part] = {k: sum(float(r[part][k]) for r in rows) / len(rows)
                         for k in ("visibility", "colour_ok", "direction_ok")}
    summary["ratio"] = {k: summary["last"][k] / summary["first"][k] if summary["first"][k] else float("nan")
                        for k in summary["first"]}
    print(f"  long streams, policy {policy}: {len(prompts)} x {args.long_frames} frames in "
          f"{time.monotonic() - started:.0f} s", flush=True)
    return {"policy": policy, "streams": rows, **summary}


# -- output ---------------------------------------------------------------------------------------------------

def contact_sheet(streams: list[dict], path: str) -> None:
    from PIL import Image, ImageDraw

    by_prompt = {s["prompt"]: s["frames"] for s in streams if s["seed"] == 0}
    picks, scale, label_w = [0, 8, 16, 24, 32, 40], 2, 200
    cell = 64 * scale
    rows = sheet_prompts()
    sheet = Image.new("RGB", (label_w + len(picks) * cell, len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, p in enumerate(rows):
        draw.text((8, r * cell + cell // 2 - 6), p.text, fill=(0, 0, 0))
        for c, k in enumerate(picks):
            img = Image.fromarray(by_prompt[p.text][k]).resize((cell, cell), Image.NEAREST)
            sheet.paste(img, (label_w + c * cell, r * cell))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    print(f"wrote {path} (frames {picks} of 8 prompts, sequential mode, seed 0)")


def agreement(streams: list[dict]) -> dict:
    n = len(streams)
    return {"streams": n, "colour": sum(s["colour_ok"] for s in streams) / n,
            "direction": sum(s["direction_ok"] for s in streams) / n,
            "visibility": sum(s["visibility"] for s in streams) / n}


def ceiling(seeds: int, frames: int) -> dict:
    """The detector on the ground-truth clips of the same prompts and seeds."""
    rows = []
    for p in all_prompts():
        for s in range(seeds):
            q = assess(to_uint8(clip(p, s, frames)))
            rows.append({"colour_ok": q.colour == p.colour, "direction_ok": q.direction == p.direction,
                         "visibility": q.visibility})
    return agreement(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/out/quality.json")
    parser.add_argument("--sheet", default="docs/demo_contact_sheet.png")
    parser.add_argument("--checkpoint", default="", help="a demo checkpoint to judge (default: the shipped one)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=4, help="streams open at once on the service")
    parser.add_argument("--switch-tail", type=int, default=72, help="frames received after the switch")
    parser.add_argument("--long-frames", type=int, default=600)
    parser.add_argument("--long-streams", type=int, default=16, help="prompts per KV policy (at most 32)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from workers.ray_executor import start_local_ray

    started = time.monotonic()
    results: dict = {"config": vars(args), "ceiling": ceiling(args.seeds, args.frames), "modes": {},
                     "switch": {}, "long": {}}
    start_local_ray()
    import ray

    try:
        sheet_streams = None
        for mode in ("sequential", "stream_batch"):
            got = asyncio.run(run_service(mode, args))
            results["modes"][mode] = {**agreement(got["streams"]),
                                      "per_stream": [{k: v for k, v in s.items() if k != "frames"}
                                                     for s in got["streams"]]}
            results["switch"][mode] = got["switches"]
            if mode == "sequential":
                sheet_streams = got["streams"]
    finally:
        ray.shutdown()
    for policy in POLICIES:
        results["long"][policy] = long_streams(policy, args)
    contact_sheet(sheet_streams, args.sheet)
    results["seconds"] = time.monotonic() - started

    bars = report(results, args)
    results["bars"] = bars
    write_json(args.out, results)
    return 0 if all(b["pass"] for b in bars) else 1


def report(results: dict, args) -> list[dict]:
    bars = []
    c = results["ceiling"]
    print(f"\nceiling (detector on the ground-truth clips): colour {c['colour']:.0%}  direction {c['direction']:.0%}  "
          f"visibility {c['visibility']:.0%}")
    print(f"\nagreement over {32 * args.seeds} streams x {args.frames} frames, gRPC service, P={STAGES}:")
    print(f"  {'mode':<13} {'colour':>7} {'direction':>10} {'visibility':>11}")
    for mode, r in results["modes"].items():
        print(f"  {mode:<13} {r['colour']:>7.1%} {r['direction']:>10.1%} {r['visibility']:>11.1%}")
        for key in ("colour", "direction"):
            bars.append({"bar": f"{mode} {key} agreement >= {BAR:.0%}", "value": r[key], "pass": r[key] >= BAR})
    print(f"\nlong streams ({args.long_frames} frames, {args.long_streams} prompts): first 100 -> last 100 frames")
    print(f"  {'policy':<9} {'visibility':>21} {'colour':>21} {'direction':>21}")
    for policy, r in results["long"].items():
        cells = [f"{r['first'][k]:.0%} -> {r['last'][k]:.0%} ({r['ratio'][k]:.2f})"
                 for k in ("visibility", "colour_ok", "direction_ok")]
        print(f"  {policy:<9} {cells[0]:>21} {cells[1]:>21} {cells[2]:>21}")
    sink = results["long"]["sink"]["ratio"]
    for k in ("visibility", "colour_ok", "direction_ok"):
        bars.append({"bar": f"sink: last-100 {k} >= 90% of first-100", "value": sink[k], "pass": sink[k] >= BAR})
    print(f"\nprompt switch {SWITCH[0]!r} -> {SWITCH[1]!r} at frame {SWITCH[2]} (frames after it):")
    for mode, rows in results["switch"].items():
        for r in rows:
            print(f"  {mode:<13} seed {r['seed']}: new colour after {r['frames_to_new_colour']}, new direction after "
                  f"{r['frames_to_new_direction']} (bound {r['bound_frames']}); old colour after the bound: "
                  f"{r['old_colour_frames_after_bound']} frames")
            bars.append({"bar": f"{mode} seed {r['seed']}: switch within {r['bound_frames']} frames, no old colour "
                                "after", "value": r["frames_to_new_colour"], "pass": r["pass"]})
    print()
    for b in bars:
        print(f"  {'PASS' if b['pass'] else 'FAIL'}  {b['bar']}  ({b['value']})")
    print(f"\n{results['seconds']:.0f} s")
    return bars


if __name__ == "__main__":
    sys.exit(main())
