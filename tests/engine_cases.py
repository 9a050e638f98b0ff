"""Shared helpers: run the engine on some streams and compare with the single-process reference."""

import torch

from workers.config import CacheConfig, GenerationConfig, ParallelConfig, SamplerConfig, get_config
from workers.engine import PipelineEngine
from workers.executor import InProcessExecutor
from workers.reference import ReferenceGenerator

STREAMS = {"a": ("a cat on a sofa", 1), "b": ("a dog in the rain", 2), "c": ("an owl at night", 3)}


def gen_config(mode: str, lanes: int = 1, steps=(1000, 750, 500, 250), attention: str = "inflight") -> GenerationConfig:
    return GenerationConfig(model=get_config("tiny"),
                            sampler=SamplerConfig(denoising_steps=steps, chunk_frames=2, mode=mode, lanes=lanes,
                                                  batch_attention=attention),
                            cache=CacheConfig(sink_frames=1, window_frames=3, recache_frames=4),
                            height=32, width=48)


def make_engine(cfg: GenerationConfig, executor) -> PipelineEngine:
    return PipelineEngine(cfg, executor)


def local_executor(cfg: GenerationConfig, stages: int = 1, split=None, decode_workers: int = 0,
                   **parallel) -> InProcessExecutor:
    """In-process stages (latents only unless ``decode_workers``)."""
    return InProcessExecutor(cfg, ParallelConfig(stages=stages, backend="local", decode_workers=decode_workers,
                                                 **parallel), split)


def ray_executor(cfg: GenerationConfig, stages: int = 1, split=None, decode_workers: int = 0, **parallel):
    """Ray stage actors (latents only unless ``decode_workers``); needs a running Ray."""
    from workers.ray_executor import RayExecutor

    return RayExecutor(cfg, ParallelConfig(stages=stages, decode_workers=decode_workers, **parallel), split)


def collect(engine: PipelineEngine, n: dict[str, int]) -> dict[str, dict[int, torch.Tensor]]:
    """Run until each stream has n chunks; returns stream -> chunk index -> latents (drains in-flight work)."""
    out: dict[str, dict[int, torch.Tensor]] = {sid: {} for sid in n}
    for _ in range(100_000):
        if all(len(out[s]) >= k for s, k in n.items()):
            break
        for o in engine.step():
            out.setdefault(o.stream_id, {})[o.chunk] = o.latents
    for o in engine.drain():
        out.setdefault(o.stream_id, {})[o.chunk] = o.latents
    return out


def assert_matches_reference(cfg: GenerationConfig, got: dict[str, dict[int, torch.Tensor]], streams: dict,
                             n_chunks: int, prompt_schedules: dict | None = None, tol: float = 1e-4) -> None:
    ref = ReferenceGenerator(cfg)
    for sid, (prompt, seed) in streams.items():
        want = ref.latents(prompt, seed, n_chunks, prompt_schedule=(prompt_schedules or {}).get(sid))
        chunks = sorted(got[sid])
        assert chunks[:n_chunks] == list(range(n_chunks)), chunks
        have = torch.cat([got[sid][c] for c in range(n_chunks)])
        err = (have - want).abs().max().item()
        assert err <= tol, f"stream {sid}: max abs error {err}"
