"""The capacity planner behind ``streamgen plan``: for each GPU count, the best layout and what it serves.

Every candidate is simulated (``workers.sim``: the real engine on a fake clock, costs from a profile):

* ``streamgen`` policy: replicas of g GPUs (g divides N), each P = g stages with shared decode, or
  P = g - 1 stages plus one dedicated decode GPU; the streams a replica serves at ``fps`` are searched
  (doubling, then bisection) up to what its memory holds; the best plan serves the most streams in all.
* ``sdv2`` policy (StreamDiffusionV2): one pipeline over all N GPUs, full weights on every rank, one decoder
  on the last rank, one stream (its ring: lanes = P), stream batch.

Step groups: every plan here runs all denoising steps on each pipeline (one step group); the grid printed
is replicas x layer ranges.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from workers import devicemap
from workers.config import CONFIG, MAX_STEPS, CacheConfig, EngineConfig, GenerationConfig, ParallelConfig, \
    SamplerConfig, get_config
from workers.costs import Profile
from workers.sim import SimResult, simulate

SDV2_H100_480P_1STEP = {1: 20.47, 2: 39.77, 3: 43.88, 4: 44.38}
"""StreamDiffusionV2's published 1.3B, 480p, 1-step FPS on 1-4 H100s (REFERENCE §1.8, Table A): the plot's
comparison points."""
MAX_SEARCH_STREAMS = 256
"""Streams per replica the search goes up to when memory does not bound them."""


@dataclass(frozen=True, config=CONFIG)
class PlanConfig:
    """What ``streamgen plan`` is asked."""

    model: str = "wan2.1-1.3b"
    """A named model (workers.config.MODEL_CONFIGS); the profile must have its costs."""
    gpus: tuple[Annotated[int, Field(ge=1, le=4096)], ...] = (1, 2, 4, 8, 16)
    """GPU counts to plan for."""
    fps: Annotated[float, Field(gt=0, le=1000)] = 16.0
    """Video frames/s each stream must get."""
    height: Annotated[int, Field(ge=0, le=1 << 14)] = 480
    width: Annotated[int, Field(ge=0, le=1 << 14)] = 832
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 1
    """Denoising steps per chunk."""
    chunk_frames: Annotated[int, Field(ge=1, le=64)] = 1
    """Latent frames per chunk (StreamDiffusionV2: 1)."""
    mode: Literal["sequential", "stream_batch"] = "stream_batch"
    decode: Literal["auto", "shared", "dedicated"] = "auto"
    """Decode placement: shared (on the last stage's GPU), dedicated (a GPU of its own), auto: the better."""
    budget_ms: Annotated[float, Field(gt=0)] | None = None
    """Largest p99 chunk latency a plan may have (None: any)."""
    policy: Literal["streamgen", "sdv2"] = "streamgen"
    max_gpus_per_replica: Annotated[int, Field(ge=1, le=4096)] = 8
    """streamgen policy: largest replica tried (pipelines longer than this are not searched)."""
    duration_s: Annotated[float, Field(gt=0, le=3600)] = 6.0
    """Simulated seconds per run (at least 40 chunk latencies)."""
    noise: Annotated[float, Field(ge=0, le=2)] = 0.0
    """Lognormal sigma on every cost (0: exact profile costs)."""

    @field_validator("model")
    @classmethod
    def _known(cls, value: str) -> str:
        get_config(value)  # ValueError naming the known models
        return value

    @model_validator(mode="after")
    def _check(self) -> PlanConfig:
        if not self.gpus:
            raise ValueError("PlanConfig.gpus must name at least one GPU count")
        layers = get_config(self.model).num_layers
        if self.policy == "sdv2" and max(self.gpus) > layers:
            raise ValueError(f"sdv2 policy: {max(self.gpus)} GPUs would leave ranks without a block "
                             f"({self.model} has {layers})")
        return self

    def generation(self, lanes: int = 1) -> GenerationConfig:
        steps = tuple(1000.0 * (self.steps - i) / self.steps for i in range(self.steps))
        mode = "stream_batch" if self.policy == "sdv2" else self.mode
        return GenerationConfig(model=get_config(self.model), height=self.height, width=self.width,
                                sampler=SamplerConfig(denoising_steps=steps, chunk_frames=self.chunk_frames, mode=mode,
                                                      lanes=lanes if mode == "stream_batch" else 1),
                                cache=CacheConfig())


@dataclasses.dataclass
class PlanRow:
    """The best plan for one GPU count."""

    gpus: int
    policy: str
    replicas: int
    gpus_per_replica: int
    stages: int
    decode: str
    decode_workers: int
    split: list[tuple[int, int]]
    frames_per_s_pipeline: float
    """Video frames/s one replica delivers, all its streams running flat out."""
    frames_per_s: float
    """All replicas."""
    streams_per_pipeline: int
    streams: int
    """Streams served at the requested fps, all replicas."""
    ttff_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    memory_gib: list[float]
    """Peak memory per GPU of a replica (weights plus its streams' state)."""
    bottleneck: str
    admission_streams: int
    """The engine's own max_streams(fps) per replica (its latency model), for comparison."""
    efficiency: float = float("nan")
    """frames_per_s / (gpus x frames_per_s at the smallest GPU count planned, per GPU)."""

    @property
    def grid(self) -> str:
        ranges = " ".join(f"[{a}-{b - 1}]" for a, b in self.split)
        if self.decode == "shared":
            return f"{self.replicas} x ({ranges}), decode on the last stage"
        return f"{self.replicas} x ({ranges}) + {self.decode_workers} decode GPU"


def _simulate(cfg: PlanConfig, profile: Profile, stages: int, decode: str, streams: int, workers: int = 1) -> SimResult:
    lanes = stages if (cfg.policy == "sdv2" or cfg.mode == "stream_batch") else 1
    gen = cfg.generation(lanes)
    parallel = ParallelConfig(stages=stages, decode=decode, decode_workers=workers, dtype=profile.dtype)
    # streams may run ahead by what fills the pipeline and its decoders (the service's output_chunks_ahead)
    duration = max(cfg.duration_s, 12 * gen.model.vae_stride[0] * cfg.chunk_frames / cfg.fps)  # >= 12 chunks at fps
    return simulate(gen, parallel, profile, streams, duration, fps=cfg.fps, noise=cfg.noise,
                    engine_cfg=EngineConfig(profile_every=8, rebalance_every=32), max_ahead=ahead(stages, workers))


def ahead(stages: int, workers: int) -> int:
    """Chunks a stream may have issued and not delivered in a plan: one per stage and decode worker, plus one."""
    return stages + workers + 1


def _ok(cfg: PlanConfig, r: SimResult) -> bool:
    # every stream at fps by its own outputs, and all of them together over the window
    fast = min(r.min_stream_fps, r.frames_per_s / r.streams) >= cfg.fps * (1 - 1e-9)
    return fast and (cfg.budget_ms is None or r.latency_p99_s * 1000 <= cfg.budget_ms)


def memory_cap(cfg: PlanConfig, profile: Profile, stages: int, decode: str, full_weights: bool = False,
               workers: int = 1) -> int | None:
    """Streams whose state fits every GPU of a replica (None: unbounded). ``full_weights``: every rank holds
    all blocks (StreamDiffusionV2)."""
    dmap = replica_map(cfg, profile, stages, decode, full_weights, workers)
    if any(dmap.usable_bytes(s) is not None and dmap.weight_bytes(s) > dmap.usable_bytes(s)
           for s in range(dmap.slots)):
        return 0
    return dmap.max_streams()


def replica_map(cfg: PlanConfig, profile: Profile, stages: int, decode: str, full_weights: bool = False,
                workers: int = 1) -> devicemap.DeviceMap:
    gen = cfg.generation(stages)
    parallel = ParallelConfig(stages=stages, decode=decode, decode_workers=workers, dtype=profile.dtype,
                              gpu_memory_gib=profile.gpu_memory_gib)
    dmap = devicemap.plan(gen, parallel)
    if full_weights:  # every rank also holds the blocks it does not run (StreamDiffusionV2 loads the whole model)
        all_blocks = sum(p.weight_bytes for p in dmap.pieces if p.name.startswith("stage"))
        extra = [devicemap.Piece(f"blocks held but not run on rank {s}", s,
                                 all_blocks - dmap.on(s)[0].weight_bytes) for s in range(stages)]
        dmap = dataclasses.replace(dmap, pieces=dmap.pieces + extra)
    return dmap


def best_streams(cfg: PlanConfig, profile: Profile, stages: int, decode: str,
                 workers: int = 1) -> tuple[int, SimResult, str]:
    """(streams one replica serves at fps, the simulation at that load, what stops one more)."""
    cap = memory_cap(cfg, profile, stages, decode, workers=workers)
    limit = MAX_SEARCH_STREAMS if cap is None else min(cap, MAX_SEARCH_STREAMS)
    first = _simulate(cfg, profile, stages, decode, 1, workers)
    if limit < 1:
        return 0, first, "memory"
    if not _ok(cfg, first):
        return 0, first, first.bottleneck
    good, good_r, bad, bad_r = 1, first, None, None
    n = 2
    while n <= limit:  # doubling, then bisection between the last good and the first bad
        r = _simulate(cfg, profile, stages, decode, n, workers)
        if not _ok(cfg, r):
            bad, bad_r = n, r
            break
        good, good_r = n, r
        n *= 2
    if bad is None and good < limit:
        r = _simulate(cfg, profile, stages, decode, limit, workers)
        if _ok(cfg, r):
            good, good_r = limit, r
        else:
            bad, bad_r = limit, r
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        r = _simulate(cfg, profile, stages, decode, mid, workers)
        if _ok(cfg, r):
            good, good_r = mid, r
        else:
            bad, bad_r = mid, r
    if bad is None:
        return good, good_r, "memory" if cap is not None and good >= cap else "search limit"
    return good, good_r, bad_r.bottleneck


def _row(cfg: PlanConfig, profile: Profile, gpus: int, g: int, stages: int, decode: str, streams: int,
         r: SimResult, why: str, full_weights: bool = False, workers: int = 1) -> PlanRow:
    dmap = replica_map(cfg, profile, stages, decode, full_weights, workers)
    memory = [(dmap.weight_bytes(s) + max(streams, 1) * dmap.stream_bytes(s)) / devicemap.GIB
              for s in range(dmap.slots)]
    replicas = gpus // g
    return PlanRow(gpus, cfg.policy, replicas, g, stages, decode, workers, r.split, r.frames_per_s, replicas * r.frames_per_s,
                   streams, replicas * streams, r.ttff_s, r.latency_p50_s * 1000, r.latency_p99_s * 1000,
                   [round(m, 2) for m in memory], why, r.admission_streams)


def plan_sdv2(cfg: PlanConfig, profile: Profile, gpus: int) -> PlanRow:
    r = _simulate(cfg, profile, gpus, "shared", 1)
    cap = memory_cap(cfg, profile, gpus, "shared", full_weights=True)
    fits = cap is None or cap >= 1
    streams = int(fits and _ok(cfg, r))
    return _row(cfg, profile, gpus, gpus, gpus, "shared", streams, r, r.bottleneck if fits else "memory",
                full_weights=True)


def plan_streamgen(cfg: PlanConfig, profile: Profile, gpus: int, cache: dict) -> PlanRow:
    best = None
    layers = get_config(cfg.model).num_layers
    for g in range(1, min(gpus, cfg.max_gpus_per_replica) + 1):
        if gpus % g:
            continue
        layouts = [("shared", g, 1)] + [("dedicated", g - d, d) for d in range(1, g)]  # (decode, stages, workers)
        for decode, stages, workers in layouts:
            if cfg.decode not in ("auto", decode) or stages > layers:
                continue
            key = (stages, decode, workers)
            if key not in cache:
                cache[key] = best_streams(cfg, profile, stages, decode, workers)
            n, r, why = cache[key]
            row = _row(cfg, profile, gpus, g, stages, decode, n, r, why, workers=workers)
            rank = (row.streams, row.frames_per_s, -row.latency_p99_ms)
            if best is None or rank > best[0]:
                best = (rank, row)
    if best is None:
        raise ValueError(f"no layout of {gpus} GPUs fits {cfg.model} with decode {cfg.decode}")
    return best[1]


def plan(cfg: PlanConfig, profile: Profile) -> list[PlanRow]:
    """The best plan per GPU count, with scaling efficiency against the smallest count."""
    profile.costs(cfg.model)  # ValueError early when the profile lacks the model
    cache: dict = {}
    rows = [plan_sdv2(cfg, profile, n) if cfg.policy == "sdv2" else plan_streamgen(cfg, profile, n, cache)
            for n in sorted(set(cfg.gpus))]
    base = rows[0].frames_per_s / rows[0].gpus
    for row in rows:
        row.efficiency = row.frames_per_s / (row.gpus * base) if base > 0 else float("nan")
    return rows


def table(rows: list[PlanRow], cfg: PlanConfig) -> str:
    head = (f"{'GPUs':>4}  {'plan (replicas x layer ranges)':<52} {'FPS/pipe':>8} {'FPS':>8} {'eff':>5} "
            f"{'streams@' + format(cfg.fps, 'g'):>10} {'/GPU':>5} {'TTFF s':>7} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'peak GiB/GPU':>13}  bottleneck")
    lines = [head]
    for r in rows:
        grid = r.grid if len(r.grid) <= 52 else r.grid[:49] + "..."
        lines.append(f"{r.gpus:>4}  {grid:<52} {r.frames_per_s_pipeline:8.2f} {r.frames_per_s:8.2f} "
                     f"{r.efficiency:5.0%} {r.streams:>10} {r.streams / r.gpus:5.2f} {r.ttff_s:7.2f} "
                     f"{r.latency_p50_ms:7.0f} {r.latency_p99_ms:7.0f} {max(r.memory_gib):13.2f}  {r.bottleneck}")
    return "\n".join(lines)


def to_json(rows: list[PlanRow], cfg: PlanConfig, profile: Profile) -> dict:
    return {"request": dataclasses.asdict(cfg), "profile": profile.name, "profile_device": profile.device,
            "plans": [dict(dataclasses.asdict(r), grid=r.grid) for r in rows]}


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x))
        f.write("\n")


def plot(path: str, series: dict[str, list[PlanRow]], fps: float, title: str = "") -> None:
    """Streams at ``fps`` and total FPS against GPUs, one line per series, with StreamDiffusionV2's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in series.items():
        g = [r.gpus for r in rows]
        ax_s.plot(g, [r.streams for r in rows], marker="o", label=name)
        ax_f.plot(g, [r.frames_per_s for r in rows], marker="o", label=name)
    sd = sorted(SDV2_H100_480P_1STEP.items())
    ax_f.plot([g for g, _ in sd], [f for _, f in sd], "k^", label="StreamDiffusionV2 published (1.3B, 480p, 1 step)")
    ax_s.plot([g for g, _ in sd], [int(f >= fps) for _, f in sd], "k^", label="StreamDiffusionV2 (1 stream/pipeline)")
    for ax, what in ((ax_s, f"streams at {fps:g} fps"), (ax_f, "video frames/s, all streams")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
