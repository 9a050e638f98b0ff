"""The ``streamgen`` command line.

* ``streamgen serve``: the service (local Ray unless ``--address``), gRPC on ``--listen``, /metrics.
* ``streamgen generate``: a client: one text-to-video stream into a video file, with a progress bar
  and a summary (frames, achieved fps, TTFF, latency percentiles, deadline misses).
* ``streamgen demo``: the embedded default end to end: starts the service (local Ray, the tiny model,
  2 stages), streams a real gRPC stream into ``out/demo.mp4``, prints the summary, shuts down.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import replace

from orchestrator.config import (AutoscalingConfig, CacheConfig, EngineConfig, GenerationConfig, SamplerConfig,
                                 ServerConfig, ServiceConfig, get_config)


class Progress:
    def __init__(self, label: str, total: int):
        self.label, self.total, self.start = label, total, time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last = -1

    def update(self, done: int) -> None:
        pct = int(100 * done / max(self.total, 1))
        if not self.tty and pct // 10 == self._last // 10 and done < self.total:
            return  # in a log: one line per 10%
        self._last = pct
        width = 30
        filled = int(width * done / max(self.total, 1))
        rate = done / max(time.monotonic() - self.start, 1e-9)
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} ({rate:.1f}/s)"
        sys.stderr.write(("\r" + line + ("\n" if done >= self.total else "")) if self.tty else line + "\n")
        sys.stderr.flush()


def service_config(args: argparse.Namespace) -> ServiceConfig:
    if getattr(args, "config", None):  # the file carries every knob (deploy/streamgen.yaml)
        from orchestrator.config import load_service_config

        return load_service_config(args.config)
    model = get_config(args.model)
    sampler = SamplerConfig(chunk_frames=args.chunk_frames, mode=args.mode)
    return ServiceConfig(
        generation=GenerationConfig(model=model, sampler=sampler, cache=CacheConfig(),
                                    model_path=args.checkpoint or "", text_encoder_path=args.text_encoder or "",
                                    vae_path=args.vae or ""),
        engine=EngineConfig(),
        server=ServerConfig(listen=args.listen, metrics_listen=args.metrics_listen,
                            reflection=args.reflection, max_streams_per_replica=args.max_streams,
                            drain_timeout_s=args.drain_timeout),
        stages=args.stages, replicas=args.replicas, executor=args.executor, ray_address=args.address or "",
        replica_host=args.replica_host,
        gpus_per_stage=args.gpus_per_stage, cpus_per_stage=args.cpus_per_stage,
        stage_call_timeout_s=args.stage_timeout,
        autoscaling=AutoscalingConfig(min_replicas=args.replicas, max_replicas=args.max_replicas)
        if args.max_replicas and args.max_replicas > args.replicas else None)


async def _serve(cfg: ServiceConfig) -> int:
    from orchestrator.app import Service

    service = await Service(cfg).start()
    host = cfg.server.listen.rsplit(":", 1)[0]
    ray = "in-process stages" if cfg.executor != "ray" else \
        f"joined Ray cluster {cfg.ray_address!r}" if cfg.ray_address else "local Ray on 127.0.0.1"
    print(f"streamgen serving on {host}:{service.port} (model {cfg.generation.model.num_layers}-block, "
          f"{cfg.stages} stages x {cfg.replicas} replicas, {ray}); metrics on {cfg.server.metrics_listen or 'off'}",
          flush=True)
    await service.serve_forever()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(_serve(service_config(args)))


async def _generate(target: str, args: argparse.Namespace) -> int:
    import grpc

    from orchestrator.client import StreamgenClient, StreamSummary, decode_frame
    from orchestrator.video import VideoWriter

    summary = StreamSummary()
    progress = Progress("receiving", args.frames)
    writer = None
    async with StreamgenClient(target) as client:
        call = client.generate(args.prompt, seed=args.seed, fps=args.fps, steps=args.steps, max_frames=args.frames)
        try:
            async for frame in call:
                summary.add(frame)
                image = decode_frame(frame)
                if writer is None:
                    writer = VideoWriter(args.out, args.fps or 16.0, frame.width, frame.height)
                writer.write(image)
                progress.update(summary.frames)
        except grpc.aio.AioRpcError as err:
            print(f"streamgen: stream ended: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        finally:
            if writer is not None:
                writer.close()
    print(f"wrote {args.out}: {summary.report()}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    return asyncio.run(_generate(args.target, args))


async def _demo(args: argparse.Namespace) -> int:
    from orchestrator.app import Service

    cfg = service_config(args)
    cfg = replace(cfg, server=replace(cfg.server, listen="127.0.0.1:0", metrics_listen=""))
    print(f"starting streamgen: local Ray, model {args.model}, {cfg.stages} stages ...", flush=True)
    started = time.monotonic()
    service = await Service(cfg).start()
    try:
        print(f"ready in {time.monotonic() - started:.1f} s on 127.0.0.1:{service.port}; streaming {args.frames} "
              f"frames at {args.fps:g} fps", flush=True)
        return await _generate(f"127.0.0.1:{service.port}", args)
    finally:
        await service.stop(drain_timeout=5.0)
        print("service stopped", flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(_demo(args))


def _service_flags(p: argparse.ArgumentParser, listen: str) -> None:
    p.add_argument("--config", help="a service config file (deploy/streamgen.yaml); its values replace the flags")
    p.add_argument("--listen", default=listen, help=f"gRPC HOST:PORT (default {listen})")
    p.add_argument("--metrics-listen", default="127.0.0.1:9464", help="/metrics HOST:PORT; empty = off")
    p.add_argument("--model", default="tiny", help="named model config (default: tiny)")
    p.add_argument("--stages", type=int, default=2, help="pipeline stages per replica (default: 2)")
    p.add_argument("--replicas", type=int, default=1, help="pipeline replicas (the minimum when autoscaling)")
    p.add_argument("--max-replicas", type=int, default=0,
                   help="autoscale between --replicas and this many replicas (0 = fixed --replicas)")
    p.add_argument("--executor", choices=("ray", "inprocess"), default="ray")
    p.add_argument("--replica-host", choices=("driver", "serve"), default="driver",
                   help="where replica engine loops run: orchestrator threads, or Ray Serve replicas")
    p.add_argument("--address", default="", help="Ray cluster to join ('auto' or an address); empty = local")
    p.add_argument("--mode", choices=("sequential", "stream_batch"), default="sequential")
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--max-streams", type=int, default=8, help="streams per replica at most")
    p.add_argument("--checkpoint", help="local DiT checkpoint (.pt / .safetensors)")
    p.add_argument("--text-encoder", help="local umT5 directory (real models)")
    p.add_argument("--vae", help="local Wan VAE directory (real models)")
    p.add_argument("--reflection", action="store_true", help="serve gRPC reflection")
    p.add_argument("--gpus-per-stage", type=float, default=0.0, help="GPUs each stage reserves (1 on GPUs)")
    p.add_argument("--cpus-per-stage", type=float, default=0.0, help="CPUs each stage reserves")
    p.add_argument("--stage-timeout", type=float, default=10.0, help="seconds before a silent stage counts as dead")
    p.add_argument("--drain-timeout", type=float, default=10.0,
                   help="on SIGTERM / Drain: seconds streams may run on before they end UNAVAILABLE")


def _stream_flags(p: argparse.ArgumentParser, out: str, frames: int) -> None:
    p.add_argument("--prompt", default="a red fox running through fresh snow, cinematic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=frames, help=f"frames to receive (default {frames})")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=0, help="denoising steps (0 = server default)")
    p.add_argument("--out", default=out, help=f"video file to write (default {out})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgen", description="Real-time video generation service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service")
    _service_flags(serve, "127.0.0.1:50051")
    serve.set_defaults(func=cmd_serve)
    gen = sub.add_parser("generate", help="stream a text-to-video stream into a video file")
    gen.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    _stream_flags(gen, "video.mp4", 48)
    gen.set_defaults(func=cmd_generate)
    demo = sub.add_parser("demo", help="start the service locally, stream into out/demo.mp4, stop")
    _service_flags(demo, "127.0.0.1:0")
    _stream_flags(demo, "out/demo.mp4", 48)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad configuration: say what, not a traceback
        print(f"streamgen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
