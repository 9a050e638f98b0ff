"""The simulator: the real ``PipelineEngine`` over a ``SimExecutor`` on a fake clock.

The engine's own scheduler (EDF micro-batches, at most ``max_inflight`` in flight, stream batch, lanes,
the block split and its re-balancing, decode routing) decides what runs; the executor only says *when*
each micro-batch and decode finishes, from a cost profile (``workers.costs``):

* stage k starts micro-batch m at max(its free time, m's arrival from stage k-1) and is busy for
  cost(blocks it owns, m's tokens) + the per-call overhead (x a lognormal noise factor, seeded);
  stage 0 also waits for the ring latents of the forward each work continues (same stream and lane);
* activations travel between stages in transfer_latency + bytes / bandwidth, without holding a stage;
* a finished chunk is decoded on its stream's decode worker: ``shared`` workers queue on the last stage's
  device (they take its time), ``dedicated`` ones on their own;
* on a CPU host (profile ``cores``) every call is slowed by ``Profile.contention`` of how many other stages
  and decode workers computed while this one did, over the trailing ``CONTENTION_WINDOW`` calls' time (the
  calls that will overlap it are not all scheduled yet, so the recent past stands in for them).

``collect(wait)`` moves the clock to the next completion. Clean latents come back as zeros of the right
shape: the simulator counts time, not pixels. Memory per GPU comes from ``workers.devicemap``.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from workers import devicemap
from workers.batch import Collected, DecodedChunk, Finished, MicroBatch, OutputFormat, StageStats
from workers.config import CacheConfig, EngineConfig, GenerationConfig, ParallelConfig
from workers.costs import ModelCosts, Profile
from workers.decode import DecodeRouter
from workers.engine import PipelineEngine
from workers.executor import Executor
from workers.plan import even_split


class FakeClock:
    """Simulated seconds; the engine reads ``now`` as its clock, the executor moves it forward."""

    def __init__(self, start: float = 0.0):
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def advance_to(self, t: float) -> None:
        self.t = max(self.t, t)


@dataclass
class _Decode:
    end: float
    order: int
    chunk: DecodedChunk

    def __lt__(self, other: _Decode) -> bool:
        return (self.end, self.order) < (other.end, other.order)


CONTENTION_WINDOW = 8
"""Trailing window, in multiples of the call's own cost, over which the overlap with other processes is read."""


class SimExecutor(Executor):
    """P simulated stages (and decode workers) whose time comes from a profile; see the module doc."""

    def __init__(self, gen: GenerationConfig, parallel: ParallelConfig, profile: Profile, clock: FakeClock,
                 split: list[tuple[int, int]] | None = None, noise: float = 0.0, seed: int = 0,
                 extra_inflight: int = 1):
        """``noise``: sigma of the lognormal factor on every cost (0: exact); ``extra_inflight``: micro-batches
        in flight beyond one per stage (the Ray executor keeps 1 more, waiting in stage 0's queue)."""
        self.gen, self.cost_profile, self.clock = gen, profile, clock
        self.costs: ModelCosts = profile.costs(_model_name(gen))
        self.decoder = self.costs.decode(gen.model)
        self.num_stages = parallel.stages
        self._split = split or even_split(gen.model.num_layers, parallel.stages)
        if len(self._split) != parallel.stages:
            raise ValueError(f"split has {len(self._split)} ranges for {parallel.stages} stages")
        self.decode_workers = parallel.decode_workers
        self.decode_shared = parallel.decode == "shared"
        self.extra_inflight = extra_inflight
        self.parallel = parallel
        self.noise = noise
        self.rng = random.Random(seed)
        self.router = DecodeRouter(self.decode_workers)
        self.dtype_bytes = devicemap.DTYPE_BYTES[profile.dtype]
        m = gen.model
        lh, lw = m.latent_grid(gen.height, gen.width)
        self.latent_shape = (m.out_channels, lh, lw)
        self.tokens_per_frame = m.tokens_per_frame(gen.height, gen.width)
        self.stage_free = [0.0] * self.num_stages
        self.decode_free = [0.0] * self.decode_workers
        self.busy: dict[str, list[tuple[float, float]]] = {}  # resource -> (start, end) of each piece of work
        self.ring_ready: dict[tuple[str, int], float] = {}  # (stream, lane) -> when its ring latents reach stage 0
        self.streams: set[str] = set()
        self._done: deque[tuple[float, Finished]] = deque()  # in submission order; ends are increasing (FIFO)
        self._decodes: list[_Decode] = []
        self._order = 0
        self._zeros: dict[int, torch.Tensor] = {}

    # costs ------------------------------------------------------------------------------------------

    def _jitter(self, seconds: float) -> float:
        return seconds * math.exp(self.rng.gauss(0.0, self.noise)) if self.noise > 0 else seconds

    def block_times(self, stage: int, tokens: int, cached: int = 0) -> dict[int, float]:
        """``cached``: sum over the micro-batch's works of tokens x the stream's cached key tokens."""
        a, b = self._split[stage]
        return {blk: self.costs.block(tokens) + self.costs.attention_s * cached for blk in range(a, b)}

    def cached_pairs(self, mb: MicroBatch) -> int:
        """Query x cached-key token pairs of ``mb``: each work attends to the frames committed before its oldest
        chunk, up to the cache's capacity."""
        capacity = self.gen.cache.capacity_frames
        tpf = self.tokens_per_frame
        return sum(w.frames * tpf * min(capacity, min(c for c, _ in w.entries) * w.chunk_frames) * tpf
                   for w in mb.segments)

    def stage_cost(self, stage: int, tokens: int, cached: int = 0) -> float:
        """One forward of ``tokens`` on ``stage``: its blocks, embed (stage 0) / head (last), call overhead."""
        cost = sum(self.block_times(stage, tokens, cached).values()) + self.cost_profile.call_overhead_s
        if stage == 0:
            cost += self.costs.embed(tokens)
        if stage == self.num_stages - 1:
            cost += self.costs.head(tokens)
        return cost

    def decode_cost(self, frames: int) -> float:
        return self.decoder(frames * self.tokens_per_frame)

    # the contract ---------------------------------------------------------------------------------------

    @property
    def max_inflight(self) -> int:
        return self.num_stages + self.extra_inflight

    def submit(self, mb: MicroBatch) -> None:
        now = self.clock.now()
        last = self.num_stages - 1
        # stage 0 waits for the ring latents of every work that continues an earlier forward of its lane
        arrive = now + self.cost_profile.transfer_latency_s
        for w in mb.segments:
            if not w.reset_cache and any(s != 0 for _, s in w.entries):
                arrive = max(arrive, self.ring_ready.get((w.stream_id, w.lane), 0.0))
        act_bytes = mb.tokens * self.gen.model.dim * self.dtype_bytes  # [tokens, dim] between stages
        cached = self.cached_pairs(mb)
        stats, end = [], arrive
        for k in range(self.num_stages):
            start = max(self.stage_free[k], arrive)
            cost = self.stage_cost(k, mb.tokens, cached)
            if k == 0 and mb.prompts:
                cost += self.costs.text_encode_s * len(mb.prompts)
            cost = self._jitter(cost) * self._contention(f"stage {k} compute", start, cost)
            end = start + cost
            idle = max(0.0, start - self.stage_free[k])
            self.stage_free[k] = end
            self.busy.setdefault(f"stage {k} compute", []).append((start, end))
            sent = act_bytes if k < last else mb.ring_frames() * math.prod(self.latent_shape) * 4
            block_s = {}
            if mb.profile:  # the block scheduler's costs, scaled as the call was
                raw = self.block_times(k, mb.tokens, cached)
                scale = cost / max(self.stage_cost(k, mb.tokens, cached), 1e-12)
                block_s = {blk: s * scale for blk, s in raw.items()}
            stats.append(StageStats(k, cost, idle, sent if (k < last or self.num_stages > 1) else 0,
                                    self._cache_bytes(k), mb.tokens, block_s))
            arrive = end + (self.cost_profile.transfer_s(act_bytes) if k < last else 0.0)
        ring_at = end + (self.cost_profile.transfer_s(stats[-1].bytes_sent) if self.num_stages > 1 else 0.0)
        chunks = []
        for w in mb.segments:
            if w.ring_entries():
                self.ring_ready[(w.stream_id, w.lane)] = ring_at
            done = [(c, self._zero(w.chunk_frames)) for c in w.finishes()]
            chunks.append(done)
            for c, _ in done:
                self._decode(w.stream_id, c, w.chunk_frames, end)
        self._done.append((end, Finished(mb.seq, chunks, stats)))

    def _decode(self, stream_id: str, chunk: int, frames: int, ready: float) -> None:
        if not self.decode_workers:
            return
        w = self.router.assign(stream_id)
        cost = self._jitter(self.decode_cost(frames))
        if not self.decode_shared:
            cost *= self._contention(f"decode {w}", max(self.decode_free[w], ready), cost)
        if self.decode_shared:  # on the last stage's device: queued behind (and ahead of) its forwards
            last = self.num_stages - 1
            start = max(self.stage_free[last], ready)
            self.stage_free[last] = start + cost
        else:
            nbytes = frames * math.prod(self.latent_shape) * 4
            start = max(self.decode_free[w], ready + self.cost_profile.transfer_s(nbytes))
            self.decode_free[w] = start + cost
        self.busy.setdefault("decode" if self.decode_shared else f"decode {w}", []).append((start, start + cost))
        if self.decode_shared:
            self.busy.setdefault(f"stage {self.num_stages - 1} compute", []).append((start, start + cost))
        video_frames = frames * self.gen.model.vae_stride[0]
        out = DecodedChunk(stream_id, chunk, [b""] * video_frames, self.gen.width, self.gen.height, cost)
        heapq.heappush(self._decodes, _Decode(start + cost, self._order, out))
        self._order += 1

    def _contention(self, resource: str, start: float, cost: float) -> float:
        """``Profile.contention`` of how many other compute processes ran, on average, while ``resource`` itself
        computed over [start - W, start], W = CONTENTION_WINDOW x cost (1.0 on GPUs; 1.0 with no own work in
        the window). Overlap with its own past work, not the others' plain utilisation: the stages of one
        stream's serial chain take turns and do not slow each other. "decode" (shared decoding) is already
        in the last stage's spans."""
        if self.cost_profile.cores is None or cost <= 0:
            return 1.0
        lo = start - CONTENTION_WINDOW * cost

        def recent(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
            out = []
            for a, b in reversed(spans):  # one resource's spans are in order
                if b <= lo:
                    break
                if a < start:
                    out.append((max(a, lo), min(b, start)))
            return out

        own = recent(self.busy.get(resource, []))
        own_s = sum(b - a for a, b in own)
        if own_s <= 0:
            return 1.0
        overlap = sum(max(0.0, min(b, d) - max(a, c)) for name, spans in self.busy.items()
                      if name not in (resource, "decode") for c, d in recent(spans) for a, b in own)
        return self.cost_profile.contention(overlap / own_s)

    def _zero(self, frames: int) -> torch.Tensor:
        """Clean latents [f, C, h, w]: zeros, shared (nothing reads their values)."""
        if frames not in self._zeros:
            self._zeros[frames] = torch.zeros((frames,) + self.latent_shape)
        return self._zeros[frames]

    def utilization(self, t0: float, t1: float) -> dict[str, float]:
        """Busy share of [t0, t1] per resource ("stage k compute" includes a shared decode; "decode": the
        busiest dedicated decode worker, or the shared decode's share)."""
        span = max(t1 - t0, 1e-12)
        share = {name: sum(max(0.0, min(e, t1) - max(s, t0)) for s, e in spans) / span
                 for name, spans in self.busy.items()}
        out = {f"stage {k} compute": share.get(f"stage {k} compute", 0.0) for k in range(self.num_stages)}
        if self.decode_workers:
            out["decode"] = share.get("decode", 0.0) if self.decode_shared else \
                max(share.get(f"decode {w}", 0.0) for w in range(self.decode_workers))
        return out

    def next_event(self) -> float | None:
        times = ([self._done[0][0]] if self._done else []) + ([self._decodes[0].end] if self._decodes else [])
        return min(times, default=None)

    def collect(self, wait: bool) -> Collected:
        now = self.clock.now()
        nxt = self.next_event()
        if wait and nxt is not None and nxt > now:
            self.clock.advance_to(nxt)
            now = nxt
        finished = []
        while self._done and self._done[0][0] <= now:
            finished.append(self._done.popleft()[1])
        decoded = []
        while self._decodes and self._decodes[0].end <= now:
            decoded.append(heapq.heappop(self._decodes).chunk)
        return Collected(finished, decoded)

    @property
    def decoding(self) -> int:
        return len(self._decodes)

    def open_stream(self, stream_id: str, cache_cfg: CacheConfig, output: OutputFormat | None = None,
                    warm: list[torch.Tensor] = (), video: bool = False) -> None:
        self.streams.add(stream_id)
        if self.decode_workers:
            self.router.assign(stream_id)

    def close_stream(self, stream_id: str) -> list[int]:
        freed = [self._per_stream_kv(k) if stream_id in self.streams else 0 for k in range(self.num_stages)]
        self.streams.discard(stream_id)
        self.router.release(stream_id)
        return freed

    def redecode(self, stream_id: str, chunk: int, latents: torch.Tensor) -> None:
        self._decode(stream_id, chunk, latents.shape[0], self.clock.now())

    def _per_stream_kv(self, stage: int) -> int:
        a, b = self._split[stage]
        return devicemap.kv_stream_bytes(self.gen, b - a, self.dtype_bytes)

    def _cache_bytes(self, stage: int) -> int:
        return len(self.streams) * self._per_stream_kv(stage)

    def cache_bytes(self) -> list[int]:
        return [self._cache_bytes(k) for k in range(self.num_stages)]

    def split(self) -> list[tuple[int, int]]:
        return list(self._split)

    def rebalance(self, split: list[tuple[int, int]]) -> None:
        self._split = list(split)

    def profile(self, grid: tuple[int, int], frames: int, cache_cfg: CacheConfig,
                repeats: int = 1, streams: int = 1) -> list[StageStats]:
        tokens = streams * frames * grid[0] * grid[1]
        cached = tokens * cache_cfg.capacity_frames * grid[0] * grid[1]  # against a full cache, as the stages do
        return [StageStats(k, self.stage_cost(k, tokens, cached), 0.0, 0, 0, tokens,
                           self.block_times(k, tokens, cached)) for k in range(self.num_stages)]

    def profile_decode(self, latent_shape: tuple[int, int, int], frames: int, repeats: int = 1) -> float | None:
        return self.decode_cost(frames) if self.decode_workers else None

    def device_map(self) -> devicemap.DeviceMap:
        """Memory per GPU slot for the current split (weights, per-stream state) against the profile's GPU."""
        gib = self.cost_profile.gpu_memory_gib
        capacity = [None if gib is None else int(gib * devicemap.GIB)] * self.parallel.gpu_slots
        parallel = self.parallel if self.parallel.dtype == self.cost_profile.dtype else \
            replace(self.parallel, dtype=self.cost_profile.dtype)
        return devicemap.plan(self.gen, parallel, self._split, capacity)


def _model_name(gen: GenerationConfig) -> str:
    """The MODEL_CONFIGS name of the generation's model (profiles are keyed by it)."""
    from workers.config import MODEL_CONFIGS

    for name, cfg in MODEL_CONFIGS.items():
        if cfg == gen.model:
            return name
    for name, cfg in MODEL_CONFIGS.items():  # overrides that leave the shape (dim, layers) alone
        if (cfg.dim, cfg.ffn_dim, cfg.num_layers) == (gen.model.dim, gen.model.ffn_dim, gen.model.num_layers):
            return name
    raise ValueError("the simulator needs a named model (workers.config.MODEL_CONFIGS) to find its costs")


# -- one replica, run ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


@dataclass
class SimResult:
    """What one simulated replica did with ``streams`` streams running flat out."""

    streams: int
    split: list[tuple[int, int]]
    frames_per_s: float
    """Video frames/s over all its streams, after warm-up."""
    min_stream_fps: float
    """The slowest stream's video frames/s."""
    ttff_s: float
    """Worst time from a stream's start to its first frames."""
    latency_p50_s: float
    latency_p99_s: float
    """Per-chunk latency: dispatch of its first step to its frames (every frame of a chunk shares it)."""
    utilization: dict[str, float]
    """Busy share of the measured window per resource ("stage k compute", "decode")."""
    memory_bytes: list[int]
    """Per GPU slot: weights plus ``streams`` streams' state."""
    memory_streams: int | None
    """Streams whose state fits every slot (None: memory not bounded)."""
    admission_streams: int = 0
    """The engine's own ``max_streams(fps)`` from the latency model it fitted during the run."""
    chunks: int = 0
    bottleneck: str = ""
    per_stream_fps: dict[str, float] = field(default_factory=dict)
    streams_at_fps: int = 0
    """Streams of this run that got ``fps`` (the planner searches the stream count where all of them do)."""
    stage_compute_s: list[float] = field(default_factory=list)
    """Per stage: compute seconds per micro-batch over the whole run (the engine's own ``EngineStats``, as a
    real run reports them), to tell a cost error from a scheduling one."""


def build(gen: GenerationConfig, parallel: ParallelConfig, profile: Profile, engine_cfg: EngineConfig | None = None,
          noise: float = 0.0, seed: int = 0, extra_inflight: int = 1) -> tuple[PipelineEngine, SimExecutor, FakeClock]:
    """A real engine over a simulated executor on a fake clock, calibrated (the engine's start-up profile
    and block split)."""
    clock = FakeClock()
    executor = SimExecutor(gen, parallel, profile, clock, noise=noise, seed=seed, extra_inflight=extra_inflight)
    engine = PipelineEngine(gen, executor, engine_cfg or EngineConfig(), clock=clock.now)
    engine.calibrate()
    return engine, executor, clock


def simulate(gen: GenerationConfig, parallel: ParallelConfig, profile: Profile, streams: int, duration_s: float,
             fps: float = 16.0, warmup_s: float | None = None, engine_cfg: EngineConfig | None = None,
             noise: float = 0.0, seed: int = 0, extra_inflight: int = 1, max_ahead: int | None = None,
             chunks: tuple[int, int] | None = None) -> SimResult:
    """Run ``streams`` streams flat out for ``duration_s`` simulated seconds; measure after ``warmup_s``
    (default a quarter of the run). ``chunks`` = (warm-up, measured): measure as the benches do instead, until
    every stream has both, from the last warm-up output on, latencies of measured chunks only. Each output is consumed at once; ``max_ahead``: chunks a stream may have
    issued and not delivered (the service's ``output_chunks_ahead``; None: unbounded, so a decode slower
    than the DiT lets its queue grow)."""
    if streams < 1:
        raise ValueError("simulate needs at least one stream")
    engine, executor, clock = build(gen, parallel, profile, engine_cfg, noise, seed, extra_inflight)
    for i in range(streams):
        engine.add_stream(f"s{i}", f"prompt {i}", i, fps=fps, max_ahead=max_ahead)
    warmup = 0.0 if chunks is not None else duration_s / 4 if warmup_s is None else warmup_s
    vfpc = engine.video_frames_per_chunk
    first: dict[str, float] = {}
    outputs: list[tuple[float, str, float]] = []  # (time, stream, chunk latency)
    got = {f"s{i}": 0 for i in range(streams)}
    stalls = 0
    while clock.now() < duration_s and (chunks is None or min(got.values()) < sum(chunks)):
        before = clock.now()
        for out in engine.step():
            first.setdefault(out.stream_id, clock.now())
            if chunks is None or out.chunk >= chunks[0]:
                outputs.append((clock.now(), out.stream_id, out.latency_s))
            else:  # a warm-up chunk: the window starts at the last of them
                warmup = clock.now()
            got[out.stream_id] += 1
            engine.consumed(out.stream_id)
        stalls = stalls + 1 if clock.now() == before else 0
        if stalls > 10_000:
            raise RuntimeError("the simulation made no progress (nothing in flight and nothing ready)")
    # the window runs from the last output at or before the warm-up to the last output: outputs come in
    # bursts (one micro-batch's chunks), so it starts at a burst's end, not inside one
    t0 = warmup if chunks is not None else max([t for t, _, _ in outputs if t <= warmup], default=0.0)
    steady = [o for o in outputs if o[0] > t0]
    t1 = steady[-1][0] if steady else clock.now()
    window = max(t1 - t0, 1e-12)
    times: dict[str, list[float]] = {f"s{i}": [] for i in range(streams)}
    for t, sid, _ in steady:
        times[sid].append(t)
    latencies = [lat for _, _, lat in steady]
    # a stream's rate from its own outputs (first to last, so a window holding a few chunks per stream does not
    # round it by a whole chunk); a stream with fewer than 2 outputs in the window gets what it got over it
    per_stream = {sid: (len(ts) - 1) * vfpc / (ts[-1] - ts[0]) if len(ts) > 2 and ts[-1] > ts[0]
                  else len(ts) * vfpc / window for sid, ts in times.items()}
    util = executor.utilization(t0, t1)
    dmap = executor.device_map()
    memory = [dmap.weight_bytes(s) + streams * dmap.stream_bytes(s) for s in range(dmap.slots)]
    result = SimResult(streams, executor.split(), len(steady) * vfpc / window, min(per_stream.values()),
                       max(first.values(), default=float("inf")) if len(first) == streams else float("inf"),
                       percentile(latencies, 50), percentile(latencies, 99), util, memory, dmap.max_streams(),
                       engine.max_streams(fps), len(steady), per_stream_fps=per_stream)
    result.stage_compute_s = engine.stats.compute_per_micro_batch
    result.bottleneck = bottleneck(result, executor)
    result.streams_at_fps = sum(v >= fps * (1 - 1e-9) for v in per_stream.values())
    return result


def bottleneck(result: SimResult, executor: SimExecutor) -> str:
    """The busiest resource. Decode wins a tie (within 2%): the engine fills a stage's idle time with smaller
    micro-batches, so a saturated decoder often sits beside a stage that looks as busy; a shared decode
    counts as "decode" when it takes most of its stage's time."""
    util = result.utilization
    name = max(util, key=util.get)
    if "decode" in util and executor.decode_workers:
        dec = util["decode"]
        if not executor.decode_shared and dec >= util[name] - 0.02:
            return "decode"
        if executor.decode_shared and name == f"stage {executor.num_stages - 1} compute" and dec >= util[name] - dec:
            return "decode"
    return name
