"""build_executor: the config reaches the stages (weights file, generator_ema, dtype, layout)."""

import dataclasses

import pytest
import torch

from workers.config import GenerationConfig, ParallelConfig, get_config
from workers.executor import InProcessExecutor, build_executor
from workers.model import CausalWanModel

CFG = get_config("tiny")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Self-Forcing-style file whose generator and generator_ema differ."""
    plain = CausalWanModel(get_config("tiny", init_seed=1)).state_dict()
    ema = CausalWanModel(get_config("tiny", init_seed=2)).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "self_forcing_dmd.pt"
    torch.save({"generator": {"model." + k: v for k, v in plain.items()},
                "generator_ema": {"model." + k: v for k, v in ema.items()}}, path)
    return str(path), plain, ema


@pytest.mark.parametrize("use_ema", [False, True])
def test_the_serving_executor_loads_generator_ema_when_asked(checkpoint, use_ema):
    path, plain, ema = checkpoint
    gen = GenerationConfig(model=CFG, model_path=path, use_ema=use_ema)
    executor = build_executor(gen, ParallelConfig(stages=2, backend="local"))
    want = ema if use_ema else plain
    for stage in executor.stages:
        for name, value in stage.model.state_dict().items():
            assert torch.equal(value, want[name]), name


def test_layout_and_dtype_come_from_the_parallel_config():
    parallel = ParallelConfig(stages=3, backend="local", dtype="bfloat16", device="cpu")
    executor = build_executor(GenerationConfig(model=CFG), parallel)
    assert isinstance(executor, InProcessExecutor) and executor.num_stages == 3
    assert [s.block_range for s in executor.stages] == [(0, 2), (2, 3), (3, 4)]
    assert all(p.dtype == torch.bfloat16 for s in executor.stages for p in s.model.parameters())
    assert executor.stages[0].device == torch.device("cpu")
    if not torch.cuda.is_available():  # a forced device that is not there fails at build, naming it
        with pytest.raises(ValueError, match="cuda"):
            build_executor(GenerationConfig(model=CFG), dataclasses.replace(parallel, device="cuda"))


def test_a_stage_profile_keeps_the_least_disturbed_of_its_repeats():
    """Calibration takes the fastest timed forward (interference only adds time), never the fill or warm-up."""
    from workers.config import CacheConfig

    stage = build_executor(GenerationConfig(model=CFG, height=32, width=48),
                           ParallelConfig(stages=1, backend="local")).stages[0]
    real, seen = stage.forward, []
    disturbed = [5.0, 0.0, 3.0, 9.0, 7.0]  # seconds added to: fill, warm-up, then three timed forwards

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        out[2].compute_s += disturbed[len(seen)]
        seen.append(out[2])
        return out

    stage.forward = forward
    got = stage.profile((2, 3), 2, CacheConfig(sink_frames=1, window_frames=3), repeats=3)
    assert len(seen) == 5 and got is seen[2]
    assert not stage.streams  # the throwaway stream is closed


def test_a_stage_profile_batches_streams_as_the_engine_does():
    """``streams`` throwaway streams, each filled and attending to its own full cache, in one micro-batch: the
    timed forward carries every stream's tokens (bench/profile.py fits the batched sizes the engine runs)."""
    from workers.config import CacheConfig

    stage = build_executor(GenerationConfig(model=CFG, height=32, width=48),
                           ParallelConfig(stages=1, backend="local")).stages[0]
    real, batches = stage.forward, []

    def forward(mb, *args, **kwargs):
        batches.append([w.stream_id for w in mb.segments])
        return real(mb, *args, **kwargs)

    stage.forward = forward
    one = stage.profile((2, 3), 2, CacheConfig(sink_frames=1, window_frames=3))
    three = stage.profile((2, 3), 2, CacheConfig(sink_frames=1, window_frames=3), streams=3)
    assert (one.tokens, three.tokens) == (2 * 6, 3 * 2 * 6)
    assert batches[3:6] == [["__profile__0"], ["__profile__1"], ["__profile__2"]]  # fills, one per stream
    assert batches[-1] == ["__profile__0", "__profile__1", "__profile__2"] and not stage.streams


class _Refs:
    """Ray's wait/get over a dict of finished calls (ref -> result); a ref not in it is still running."""

    def __init__(self):
        self.done = {}
        self.fetched = []  # every ref get() read, in order

    def wait(self, refs, num_returns=1, timeout=None):
        return [r for r in refs if r in self.done], [r for r in refs if r not in self.done]

    def get(self, refs, timeout=None):
        self.fetched += refs
        return [self.done[r] for r in refs]


def test_ray_collect_hands_out_a_chunks_frames_only_after_the_chunk():
    """The decode worker can finish a chunk before the driver hears from the last stage that produced it; its
    frames must then wait for that micro-batch, or the engine would not know the chunk and lose its frames.
    Here one call carries micro-batches 6 and 7 (``micro_batches_per_call``): both come back, in order, with
    the call."""
    from collections import deque

    from workers.executor import StageFailure
    from workers.ray_executor import DriverTraffic, RayExecutor

    ex = RayExecutor.__new__(RayExecutor)  # no Ray: only collect's ordering, over fake call results
    ex._ray, ex.traffic, ex.call_timeout_s, ex._answers, ex.per_call = _Refs(), DriverTraffic(), 0.05, {}, 2
    ex._inflight = deque([([6, 7], ["stage0", "stage1"])])
    ex._decoding = [deque([(7, "decode")])]
    ex._ray.done.update(stage0=[(None, [], "stats0", None)] * 2, decode=["frames of mb 7"])  # stage 1 not back yet
    got = ex.collect(False)
    assert got.finished == [] and got.decoded == []
    with pytest.raises(StageFailure, match="timeout"):  # waiting, too, waits for the micro-batch itself
        ex.collect(True)
    ex._ray.done["stage1"] = [(None, [], "stats1 of 6", None), (None, [], "stats1 of 7", None)]
    got = ex.collect(True)
    assert [f.seq for f in got.finished] == [6, 7] and got.decoded == ["frames of mb 7"]
    assert [f.stats for f in got.finished] == [["stats0", "stats1 of 6"], ["stats0", "stats1 of 7"]]
    assert not ex._inflight and not ex.decoding and not ex._answers  # each answer handed out, none kept
    assert sorted(ex._ray.fetched) == ["decode", "stage0", "stage1"]  # each deserialized once, though polled often
