"""The ``streamgen`` command line.

``streamgen demo`` runs the embedded default: the tiny model on CPU, written to an MP4. (Until the gRPC
orchestrator lands it drives the single-process reference generator directly.)
"""

from __future__ import annotations

import argparse
import sys
import time

from orchestrator.config import CacheConfig, GenerationConfig, SamplerConfig, get_config


def _progress(label: str):
    start = time.monotonic()

    def show(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        rate = done / max(time.monotonic() - start, 1e-9)
        line = f"{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} chunks ({rate:.1f} chunks/s)"
        if sys.stderr.isatty():  # redraw in place on a terminal, one line per update in a log
            sys.stderr.write("\r" + line + ("\n" if done >= total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return show


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from orchestrator.video import VideoWriter
    from workers.reference import ReferenceGenerator

    torch.set_num_threads(max(1, args.threads))
    cfg = GenerationConfig(model=get_config(args.model),
                           sampler=SamplerConfig(mode=args.mode, chunk_frames=args.chunk_frames),
                           cache=CacheConfig())
    gen = ReferenceGenerator(cfg)
    start = time.monotonic()
    frames = gen.generate(args.prompt, args.seed, args.chunks, progress=_progress("generating"))
    elapsed = time.monotonic() - start
    with VideoWriter(args.out, args.fps, cfg.width, cfg.height) as writer:
        writer.write_all(frames.numpy())
    print(f"wrote {args.out}: {frames.shape[0]} frames {cfg.width}x{cfg.height} at {args.fps:g} fps "
          f"(model {args.model}, mode {args.mode}); generated in {elapsed:.2f} s "
          f"= {frames.shape[0] / elapsed:.1f} frames/s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgen", description="Real-time video generation service")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate a short video with the tiny model on CPU")
    demo.add_argument("--out", default="demo.mp4", help="video file to write (default: demo.mp4)")
    demo.add_argument("--prompt", default="a red fox running through fresh snow, cinematic")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--chunks", type=int, default=8, help="chunks to generate (default: 8)")
    demo.add_argument("--chunk-frames", type=int, default=3, help="latent frames per chunk (default: 3)")
    demo.add_argument("--mode", choices=("sequential", "stream_batch"), default="sequential")
    demo.add_argument("--model", default="tiny", help="named model config (default: tiny)")
    demo.add_argument("--fps", type=float, default=16.0)
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad configuration: say what, not a traceback
        print(f"streamgen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
