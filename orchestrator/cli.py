"""The ``streamgen`` command line.

* ``streamgen serve``: the service (local Ray unless ``--address``), gRPC on ``--listen``, /metrics.
* ``streamgen generate``: a client: one text-to-video stream into a video file, with a progress bar
  and a summary (frames, achieved fps, TTFF, latency percentiles, deadline misses).
* ``streamgen health``: exit 0 when a server answers SERVING (Docker HEALTHCHECK, scripts).
* ``streamgen transform``: a client: a video file through a video-to-video stream into a restyled file.
* ``streamgen demo-v2v``: starts the service, restyles a test clip it makes (``out/input.mp4``), stops.
* ``streamgen plan``: the capacity planner: per GPU count, the best layout and the streams it serves, from a
  cost profile through the simulator (``workers.planner``).
* ``streamgen demo``: the embedded default end to end: starts the service (local Ray, the demo model,
  2 stages), streams a real gRPC stream into ``out/demo.mp4``, prints the summary, shuts down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import logging
import os
import sys
import time
import types
from dataclasses import replace
from typing import Any, Literal, Union, get_args, get_origin

from orchestrator.config import MODEL_CONFIGS, ServiceConfig, read_config_file, service_config_from

# Each `serve` / `demo` flag sets the ServiceConfig field at its dotted path. Its type, choices and help
# (the field's docstring) come from that field, its default is None ("not given"), so flags and config
# cannot drift: the config's defaults are the only ones. A path that names no field fails at start-up.
SERVICE_FLAGS: dict[str, str] = {
    "listen": "server.listen",
    "metrics-listen": "server.metrics_listen",
    "reflection": "server.reflection",
    "tls-cert": "server.tls_cert",
    "tls-key": "server.tls_key",
    "tls-client-ca": "server.tls_client_ca",
    "auth-tokens": "server.auth_tokens",
    "health-listen": "server.health_listen",
    "web-listen": "server.web_listen",
    "max-streams": "server.max_streams_per_replica",
    "drain-timeout": "server.drain_timeout_s",
    "model": "generation.model",
    "checkpoint": "generation.model_path",
    "text-encoder": "generation.text_encoder_path",
    "vae": "generation.vae_path",
    "vae-decoder": "generation.model.vae_decoder",
    "taehv": "generation.taehv_path",
    "mode": "generation.sampler.mode",
    "chunk-frames": "generation.sampler.chunk_frames",
    "stages": "parallel.stages",
    "backend": "parallel.backend",
    "device": "parallel.device",
    "dtype": "parallel.dtype",
    "decode": "parallel.decode",
    "decode-workers": "parallel.decode_workers",
    "cuda-graphs": "parallel.cuda_graphs",
    "gpu-memory-gib": "parallel.gpu_memory_gib",
    "gpus-per-stage": "parallel.gpus_per_stage",
    "cpus-per-stage": "parallel.cpus_per_stage",
    "stage-timeout": "parallel.stage_call_timeout_s",
    "replicas": "replicas",
    "max-replicas": "autoscaling.max_replicas",
    "replica-host": "replica_host",
    "address": "ray_address",
}
DEMO_PROMPT = "a red ball moving right"
"""The default prompt: in the demo model's vocabulary (workers/demo/clips.py)."""
FLAG_NOTES = {
    "replicas": "with autoscaling, sets its min_replicas",
    "max-replicas": "autoscale between --replicas and this many; 0: a fixed fleet",
}


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> X and ``Annotated[X, ...]`` -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    while hasattr(annotation, "__metadata__"):
        annotation = get_args(annotation)[0]
    return annotation


def config_field(path: str):
    """(field info, default value or None) of the ServiceConfig field at a dotted path; KeyError if none."""
    cls, default = ServiceConfig, ServiceConfig()
    for name in path.split("."):
        fields = getattr(cls, "__pydantic_fields__", None)
        if not fields or name not in fields:
            raise KeyError(f"{path!r} names no ServiceConfig field")
        info = fields[name]
        default = getattr(default, name, None)
        cls = _unwrap(info.annotation)
    return info, default


def _shown(default: Any) -> str:
    if hasattr(default, "num_layers"):  # a model config: show its name
        return next((name for name, cfg in MODEL_CONFIGS.items() if cfg == default), "custom")
    return "not set" if default is None else repr(default) if default == "" else str(default)


def add_service_flags(p: argparse.ArgumentParser) -> None:
    for flag, path in SERVICE_FLAGS.items():
        info, default = config_field(path)
        kind = _unwrap(info.annotation)
        help_text = info.description.rstrip(".")
        if flag in FLAG_NOTES:
            help_text += f"; {FLAG_NOTES[flag]}"
        help_text = f"{help_text} (default: {_shown(default)}; config {path})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": path, "default": None, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            kwargs["choices"] = get_args(kind)
        else:
            kwargs["type"] = kind if kind in (int, float) else str
            kwargs["metavar"] = flag.replace("-", "_").upper()
        p.add_argument(f"--{flag}", **kwargs)


def _put(data: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        if name == "model" and not isinstance(data.get(name), dict):  # a model field: keep (or name) the model
            default = next(n for n, c in MODEL_CONFIGS.items() if c == ServiceConfig().generation.model)
            data[name] = {"name": data.get(name) or default}
        elif not isinstance(data.get(name), dict):
            data[name] = {}
        data = data[name]
    if path == "generation.model" and isinstance(data.get(leaf), dict):
        data[leaf] = {**data[leaf], "name": value}  # the file's field overrides stay, on the named model
    else:
        data[leaf] = value


def apply_flags(data: dict, given: dict[str, Any]) -> dict:
    """A copy of a config mapping with each given ``{dotted path: value}`` laid over it."""
    data = copy.deepcopy(data)
    for path, value in given.items():
        if path != "autoscaling.max_replicas":
            _put(data, path, value)
    if "autoscaling.max_replicas" in given:
        if given["autoscaling.max_replicas"] == 0:
            data["autoscaling"] = None
        else:
            _put(data, "autoscaling.max_replicas", given["autoscaling.max_replicas"])
            data["autoscaling"].setdefault("min_replicas", data.get("replicas", ServiceConfig().replicas))
    if "replicas" in given and isinstance(data.get("autoscaling"), dict):
        data["autoscaling"]["min_replicas"] = given["replicas"]
    return data


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
    """The root from ``--config FILE`` (if given) with every explicitly given flag laid over it."""
    data = read_config_file(args.config) if args.config else {}
    given = {path: getattr(args, path) for path in SERVICE_FLAGS.values() if getattr(args, path) is not None}
    where = "command line" if not args.config else f"{args.config} with command-line flags" if given \
        else args.config
    return service_config_from(apply_flags(data, given), where)


def host_of(listen: str) -> str:
    return listen.rsplit(":", 1)[0]


async def _serve(cfg: ServiceConfig) -> int:
    from orchestrator.app import Service

    service = await Service(cfg).start()
    host = host_of(cfg.server.listen)
    ray = "in-process stages, no Ray" if cfg.parallel.backend != "ray" else \
        f"joined Ray cluster {cfg.ray_address!r}" if cfg.ray_address else "local Ray on 127.0.0.1"
    print(f"streamgen serving on {host}:{service.port} (model {cfg.generation.model.num_layers}-block, "
          f"{cfg.parallel.stages} stages x {cfg.replicas} replicas, {ray}); metrics on "
          f"{host_of(cfg.server.metrics_listen) + ':' + str(service.metrics_port) if service.metrics_port else 'off'}; "
          f"{service.security.describe()}", flush=True)
    if service.web is not None:
        print(f"browser page on {service.web.address}", flush=True)
    await service.serve_forever()
    return 0


def dry_run(cfg: ServiceConfig) -> int:
    """Print each replica's device map (which piece sits on which GPU slot, its memory) and check it."""
    from workers.executor import replica_device_map

    dmap = replica_device_map(cfg.generation, cfg.parallel)
    p = cfg.parallel
    print(f"each of {cfg.replicas} replica(s): {p.stages} stages, {p.decode_workers} decode worker(s) ({p.decode}), "
          f"backend {p.backend}, {p.dtype}, {p.gpu_slots} GPU slot(s)")
    print(dmap.describe())
    dmap.check()  # raises ValueError naming the piece that does not fit
    print("the plan fits")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = service_config(args)
    if args.dry_run:
        return dry_run(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(_serve(cfg))


async def _generate(target: str, args: argparse.Namespace) -> int:
    import grpc

    from orchestrator.client import StreamgenClient, StreamSummary, decode_frame
    from orchestrator.video import VideoWriter

    summary = StreamSummary()
    progress = Progress("receiving", args.frames)
    writer = None
    async with StreamgenClient(connection_from_args(args, target)) as client:
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


async def _health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with connection_from_args(args).channel() as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                                timeout=args.timeout)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_health(args: argparse.Namespace) -> int:
    import grpc

    try:
        return asyncio.run(_health(args))
    except grpc.aio.AioRpcError as err:
        print(f"streamgen: health: {err.code().name}", file=sys.stderr)
        return 1


INPUT_OUTCOMES = ("accepted", "dropped_backlog", "dropped_invalid", "dropped_order", "filtered_similar")


async def _transform(target: str, args: argparse.Namespace) -> int:
    """Stream a video file through Transform at its own frame rate (or --fps) and write the restyled video."""
    import grpc
    import numpy as np

    from orchestrator.client import StreamgenClient, decode_frame
    from orchestrator.video import VideoWriter, iter_video, video_frames, video_rate

    fps = args.fps or video_rate(args.input) or 16.0
    progress = Progress("restyling", video_frames(args.input) or 1)
    sent = [0]

    def frames():
        for image, _ in iter_video(args.input):
            sent[0] += 1
            yield image

    received, latency_ms, writer = 0, [], None
    trailers: dict[str, str] = {}
    async with StreamgenClient(connection_from_args(args, target)) as client:
        call = client.transform(frames(), args.prompt, fps=fps, seed=args.seed, steps=args.steps,
                                noise_scale=args.noise_scale, motion_aware=not args.no_motion,
                                similarity_threshold=args.similarity, input_fps=fps)
        try:
            async for frame in call:
                image = decode_frame(frame)
                if writer is None:
                    writer = VideoWriter(args.out, fps, frame.width, frame.height)
                writer.write(image)
                received += 1
                latency_ms.append((time.time_ns() - frame.capture_unix_ns) / 1e6)
                progress.update(min(received, progress.total))
            trailers = dict(await call.trailing_metadata() or ())
        except grpc.aio.AioRpcError as err:
            print(f"streamgen: stream ended: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        finally:
            if writer is not None:
                writer.close()
    counts = {k: trailers.get("input-" + k.replace("_", "-"), "0") for k in INPUT_OUTCOMES}
    dropped = ", ".join(f"{k} {counts[k]}" for k in INPUT_OUTCOMES[1:])
    p50, p99 = (np.percentile(latency_ms, q) if latency_ms else float("nan") for q in (50, 99))
    print(f"wrote {args.out}: frames in {sent[0]}, out {received}; input accepted "
          f"{counts['accepted']}, {dropped}; latency from capture p50 {p50:.0f} ms / p99 {p99:.0f} ms")
    return 0


def cmd_transform(args: argparse.Namespace) -> int:
    if not os.path.exists(args.input):
        print(f"streamgen: error: no such input video {args.input!r}", file=sys.stderr)
        return 2
    return asyncio.run(_transform(args.target, args))


def demo_config(args: argparse.Namespace) -> ServiceConfig:
    """A demo's service: open, plaintext, on loopback whatever the flags say (its own client is its only caller)."""
    cfg = service_config(args)
    return replace(cfg, server=replace(cfg.server, listen="127.0.0.1:0", metrics_listen="", health_listen="",
                                       tls_cert="", tls_key="", tls_client_ca="", auth_tokens=""))


@contextlib.asynccontextmanager
async def _local_service(cfg: ServiceConfig):
    """The demos' own service: started with progress lines, stopped (drained) on the way out."""
    from orchestrator.app import Service

    where = "local Ray" if cfg.parallel.backend == "ray" else "in-process stages"
    print(f"starting streamgen: {where}, a {cfg.generation.model.num_layers}-block model, "
          f"{cfg.parallel.stages} stages ...", flush=True)
    started = time.monotonic()
    service = await Service(cfg).start()
    try:
        print(f"ready in {time.monotonic() - started:.1f} s on 127.0.0.1:{service.port}", flush=True)
        if service.web is not None:  # `streamgen demo --web-listen 127.0.0.1:8080`: watch while it runs
            print(f"browser page on {service.web.address}", flush=True)
        yield service
    finally:
        await service.stop(drain_timeout=5.0)
        print("service stopped", flush=True)


async def _demo(args: argparse.Namespace) -> int:
    async with _local_service(demo_config(args)) as service:
        print(f"streaming {args.frames} frames at {args.fps:g} fps", flush=True)
        return await _generate(f"127.0.0.1:{service.port}", args)


def cmd_demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(_demo(args))


async def _demo_v2v(args: argparse.Namespace) -> int:
    from orchestrator.video import synthetic_clip

    cfg = demo_config(args)
    if not os.path.exists(args.input):
        m = cfg.generation
        print(f"making a {args.clip_frames}-frame test clip at {args.fps:g} fps: {args.input}", flush=True)
        synthetic_clip(args.input, args.clip_frames, args.fps, m.width, m.height)
    async with _local_service(cfg) as service:
        print(f"restyling {args.input} at {args.fps:g} fps", flush=True)
        return await _transform(f"127.0.0.1:{service.port}", args)


def cmd_demo_v2v(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(_demo_v2v(args))


def _transform_flags(p: argparse.ArgumentParser, inp: str | None, out: str) -> None:
    p.add_argument("--in", dest="input", required=inp is None, default=inp, help="input video file (PyAV reads it)")
    p.add_argument("--out", default=out, help=f"restyled video to write (default {out})")
    p.add_argument("--prompt", default="a watercolor painting, soft pastel colours")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=0.0, help="send at this rate (default: the file's own frame rate)")
    p.add_argument("--steps", type=int, default=0, help="denoising steps (0 = server default)")
    p.add_argument("--noise-scale", type=float, default=0.0, help="s_init in (0, 1] (0 = server default 0.7)")
    p.add_argument("--no-motion", action="store_true", help="a fixed noise scale (no motion-aware controller)")
    p.add_argument("--similarity", type=float, default=0.0, help="similarity filter threshold (0 = off)")


def _service_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a service config file (deploy/streamgen.yaml); flags given as well override "
                                    "its values")
    add_service_flags(p)


def _stream_flags(p: argparse.ArgumentParser, out: str, frames: int) -> None:
    p.add_argument("--prompt", default=DEMO_PROMPT, help=f"the prompt (default {DEMO_PROMPT!r}; the demo model knows "
                                                       "'a COLOUR SHAPE moving DIRECTION': red|green|blue|yellow, "
                                                       "ball|square, left|right|up|down)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=frames, help=f"frames to receive (default {frames})")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=0, help="denoising steps (0 = server default)")
    p.add_argument("--out", default=out, help=f"video file to write (default {out})")


def add_connection_flags(p: argparse.ArgumentParser, target: str = "127.0.0.1:50051") -> None:
    """--target and how to reach it (TLS, client certificate, token): every client subcommand takes these."""
    p.add_argument("--target", default=target, help=f"server HOST:PORT (default {target})")
    p.add_argument("--tls-ca", metavar="FILE", help="PEM CA bundle that signed the server's certificate: use TLS")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate, for a server with mutual TLS")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--token", help="bearer token (default: $STREAMGEN_TOKEN; the environment keeps it out of the "
                                   "process list)")


def connection_from_args(args: argparse.Namespace, target: str | None = None):
    """The Connection that ``add_connection_flags``' flags describe (the token from $STREAMGEN_TOKEN unless
    --token is given)."""
    from orchestrator.client import Connection

    token = None
    if hasattr(args, "token"):  # a subcommand with connection flags (the demo has none: its server is open)
        token = args.token or os.environ.get("STREAMGEN_TOKEN") or None
    return Connection(target or args.target, getattr(args, "tls_ca", None), getattr(args, "tls_cert", None),
                      getattr(args, "tls_key", None), token)


def cmd_plan(args: argparse.Namespace) -> int:
    from workers.costs import load_profile
    from workers.planner import PlanConfig, plan, plot, table, to_json, write_json

    try:
        gpus = tuple(int(g) for g in args.gpus.split(","))
    except ValueError:
        raise ValueError(f"--gpus must be comma-separated integers, got {args.gpus!r}") from None
    profile = load_profile(args.profile)
    cfg = PlanConfig(model=args.model, gpus=gpus, fps=args.fps, height=args.height, width=args.width,
                     steps=args.steps, chunk_frames=args.chunk_frames, mode=args.mode, decode=args.decode,
                     budget_ms=args.budget_ms, policy=args.policy, max_gpus_per_replica=args.max_gpus_per_replica,
                     duration_s=args.duration, noise=args.noise)
    rows = plan(cfg, profile)
    print(f"{cfg.model} {cfg.height}x{cfg.width}, {cfg.steps} step(s), {cfg.mode}, policy {cfg.policy}, "
          f"profile {profile.name} ({profile.device}); streams at {cfg.fps:g} fps")
    print(table(rows, cfg))
    if args.json:
        write_json(args.json, to_json(rows, cfg, profile))
    if args.plot:
        series = {f"{cfg.policy} policy (simulated)": rows}
        if cfg.policy == "streamgen":  # StreamDiffusionV2's layout on the same profile, beside its published points
            layers = MODEL_CONFIGS[cfg.model].num_layers
            sd = replace(cfg, policy="sdv2", gpus=tuple(g for g in cfg.gpus if g <= layers))
            series["sdv2 policy (simulated)"] = plan(sd, profile)
        plot(args.plot, series, cfg.fps, f"{cfg.model} {cfg.height}x{cfg.width}, {cfg.steps} step(s), "
                                         f"profile {profile.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgen", description="Real-time video generation service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service")
    _service_flags(serve)
    serve.add_argument("--dry-run", action="store_true",
                       help="print each replica's device map (pieces per GPU slot, memory) and exit")
    serve.set_defaults(func=cmd_serve)
    gen = sub.add_parser("generate", help="stream a text-to-video stream into a video file")
    add_connection_flags(gen)
    _stream_flags(gen, "video.mp4", 48)
    gen.set_defaults(func=cmd_generate)
    tr = sub.add_parser("transform", help="restyle a video file through a video-to-video stream")
    add_connection_flags(tr)
    _transform_flags(tr, None, "restyled.mp4")
    tr.set_defaults(func=cmd_transform)
    check = sub.add_parser("health", help="exit 0 if the server answers SERVING (grpc.health.v1)")
    add_connection_flags(check)
    check.add_argument("--service", default="", help="health service name ('' liveness, streamgen.v1.StreamService "
                                                     "readiness)")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    check.set_defaults(func=cmd_health)
    pl = sub.add_parser("plan", help="capacity plan: streams, FPS and latency per GPU count, from a cost profile")
    pl.add_argument("--profile", required=True, help="cost profile JSON (profiles/*.json)")
    pl.add_argument("--model", default="wan2.1-1.3b", help="named model config")
    pl.add_argument("--gpus", default="1,2,4,8,16", help="GPU counts, comma-separated")
    pl.add_argument("--fps", type=float, default=16.0, help="video frames/s per stream")
    pl.add_argument("--height", type=int, default=480)
    pl.add_argument("--width", type=int, default=832)
    pl.add_argument("--steps", type=int, default=1, help="denoising steps")
    pl.add_argument("--chunk-frames", type=int, default=1, help="latent frames per chunk")
    pl.add_argument("--mode", default="stream_batch", choices=("stream_batch", "sequential"))
    pl.add_argument("--decode", default="auto", choices=("auto", "shared", "dedicated"))
    pl.add_argument("--budget-ms", type=float, default=None, help="largest p99 chunk latency a plan may have")
    pl.add_argument("--policy", default="streamgen", choices=("streamgen", "sdv2"))
    pl.add_argument("--max-gpus-per-replica", type=int, default=8)
    pl.add_argument("--duration", type=float, default=6.0, help="simulated seconds per run")
    pl.add_argument("--noise", type=float, default=0.0, help="lognormal sigma on every cost")
    pl.add_argument("--json", metavar="FILE", help="write the plans as JSON")
    pl.add_argument("--plot", metavar="FILE.png", help="draw streams and FPS against GPUs (matplotlib)")
    pl.set_defaults(func=cmd_plan)
    demo = sub.add_parser("demo", help="start the service locally, stream into out/demo.mp4, stop")
    _service_flags(demo)
    _stream_flags(demo, "out/demo.mp4", 48)
    demo.set_defaults(func=cmd_demo)
    demo_v2v = sub.add_parser("demo-v2v", help="start the service locally, restyle a test clip into out/demo_v2v.mp4")
    _service_flags(demo_v2v)
    _transform_flags(demo_v2v, "out/input.mp4", "out/demo_v2v.mp4")
    demo_v2v.add_argument("--clip-frames", type=int, default=64, help="frames of the test clip it makes if --in is absent")
    demo_v2v.set_defaults(func=cmd_demo_v2v, fps=8.0)
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
