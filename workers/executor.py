"""Executors run micro-batches through a pipeline's stages. One contract, two implementations:

* ``InProcessExecutor``: every stage in this process, no communication (the fast test path);
* ``RayExecutor`` (``workers.ray_executor``): one Ray actor per stage, activations over torch.distributed.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import deque

import torch

from workers.config import CacheConfig, ModelConfig
from workers.batch import MicroBatch, SegmentSpec, StageStats
from workers.plan import even_split
from workers.stage import StageWorker


class StageFailure(RuntimeError):
    """A stage died or stopped answering; every micro-batch in flight is lost."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"stage {kind}: {detail}")
        self.kind = kind  # "died" | "timeout"


class Executor(ABC):
    """Runs micro-batches through P stages, in submission order."""

    num_stages: int

    @abstractmethod
    def submit(self, mb: MicroBatch) -> None:
        """Start ``mb`` on stage 0; it flows through every stage. Called with at most P in flight."""

    @abstractmethod
    def collect(self, wait: bool) -> list[tuple[int, torch.Tensor, list[StageStats]]]:
        """Finished micro-batches as (seq, flow [F, C, h, w] on CPU, per-stage stats), in submission order.
        With ``wait`` block until at least one is done (if any is in flight)."""

    @abstractmethod
    def open_stream(self, stream_id: str, cache_cfg: CacheConfig) -> None:
        """Create the stream's caches on every stage."""

    @abstractmethod
    def close_stream(self, stream_id: str) -> list[int]:
        """Free the stream's caches on every stage; bytes released per stage."""

    @abstractmethod
    def cache_bytes(self) -> list[int]:
        """Cache bytes held per stage."""

    @abstractmethod
    def split(self) -> list[tuple[int, int]]:
        """Current block range per stage."""

    @abstractmethod
    def rebalance(self, split: list[tuple[int, int]]) -> None:
        """Move blocks (weights and every stream's KV caches) to match ``split``. Call with nothing in flight."""

    def stage_groups(self) -> list[list[int]]:
        """Stage indices of each layer-split pipeline inside this executor (one group unless step-split)."""
        return [list(range(self.num_stages))]

    @abstractmethod
    def profile(self, grid: tuple[int, int], frames: int, cache_cfg: CacheConfig) -> list[StageStats]:
        """Per-stage block timings on random inputs of one chunk (the block scheduler's start-up costs)."""

    def shutdown(self) -> None:
        """Release processes and resources."""

    def kill(self) -> None:
        """Release at once, without asking stages to finish (they may be dead or hung)."""
        self.shutdown()


def moves(old: list[tuple[int, int]], new: list[tuple[int, int]]) -> list[tuple[int, int, list[int]]]:
    """Hand-overs (from stage, to stage, block ids) between neighbours that turn split ``old`` into ``new``.

    Boundaries move one block at a time, so every slice stays contiguous after every hop (a slice may be
    empty in between). Consecutive hops of the same pair are merged.
    """
    if len(old) != len(new) or old[0][0] != new[0][0] or old[-1][1] != new[-1][1]:
        raise ValueError(f"splits {old} and {new} do not cover the same blocks with the same stages")
    if any(a >= b for a, b in new) or any(new[i][1] != new[i + 1][0] for i in range(len(new) - 1)):
        raise ValueError(f"split {new} must be contiguous with a block on every stage")
    bounds = [b for _, b in old[:-1]]  # bounds[s]: first block of stage s + 1
    target = [b for _, b in new[:-1]]
    lo, hi = old[0][0], old[-1][1]
    hops: list[tuple[int, int, list[int]]] = []
    while bounds != target:
        for s in range(len(bounds)):
            left = bounds[s - 1] if s > 0 else lo
            right = bounds[s + 1] if s + 1 < len(bounds) else hi
            if bounds[s] > target[s] and bounds[s] > left:  # last block of stage s goes to s + 1
                bounds[s] -= 1
                hop = (s, s + 1, bounds[s])
            elif bounds[s] < target[s] and bounds[s] < right:  # first block of stage s + 1 goes to s
                hop = (s + 1, s, bounds[s])
                bounds[s] += 1
            else:
                continue
            if hops and hops[-1][:2] == hop[:2]:
                hops[-1][2].append(hop[2])
            else:
                hops.append((hop[0], hop[1], [hop[2]]))
    return hops


class InProcessExecutor(Executor):
    """All stages in one process, run back to back when a micro-batch is submitted."""

    def __init__(self, model_cfg: ModelConfig, num_stages: int = 1, split: list[tuple[int, int]] | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, weights_path: str = ""):
        split = split or even_split(model_cfg.num_layers, num_stages)
        if len(split) != num_stages:
            raise ValueError(f"split has {len(split)} ranges for {num_stages} stages")
        self.num_stages = num_stages
        self.stages = [StageWorker(model_cfg, rng, i, num_stages, device, dtype, weights_path)
                       for i, rng in enumerate(split)]
        self._done: deque = deque()

    def submit(self, mb: MicroBatch) -> None:
        act, contexts, stats = None, None, []
        for stage in self.stages:
            act, contexts, st = stage.forward(mb, act, contexts)
            stats.append(st)
        self._done.append((mb.seq, act.float().cpu(), stats))

    def collect(self, wait: bool) -> list[tuple[int, torch.Tensor, list[StageStats]]]:
        out = list(self._done)
        self._done.clear()
        return out

    def open_stream(self, stream_id: str, cache_cfg: CacheConfig) -> None:
        for stage in self.stages:
            stage.open_stream(stream_id, cache_cfg)

    def close_stream(self, stream_id: str) -> list[int]:
        return [stage.close_stream(stream_id) for stage in self.stages]

    def cache_bytes(self) -> list[int]:
        return [stage.cache_bytes() for stage in self.stages]

    def split(self) -> list[tuple[int, int]]:
        return [stage.block_range for stage in self.stages]

    def profile(self, grid: tuple[int, int], frames: int, cache_cfg: CacheConfig) -> list[StageStats]:
        return [stage.profile(grid, frames, cache_cfg) for stage in self.stages]

    def rebalance(self, split: list[tuple[int, int]]) -> None:
        for src, dst, blocks in moves(self.split(), split):
            self.stages[dst].adopt_blocks(*self.stages[src].release_blocks(blocks))


class StepSplitExecutor(Executor):
    """A grid plan: step groups x layer ranges. Group g is a layer-split pipeline (any Executor) holding
    the whole model and running only the denoising steps ``step_groups[g]``; context passes (and re-cache
    forwards) go to every group, so each group's KV caches hold the same clean context as the reference.

    Needs ``sequential`` mode or ``stream_batch`` with ``batch_attention='clean'`` (independent entries,
    split by step across groups). With 'inflight' attention a forward's entries attend to one another,
    so splitting it by step would change what each entry sees (or recompute every older entry).
    """

    def __init__(self, groups: list[Executor], step_groups: list[list[int]]):
        steps = sorted(s for g in step_groups for s in g)
        if len(groups) != len(step_groups) or steps != list(range(len(steps))):
            raise ValueError(f"step groups {step_groups} must partition the step indices over {len(groups)} groups")
        self.groups = groups
        self.owner = {s: g for g, group in enumerate(step_groups) for s in group}
        self.num_stages = sum(g.num_stages for g in groups)
        self._offsets = [sum(g.num_stages for g in groups[:i]) for i in range(len(groups))]
        self._texts: dict[str, torch.Tensor] = {}  # latest text per stream
        self._delivered: list[set[str]] = [set() for _ in groups]  # streams whose latest text each group has
        self._pending: dict[int, dict] = {}  # parent seq -> {"mb", "parts": {group: sub seq}, "done": {}}
        self._order: deque[int] = deque()
        self._sub_seq = 0
        self._sub_owner: dict[tuple[int, int], int] = {}  # (group, sub seq) -> parent seq

    def _route(self, spec: SegmentSpec) -> dict[int, list[int]]:
        """Group -> indices of the segment's entries it runs. Context entries go to every group."""
        steps = list(spec.steps)
        if all(s == -1 for s in steps):
            return {g: list(range(len(steps))) for g in range(len(self.groups))}
        real = {s for s in steps if s != -1}
        if len(real) > 1 and not spec.independent:
            raise ValueError("a step-split plan needs sequential mode or stream_batch with batch_attention "
                             f"'clean': this forward of stream {spec.stream_id!r} mixes steps {sorted(real)} "
                             "whose entries attend to one another")
        ctx = [j for j, s in enumerate(steps) if s == -1]
        route = {g: list(ctx) for g in range(len(self.groups))} if ctx else {}
        for j, s in enumerate(steps):
            if s != -1:
                route.setdefault(self.owner[s], []).append(j)
        return route

    def submit(self, mb: MicroBatch) -> None:
        for sid, text in mb.texts.items():
            self._texts[sid] = text
            for delivered in self._delivered:
                delivered.discard(sid)
        per_group: dict[int, list[tuple[int, list[int]]]] = {}  # group -> [(segment, entry indices)]
        starts, f0 = [], 0
        for i, spec in enumerate(mb.segments):
            starts.append(f0)
            f0 += spec.frames
            for g, entries in self._route(spec).items():
                per_group.setdefault(g, []).append((i, entries))
        parts = {}
        for g, items in per_group.items():
            segs, lat, ts, texts = [], [], [], {}
            for i, entries in items:
                spec = mb.segments[i]
                bf = spec.frames // max(1, len(spec.steps)) if spec.steps else spec.frames
                rows = [r for j in entries for r in range(starts[i] + j * bf, starts[i] + (j + 1) * bf)]
                has_ctx = spec.commit_frames > 0 and entries and entries[0] == 0 and spec.steps[0] == -1
                segs.append(dataclasses.replace(
                    spec, frames=len(rows), steps=tuple(spec.steps[j] for j in entries),
                    commit_frames=spec.commit_frames if has_ctx else 0,
                    offsets=tuple(spec.offsets[j] for j in entries) if spec.offsets is not None else None))
                lat.append(mb.latents[rows])
                ts.append(mb.t[rows])
                if spec.stream_id not in self._delivered[g] and spec.stream_id in self._texts:
                    texts[spec.stream_id] = self._texts[spec.stream_id]
                    self._delivered[g].add(spec.stream_id)
            sub = MicroBatch(self._sub_seq, segs, mb.grid, torch.cat(lat), torch.cat(ts), texts, mb.profile)
            self._sub_owner[(g, self._sub_seq)] = mb.seq
            parts[g] = items
            self._sub_seq += 1
            self.groups[g].submit(sub)
        self._pending[mb.seq] = {"mb": mb, "parts": parts, "done": {}}
        self._order.append(mb.seq)

    def collect(self, wait: bool) -> list[tuple[int, torch.Tensor, list[StageStats]]]:
        self._poll()
        if wait and self._order:  # block until the oldest micro-batch has every part back
            head = self._pending[self._order[0]]
            while len(head["done"]) < len(head["parts"]):
                self._poll(block_on=next(g for g in head["parts"] if g not in head["done"]))
        out = []
        while self._order:
            head = self._pending[self._order[0]]
            if len(head["done"]) < len(head["parts"]):
                break
            self._order.popleft()
            del self._pending[head["mb"].seq]
            out.append(self._assemble(head))
        return out

    def _poll(self, block_on: int | None = None) -> None:
        for g, group in enumerate(self.groups):
            for sub_seq, flow, stats in group.collect(wait=g == block_on):
                parent = self._pending[self._sub_owner.pop((g, sub_seq))]
                parent["done"][g] = (flow, [replace_stage(s, self._offsets[g] + s.stage) for s in stats])

    def _assemble(self, entry: dict) -> tuple[int, torch.Tensor, list[StageStats]]:
        mb, pieces = entry["mb"], {}
        for g, items in entry["parts"].items():
            flow, _ = entry["done"][g]
            f0 = 0
            for i, entries in items:
                spec = mb.segments[i]
                bf = spec.frames // max(1, len(spec.steps)) if spec.steps else spec.frames
                for j in entries:
                    pieces.setdefault((i, j), flow[f0:f0 + bf])  # context entries: the first group's copy
                    f0 += bf
        order = [(i, j) for i, spec in enumerate(mb.segments) for j in range(max(1, len(spec.steps)))]
        flow = torch.cat([pieces[k] for k in order])
        stats = [s for g in sorted(entry["done"]) for s in entry["done"][g][1]]
        return mb.seq, flow, stats

    def open_stream(self, stream_id: str, cache_cfg: CacheConfig) -> None:
        for g in self.groups:
            g.open_stream(stream_id, cache_cfg)

    def close_stream(self, stream_id: str) -> list[int]:
        self._texts.pop(stream_id, None)
        for delivered in self._delivered:
            delivered.discard(stream_id)
        return [b for g in self.groups for b in g.close_stream(stream_id)]

    def cache_bytes(self) -> list[int]:
        return [b for g in self.groups for b in g.cache_bytes()]

    def split(self) -> list[tuple[int, int]]:
        return [r for g in self.groups for r in g.split()]

    def stage_groups(self) -> list[list[int]]:
        return [list(range(off, off + g.num_stages)) for g, off in zip(self.groups, self._offsets)]

    def profile(self, grid: tuple[int, int], frames: int, cache_cfg: CacheConfig) -> list[StageStats]:
        return [replace_stage(s, off + s.stage) for g, off in zip(self.groups, self._offsets)
                for s in g.profile(grid, frames, cache_cfg)]

    def rebalance(self, split: list[tuple[int, int]]) -> None:
        for g, off in zip(self.groups, self._offsets):
            g.rebalance(split[off:off + g.num_stages])

    def shutdown(self) -> None:
        for g in self.groups:
            g.shutdown()


def replace_stage(stats: StageStats, stage: int) -> StageStats:
    return dataclasses.replace(stats, stage=stage)
